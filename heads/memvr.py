"""MemVR (Zou et al., ICML 2025, "Look Twice Before You Answer: Memory-Space Visual Retracing for Hallucination
Mitigation in Multimodal Large Language Models"; code github.com/1zhou-Wang/MemVR, memvr.py): when the model is
uncertain in a middle layer, the visual tokens are fed again through the next layer's FFN, used as key-value memory.

As the public code does it (memvr.py: LlamaModel.forward and LlamaMLP.forward), in every forward call (the prefill
and each decoding step):
- after each decoder layer l, the next-token logits of the last row, lm_head(norm(h_l)), give the entropy of the
  softmax over the top 10 logits, divided by log 10 (so in [0, 1]);
- the first layer l with starting_layer < l < ending_layer whose entropy exceeds `entropy_threshold` triggers one
  retracing event (at most one per forward call): layer l+1's FFN output becomes
      (1 - ratio) * FFN(x) + ratio * mean|FFN(x)| / mean|A(x)| * A(x),  A(x) = (x z^T) z
  for every row of the call, where z [n_v, d] are the visual tokens as they enter the LLM (the projected image
  features) and the means run over all rows and channels of the call. The code builds A from z scaled by
  mean|up_proj| / mean|z| and mean|down_proj| / mean|z|; those scalars cancel in the normalisation.
Defaults are the code's scripts for LLaVA-1.5-7B: entropy_threshold 0.75, layers 5 and 16 of 32 (scaled to the
model's depth when not given), retracing_ratio 0.12 (its MME / README setting; its CHAIR script uses 0.31).

Differences, on purpose: the code is batch 1; here each sample of a batch has its own trigger, its own visual tokens
and its own means (over its real rows only, so left padding changes nothing). With several images in a prompt the
code keeps the last image's features; here z is all visual tokens of the sample. The code's Qwen-VL variant puts a
SiLU between the two products; its LLaVA variant (the default here) has none. Samples without visual tokens are
left alone.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from vlm_efficient.method import Method

from .common import check_range, scaled_range
from vlm_efficient.registry import register_method

TOP_K = 10  # the code's entropy is over the top 10 logits


def top_k_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] logits -> [...] entropy of the softmax over the top 10 logits / log(10) (the code's `entropy`)."""
    probs = logits.float().topk(TOP_K, dim=-1).values.softmax(-1)
    return -(probs * probs.log()).sum(-1) / math.log(TOP_K)


