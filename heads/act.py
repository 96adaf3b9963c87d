"""ACT, attention calibration (Yu et al., 2024, "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large
Language Models without Training through Attention Calibration", ICML).

In layers 2..L-2 (public code: 2..30 of 32), per head: a key column is a sink when its mean received attention, over
the rows that can see it (column sum / number of later rows, as in the code), exceeds 0.1; the first such column
(usually BOS) is left alone. In every row, sink columns keep beta = 0.4 of their attention and the freed mass goes to
the other keys in proportion to their attention. The column statistics need all rows first: they come from a probe
of the layer's prefill attention over all rows (before the layer runs), so the calibration itself is one pass.

The paper picks heads by an offline search on calibration data; `heads=layer.head/...` restricts ACT to such a list
(default: every head of `layers`). The public code calibrates a single forward (no decoding); here the sink columns
found at prefill are also calibrated in every decoding row.

The authors' search (github.com/GATECH-EIC/ACT, scripts/calibration.sh, main.py --calibrate, models/modelling_llama.py
and llama_modelling_aug.py: atten_process_cal; its result is models/augment_index.py) calibrates ONE head of ONE layer
at a time (layers 2..30 of 32) and scores the model's accuracy on a calibration set of classification and
multiple-choice questions (the argmax over the choices' tokens at the last prompt row); the heads whose calibration
raises the accuracy are the list. `vlm_efficient.evals.act_search.search_heads` runs that procedure on any
wrapped-model inputs and returns the `heads=` value; `python -m vlm_efficient.evals.act_search --model testbed` runs it
on the testbed's training-split colour and count questions. Testbed result: see the README's ACT row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.kernels.api import GroupSpec
from vlm_efficient.method import AttentionRequest, KernelEdit, Method
from vlm_efficient.registry import register_method

from .common import check_range, head_mask, parse_heads, parse_layers, scatter_positions


def act_groups(num_heads: int, beta: float = 0.4, sink_group: int = 1, num_groups: int = 2, heads=None) -> GroupSpec:
    """ACT's (and the OCR-head sink's) calibration of one sink group as kernel 3's tables: keep beta of the sink
    mass and spread the rest over every other key in proportion, in `heads` (None: all)."""
    keep = torch.ones(num_groups)
    keep[sink_group] = beta
    receive = torch.ones(num_groups)
    receive[sink_group] = 0.0
    return GroupSpec(num_heads, num_groups, keep=keep, receive=receive, sink_group=sink_group).on_heads(heads)


@register_method
@dataclass
class ACT(Method):
    name = "act"
    summary = "attention calibration: sink columns (mean received > 0.1, first one kept) keep beta, rest redistributed"
    reported = "accuracy up on text-only LLM tasks; no hallucination benchmark"

    beta: float = 0.4
    threshold: float = 0.1
    layers: str = ""  # default 2..L-2
    heads: str = ""  # layer.head/...; empty = all heads of `layers`

    def bind(self, engine) -> None:
        check_range("act", "beta", self.beta, 0.0, 1.0)
        check_range("act", "threshold", self.threshold, 0.0, 1.0)
        heads = engine.text_config.num_attention_heads
        self.chosen = parse_layers("act", self.layers, engine.num_layers, range(2, engine.num_layers - 1))
        self.heads_by_layer = parse_heads("act", self.heads, engine.num_layers, heads) if self.heads else None
        if self.heads_by_layer is not None:
            self.chosen = tuple(layer for layer in self.chosen if layer in self.heads_by_layer)
        self.num_heads = heads

    def attention_request(self, layer):
        return AttentionRequest(queries="all", per_head=True, probe=True) if layer in self.chosen else None

    def observe_attention(self, layer, run, stats) -> None:
        received = stats.received.float()  # [B, H, n]: mean over the valid rows
        valid = run.current_valid().to(received.device)
        rows = valid.sum(1).float()
        seen_by = valid.flip(1).cumsum(1).flip(1).float()  # valid rows at or after each key
        mean = received * rows[:, None, None] / seen_by[:, None, :].clamp(min=1)
        sinks = (mean > self.threshold) & valid[:, None, :]
        first = sinks.float().argmax(-1, keepdim=True)
        sinks = sinks.scatter(-1, first, False)
        if self.heads_by_layer is not None:
            sinks &= head_mask(self.heads_by_layer[layer], self.num_heads)[..., 0].to(sinks.device)
        if bool(sinks.any()):
            positions = run.current_positions().to(sinks.device)
            run.memory(self)[layer] = scatter_positions(sinks, positions, run.layout.length)

    def kernel_edit(self, layer, run, prefill):
        sinks = run.memory(self).get(layer)
        if sinks is None:
            return None
        cache = run.memory(self).setdefault("kernel", {})
        if layer not in cache:
            cache[layer] = self._kernel_edit(sinks)
        return cache[layer]

    def _kernel_edit(self, sinks: torch.Tensor):
        """Sink columns are per head: a key's group is the set of heads in which it is a sink (group 0: none), so the
        tables keep beta of a group's mass in exactly those heads. Kernel 3 runs up to two such head sets. Groups are
        numbered in the order of the head sets read as binary numbers (head h = bit h)."""
        batch, heads, length = sinks.shape
        head_sets = sinks.permute(0, 2, 1).flip(-1).reshape(-1, heads).long()  # last head first: binary order
        patterns, groups = torch.unique(torch.cat([head_sets.new_zeros(1, heads), head_sets]), dim=0,
                                        return_inverse=True)
        in_heads = patterns.flip(-1).T.bool().cpu()  # [H, G]
        keep = torch.where(in_heads, self.beta, 1.0)
        spec = GroupSpec(heads, len(patterns), keep=keep, receive=(~in_heads).float(),
                         sink_group=1 if len(patterns) > 1 else None)
        return KernelEdit(spec=spec, groups=groups[1:].view(batch, length))
