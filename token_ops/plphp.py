"""PLPHP (Meng et al., 2025, "PLPHP: Per-Layer Per-Head Vision Token Pruning for Efficient Large Vision-Language
Models"; no public code).

From layer K on, each layer gets a retention rate from the attention its last prompt token pays the visual tokens
(head average): gamma >= alpha -> vision-attentive, keeps r + dr; gamma <= beta -> vision-indifferent, keeps r - dr;
otherwise r. Inside the layer every head keeps its own top share of the visual tokens, ranked by that head's attention
from the last prompt token; the prefill is computed in full and decoding attends, per head, to the kept visual tokens
only (all text stays). With GQA a key head serves a group of query heads: the group ranks by its summed attention.
The paper's default rates and thresholds could not be checked against code: r = 0.4, dr = 0.3, alpha = 0.2,
beta = 0.1, K = 2 are ours.

`cache`: "ragged" (the paper's form, default) keeps only each KV head's kept keys in the KV cache of layers >= K
(a per-head ragged cache, vlm_efficient/ragged_cache.py): the dropped keys' memory is freed and decoding runs kernel 4
on CUDA. "mask" keeps the dense cache and masks the dropped keys in decoding (the same outputs, no memory saved); it
composes with methods that edit decoding attention (PAI, VAR, A-VL, ...), which the ragged cache refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.method import UNSTRUCTURED, AttentionEdit, AttentionRequest, Method, at_positions
from vlm_efficient.registry import register_method
from vlm_efficient.selection import keep_count, top_k_mask

CACHES = ("ragged", "mask")


@register_method
@dataclass
class PLPHP(Method):
    name = "plphp"
    summary = "per-layer retention from the layer's attention to vision, per-head top-k visual tokens in decoding"

    layer: int = 2
    retain: float = 0.4
    delta: float = 0.3
    alpha: float = 0.2
    beta: float = 0.1
    cache: str = "ragged"

    def bind(self, engine) -> None:
        if not 0 <= self.layer < engine.num_layers:
            raise ValueError(f"plphp: layer={self.layer} must be in [0, {engine.num_layers - 1}]")
        if not 0 < self.retain - self.delta and self.retain + self.delta <= 1 or self.delta < 0:
            raise ValueError("plphp: need 0 < retain - delta and retain + delta <= 1 (shares of visual tokens kept)")
        if not 0 <= self.beta <= self.alpha <= 1:
            raise ValueError("plphp: need 0 <= beta <= alpha <= 1 (attention-mass thresholds)")
        if self.cache not in CACHES:
            raise ValueError(f"plphp: cache={self.cache!r}: use one of {', '.join(CACHES)}")
        self.groups = engine.text_config.num_attention_heads // engine.text_config.num_key_value_heads

    def attention_request(self, layer: int) -> AttentionRequest | None:
        return AttentionRequest(queries="last", per_head=True) if layer >= self.layer else None

    def kernel_edit(self, layer, run, prefill):
        return None if prefill else UNSTRUCTURED  # the prefill is computed in full; cache=mask edits decoding only

    def retention(self, gamma: torch.Tensor) -> torch.Tensor:
        rate = torch.full_like(gamma, self.retain)
        rate = torch.where(gamma >= self.alpha, self.retain + self.delta, rate)
        return torch.where(gamma <= self.beta, self.retain - self.delta, rate)

    def observe_attention(self, layer, run, stats) -> None:
        # The choices act in decoding only: each layer's statistics wait, and decided() makes every layer's choice in
        # one batch (a per-layer top-k is host work that a batch-1 prefill pays in full).
        rows = (id(run.rows), id(run.input_positions))  # the row set: layers on the same rows stack
        pending = run.memory(self).setdefault("pending", {})
        group = pending.setdefault(rows, {"positions": run.current_positions(), "received": {}})
        group["received"][layer] = stats.received

    def decided(self, run) -> dict:
        """{layer: {"positions" [B, n], "kept" [B, Hkv, n], "cached" [B, Hkv, n]}} of every observed layer; the rows
        are the prompt keys the layer caches (the statistics come from its own attention call)."""
        memory = run.memory(self)
        decided = memory.setdefault("decided", {})
        for group in memory.pop("pending", {}).values():
            positions = group["positions"]
            received = torch.stack(list(group["received"].values())).float()  # [L, B, Hq, n]
            layers, batch, heads, n = received.shape
            visual = at_positions(run.layout.visual, positions, False).to(received.device).repeat(layers, 1)
            received = received.view(layers * batch, heads, n)
            rate = self.retention((received.mean(1) * visual).sum(-1))
            kv_heads = heads // self.groups
            by_group = received.view(-1, self.groups, n).sum(1)  # one row per (layer, sample, KV head)
            count = keep_count(visual.sum(1), 1 - rate)
            kept = top_k_mask(by_group, visual.repeat_interleave(kv_heads, 0), count.repeat_interleave(kv_heads, 0))
            kept = kept.view(layers, batch, kv_heads, n)
            cached = ~visual.view(layers, batch, 1, n) | kept
            for index, layer in enumerate(group["received"]):
                decided[layer] = {"positions": positions, "kept": kept[index], "cached": cached[index]}
        return decided

    def kept_keys(self, run, layer, key_positions: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, kv]: the keys each key head attends to in decoding: its kept visual keys and every other key."""
        state = self.decided(run)[layer]
        positions, kept = state["positions"].to(key_positions.device), state["kept"].to(key_positions.device)
        match = key_positions[:, :, None] == positions[:, None, :]  # [B, kv, n]
        kept_visual = (match[:, None] & kept[:, :, None]).any(-1)
        visual = at_positions(run.layout.visual, key_positions, False)
        return ~visual[:, None] | kept_visual

    def decode_cache_keep(self, layer, run):
        if self.cache != "ragged" or layer < self.layer:
            return None
        state = self.decided(run).get(layer)
        return None if state is None else state["cached"]

    def attention_edit(self, layer, run, context):
        if self.cache != "mask" or context.prefill or layer < self.layer or layer not in self.decided(run):
            return None
        kept = self.kept_keys(run, layer, context.key_positions).repeat_interleave(self.groups, dim=1)
        return AttentionEdit(mask=kept[:, :, None, :])