@register_method
@dataclass
class MemVR(Method):
    name = "memvr"
    summary = "uncertain (top-10 entropy) in a middle layer -> visual tokens retraced through the next FFN as memory"
    reported = "CHAIR down, POPE up, MME up (LLaVA-1.5)"

    entropy_threshold: float = 0.75
    retracing_ratio: float = 0.12
    starting_layer: int | None = None  # default: 5 of 32 layers, scaled to the model's depth
    ending_layer: int | None = None  # default: 16 of 32

    def bind(self, engine) -> None:
        check_range("memvr", "entropy_threshold", self.entropy_threshold, 0.0, 1.0)
        check_range("memvr", "retracing_ratio", self.retracing_ratio, 0.0, 1.0)
        depth = engine.num_layers
        paper = scaled_range(5, 16, depth)
        start = paper.start if self.starting_layer is None else self.starting_layer
        end = paper.stop - 1 if self.ending_layer is None else self.ending_layer
        if not (0 <= start and start + 1 < end <= depth - 1):
            raise ValueError(
                f"memvr: starting_layer={start}, ending_layer={end}: the entropy is checked after the layers strictly "
                f"between them and the FFN of the layer after the trigger retraces, so 0 <= starting_layer and "
                f"starting_layer + 2 <= ending_layer <= {depth - 1} for this {depth}-layer model "
                f"(e.g. starting_layer=0,ending_layer={min(depth - 1, 2)})"
            )
        self.checked = range(start + 1, end)  # layers whose output's entropy can trigger
        text_model = engine.adapter.text_model(engine.model)
        self.final_norm, self.lm_head = text_model.norm, engine.model.get_output_embeddings()
        engine_ref = self._engine_ref = weakref.ref(engine)
        for layer in range(start + 2, end + 1):
            ffn = getattr(engine.layers[layer], "mlp", None)
            if ffn is None:
                raise ValueError(f"memvr: decoder layer {layer} has no `mlp` module to retrace the visual tokens in")
            engine.add_handle(ffn.register_forward_hook(self._ffn_hook(layer, engine_ref)))

    # the hidden states entering layer l + 1 are layer l's output (layer 0's input: the visual tokens as fed)
    def observes_hidden(self, layer: int) -> bool:
        return layer == 0 or layer - 1 in self.checked

    def observe_hidden(self, layer, run, hidden) -> None:
        memory = run.memory(self)
        if layer == 0:
            if run.prefill and getattr(self._engine_ref(), "fast_path", None) is not None:
                # its decoding step replays a captured step: the per-call trigger and FFN hooks would not act in it
                raise ValueError("memvr decides at every decoding step in Python hooks, which the fast path "
                                 "(wrap(..., fast=True)) does not run: wrap without fast=True")
            if run.prefill:
                memory["visual"] = self._visual_memory(run, hidden) if run.layout.has_visual else None
            memory["retraced"] = hidden.new_zeros(hidden.shape[0], dtype=torch.bool)  # one event per call
            memory["inject"] = {}
            return
        if memory.get("visual") is None:
            return
        entropy = top_k_entropy(self.lm_head(self.final_norm(hidden[:, -1])))
        has_visual = memory["visual"][1].any(1)
        trigger = (entropy > self.entropy_threshold) & ~memory["retraced"] & has_visual
        memory["retraced"] = memory["retraced"] | trigger
        memory["inject"][layer] = trigger
        counts = memory.setdefault("events", {})  # per layer, (sample, call) events: retracing_events() reads it
        counts[layer] = counts.get(layer, 0) + trigger.long()

    @staticmethod
    def _visual_memory(run, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual rows of each sample, left-aligned: ([B, M, d] memory, [B, M] real slots)."""
        visual = run.current(run.layout.visual, fill=False).to(hidden.device)
        counts = visual.sum(1)
        width = int(counts.max())
        order = visual.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :width]
        slots = torch.arange(width, device=hidden.device)[None] < counts[:, None]
        rows = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
        return rows * slots[..., None], slots

    def _ffn_hook(self, layer: int, engine_ref):
        def hook(module, args, output):
            engine = engine_ref()
            run = engine.run if engine is not None else None
            inject = run.memory(self).get("inject", {}).get(layer) if run is not None else None
            if inject is None:
                return None
            memory, _ = run.memory(self)["visual"]
            x = args[0].float()
            ffn = output.float()
            retraced = (x @ memory.float().transpose(1, 2)) @ memory.float()  # A(x) = (x z^T) z; empty slots are 0
            if run.prefill:
                real = run.current_valid().to(x.device)[..., None].float()
            else:
                real = torch.ones_like(x[..., :1])
            # mean|FFN(x)| / mean|A(x)| over the sample's real rows: both means share their count
            scale = (ffn.abs() * real).sum((1, 2)) / (retraced.abs() * real).sum((1, 2)).clamp(min=1e-30)
            mixed = (1 - self.retracing_ratio) * ffn + self.retracing_ratio * scale[:, None, None] * retraced
            return torch.where(inject[:, None, None], mixed, ffn).to(output.dtype)

        return hook


def retracing_events(run, method: MemVR) -> dict[int, list[int]]:
    """Per FFN layer that retraced in the last generate(), how many calls (prefill + decoding steps) per sample."""
    events = run.memory(method).get("events", {})
    return {layer: counts.tolist() for layer, counts in sorted(events.items())}
