"""Sink-aware KV eviction, after StreamingLLM (Xiao, Tian, Chen, Han, Lewis, ICLR 2024, "Efficient Streaming Language
Models with Attention Sinks"; code github.com/mit-han-lab/streaming-llm): the cache keeps the attention sinks, the
first tokens (4 by default, the paper's), and a window of the most recent tokens; everything between is evicted. For a
VLM the visual tokens can be kept as well (`visual=keep`), so that a long text stream after an image still sees it.

A decode-time cache policy: the prefill is computed in full; at the first decoding step every layer's cache keeps,
per sample, its first `sinks` real tokens, the last `window` prompt positions, the visual tokens with `visual=keep`,
and with `detect=t` also the layer's detected sinks (keys whose mean received attention over the sample's prompt rows,
head-averaged, is >= t: ACT's rule, "massive attention" columns other than the first tokens). The other prompt keys
are freed (a per-layer ragged cache, vlm_efficient/ragged_cache.py: ve.stats(model).kv_cache_bytes reports what is
held). Generated tokens are appended and kept: the window is counted back from the end of the prompt and does not
slide over the generated tokens, so a generate() holds sinks + window (+ visual) + its new tokens.

Positions: kept keys keep their original rotary positions and decoding continues at the prompt's length, as for every
pruning method here; StreamingLLM instead re-numbers positions inside the cache (its "positions within the cache"),
which matters past the model's context length, not within it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.method import AttentionRequest, Method, at_positions, refuse_layers_with_own_mask
from vlm_efficient.registry import register_method

VISUAL = ("evict", "keep")


@register_method
@dataclass
class StreamingKV(Method):
    name = "streaming"
    summary = "decode-time KV eviction: keep attention sinks + the recent window (+ visual tokens), free the rest"

    sinks: int = 4
    window: int = 256
    visual: str = "evict"
    detect: float = 0.0  # 0: off; else also keep keys receiving >= this mean attention in a layer (detected sinks)

    def bind(self, engine) -> None:
        if self.sinks < 0 or self.window < 1:
            raise ValueError(f"streaming: sinks={self.sinks} must be >= 0 and window={self.window} >= 1 (tokens)")
        if self.visual not in VISUAL:
            raise ValueError(f"streaming: visual={self.visual!r}: use evict or keep")
        if not 0 <= self.detect <= 1:
            raise ValueError(f"streaming: detect={self.detect} must be in [0, 1] (0 = off; ACT uses 0.1)")
        refuse_layers_with_own_mask("streaming", engine, range(engine.num_layers),
                                    "streaming's per-head kept cache decodes without that mask")  # fmt: skip
        self.kv_heads = engine.text_config.num_key_value_heads

    def attention_request(self, layer: int) -> AttentionRequest | None:
        return AttentionRequest(queries="all") if self.detect > 0 else None

    def observe_attention(self, layer, run, stats) -> None:
        detected = run.memory(self).setdefault("detected", {})
        detected[layer] = (run.current_positions(), stats.received >= self.detect)

    def kept_positions(self, run, positions: torch.Tensor) -> torch.Tensor:
        """[B, m] which prompt keys at original positions [B, m] a layer keeps (without detected sinks)."""
        layout = run.layout
        valid = layout.valid.to(positions.device)
        order = valid.long().cumsum(1) - 1  # index among the sample's real tokens
        first = at_positions(order, positions, -1)
        recent = positions >= run.prompt_length - self.window
        kept = ((first >= 0) & (first < self.sinks)) | recent
        if self.visual == "keep":
            kept |= at_positions(layout.visual, positions, False)
        return kept & run.valid_keys(positions)

    def decode_cache_keep(self, layer, run):
        positions = run.prompt_keys(layer, run.layout.kind.device)
        kept = self.kept_positions(run, positions)
        detected = run.memory(self).get("detected", {}).get(layer)
        if detected is not None:
            rows, sink = detected
            rows, sink = rows.to(positions.device), sink.to(positions.device)
            match = (positions[:, :, None] == rows[:, None, :]) & (rows[:, None, :] >= 0)
            kept |= (match & sink[:, None, :]).any(-1)
        return kept[:, None, :].expand(-1, self.kv_heads, -1)
