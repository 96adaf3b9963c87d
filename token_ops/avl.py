"""A-VL (Zhang et al., AAAI 2025, "A-VL: Adaptive Attention for Large Vision-Language Models").

Decoding attends to a part of each cache, per modality, per layer:
- visual cache: at prefill the last prompt token's attention in each layer (head average) splits the image tokens
  into core (top 1 - `compute`), secondary (top 1 - `rate`) and minor (the rest, deleted). Decoding steps attend to
  the core only; every `interval` steps a step attends to the whole secondary set and picks the new core from its own
  attention (the core drifts).
- text cache (H2O-style locality): a budget of (1 - `text_rate`) of the text keys; half of it goes to the most recent
  text keys, the rest to the heaviest accumulated attention; evicted keys never return. H2O accumulates attention over
  every query row; here over the last prompt row and every decoding row (the rows the engine computes anyway).
- the optional prefill filter of the paper (drop P% of image tokens after layer 2) is FastV: compose "fastv+avl".

The public code's flags (vision_adaptive_attention_rate, _compute_rate, _update_interval, text_pruning_rate) match
`rate`, `compute`, `interval`, `text_rate`; the values here are its README's examples. Deleted and non-core keys are
masked, not freed: the paper's memory savings need a cache that drops them per layer (and its custom kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlm_efficient.method import AttentionEdit, AttentionRequest, Method, refuse_layers_with_own_mask
from vlm_efficient.registry import register_method
from vlm_efficient.selection import keep_count, top_k_mask


@register_method
@dataclass
class AVL(Method):
    name = "avl"
    summary = "decode: attend to the core of the visual cache (re-picked every few steps) and to local text"

    rate: float = 0.5
    compute: float = 0.7
    interval: int = 3
    text_rate: float = 0.3

    record_masks: ClassVar[bool] = False  # tests: keep every step's decode mask in run.memory(self)["masks"]

    def bind(self, engine) -> None:
        if not 0 <= self.rate <= self.compute < 1:
            raise ValueError("avl: need 0 <= rate <= compute < 1 (deleted share <= share left out of computation)")
        if self.interval < 1 or not 0 <= self.text_rate < 1:
            raise ValueError("avl: interval must be >= 1 and text_rate in [0, 1)")
        refuse_layers_with_own_mask("avl", engine, range(engine.num_layers),
                                    "avl keeps per-key states over every prompt key while decoding")  # fmt: skip

    def attention_request(self, layer: int) -> AttentionRequest | None:
        return AttentionRequest(queries="last")

    def observe_attention(self, layer, run, stats) -> None:
        received = stats.received.float()  # [B, n]
        positions = run.current_positions().to(received.device)
        visual = run.current(run.layout.visual, fill=False).to(received.device)
        text = run.current(run.layout.text, fill=False).to(received.device)
        count = visual.sum(1)
        secondary = top_k_mask(received, visual, keep_count(count, self.rate))
        core = top_k_mask(received, visual, keep_count(count, self.compute))
        run.memory(self)[layer] = {
            "positions": positions, "secondary": secondary, "core": core,
            "score": torch.where(text, received, 0.0), "text": text, "evicted": torch.zeros_like(text),
        }  # fmt: skip

    def _extend(self, state, keys: torch.Tensor, run) -> None:
        """Append the generated tokens that joined the cache since the last step: state columns = cache columns."""
        new = keys[:, state["positions"].shape[1] :]
        if new.shape[1] == 0:
            return
        no = torch.zeros_like(new, dtype=torch.bool)
        valid = run.attention_mask_2d.to(new.device).gather(1, new)
        state["positions"] = torch.cat([state["positions"], new], 1)
        for name, extra in (("secondary", no), ("core", no), ("evicted", no), ("text", valid)):
            state[name] = torch.cat([state[name], extra], 1)
        state["score"] = torch.cat([state["score"], torch.zeros_like(new, dtype=state["score"].dtype)], 1)

    def attention_edit(self, layer, run, context):
        memory = run.memory(self)
        if context.prefill or layer not in memory or not run.layout.has_visual:
            return None
        state = memory[layer]
        keys = context.key_positions
        self._extend(state, keys, run)
        update = run.decode_steps % self.interval == 0
        visual = context.keys_where(run.layout.visual)
        allowed = torch.where(visual, state["secondary"] if update else state["core"], ~state["evicted"])
        if self.record_masks:
            memory.setdefault("masks", {}).setdefault(layer, []).append((keys.clone(), allowed.clone()))

        def post_softmax(probs):
            attention = probs.mean(1)[:, -1]  # the decoding row, head average [B, kv]
            if update:
                state["core"] = top_k_mask(attention, state["secondary"], state["core"].sum(1))
            if self.text_rate:
                self._evict(state, attention)
            return probs

        return AttentionEdit(mask=allowed[:, None, None, :], post_softmax=post_softmax)

    def _evict(self, state, attention: torch.Tensor) -> None:
        """H2O: keep the most recent half of the text budget and the heaviest accumulated attention for the rest."""
        text, evicted = state["text"], state["evicted"]
        state["score"] = state["score"] + attention * text
        live = text & ~evicted
        count = text.sum(1)
        budget = count - torch.floor(count.double() * self.text_rate).long()
        order = torch.arange(text.shape[1], device=text.device).expand_as(text).float()
        recent = top_k_mask(order, live, budget // 2)
        heavy = top_k_mask(state["score"], live & ~recent, budget - budget // 2)
        state["evicted"] = evicted | (live & ~recent & ~heavy)
