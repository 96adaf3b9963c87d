"""Attention statistics: what the methods' AttentionRequests ask of a layer's attention (the attention its keys
receive from chosen query rows, the keys themselves), computed beside the call that SDPA or the kernel router runs.

A request marked `probe` sees a layer's attention on its input before the layer really runs (and before that
layer's pruning): `run_probes` calls the layer's own attention module, whose call the engine's attention
implementation answers with `deliver_stats` and no output. Other requests are answered after the layer's call
(`after_attention`), except those the router's fused kernel already delivered.
"""

from __future__ import annotations

import torch

from .adapters import CACHE_KWARGS
from .attention import received_attention
from .method import AttentionStats, Method
from .run_state import RunState


def deliver_stats(method: Method, idx: int, run: RunState, query, key, attention_mask, scaling) -> None:
    """Compute what `method` asked of layer idx's attention in this call and hand it to the method."""
    request = method.attention_request(idx)
    received = None
    if request.queries is not None:
        rows = run.query_rows(request).to(query.device)
        received = received_attention(query, key, attention_mask, scaling, rows, per_head=request.per_head)
    method.observe_attention(idx, run, AttentionStats(received=received, keys=key if request.keys else None))


def after_attention(methods: list[Method], run: RunState | None, idx: int, query, key, attention_mask, scaling,
                    delivered=()) -> None:  # fmt: skip
    """The prefill's non-probe requests of layer idx, once its attention ran; `delivered`: methods already served."""
    if run is None or not run.prefill:
        return
    for method in methods:
        request = method.attention_request(idx)
        if request is not None and not request.probe and not any(method is m for m in delivered):
            deliver_stats(method, idx, run, query, key, attention_mask, scaling)


def run_probes(engine, idx: int, layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> None:
    """Run layer idx's attention module on its input once per method whose request there is a probe; `engine.probing`
    names the method while its call runs (the engine's attention implementation delivers its statistics)."""
    for method in engine.methods:
        request = method.attention_request(idx)
        if request is None or not request.probe:
            continue
        engine.probing = method
        try:
            attention_kwargs = {k: v for k, v in kwargs.items() if k not in (*CACHE_KWARGS, "use_cache")}
            layer.self_attn(hidden_states=engine.adapter.attention_input(layer, hidden), **attention_kwargs)
        finally:
            engine.probing = None
