"""A wrapped model on Hugging Face's own static cache: generate(..., cache_implementation="static").

A StaticCache layer allocates max_cache_len slots once and writes each call's keys after the ones it already holds:
its count of written keys (`cumulative_length`) is per layer in transformers 5.17 to 5.25, whatever position the
tokens have. So a layer that runs on fewer rows after pruning writes its kept prompt keys at slots 0..kept-1 and
each generated token after them, in the order the same layer of a dynamic cache holds them. Every attention call
gets the whole buffer; where a layer holds fewer keys than the prompt or a method acts on it, the engine trims keys,
values and mask to the slots the layer has written (`written_keys`), so it attends to exactly the keys it would hold
on a dynamic cache, and the methods' masks and attention edits, expressed over those keys, apply unchanged.

generate() hands the model, on a static cache, a 4-D mask sized to the cache instead of the 2-D padding mask
(`padding_mask` gets that back at the prefill; decoding steps feed real tokens only).

generate() compiles the decoding forward on a static cache where the device is a GPU (torch.compile,
"reduce-overhead": CUDA graphs). A wrapped model is not compiled there: wrap() sets generation_config.disable_compile
(hooks.STATIC_UNCOMPILED). Traced by dynamo, the engine's hooks keep tensors across steps that the next graph replay
overwrites (LLaVA-1.5-7B on an H100: "accessing tensor output of CUDAGraphs that has been overwritten" with FastV)
and put host-side work in the graph (PAI: an inductor C++ compile error); with the hooks run eagerly between compiled
pieces, dynamo (torch 2.13) reuses one layer's compiled code for every layer without guarding on the layer's hooks or
modules (a method's FFN hook skipped, the first layer's attention module passed to the engine for every layer). A user
who passes disable_compile=False gets the traced hooks (correct under dynamo's eager backend: the tests; not on a GPU
with CUDA graphs). The graph-captured route for a wrapped model is the fast path (fast_path.py).

Not supported: a per-head pruned cache (plphp:cache=ragged replaces layers of a DynamicCache by per-head buffers),
refused at the first decoding step (ragged_cache.store_per_head).
"""

from __future__ import annotations

import torch


def on_static_cache(cache) -> bool:
    """Whether `cache` has fixed-size layers (StaticCache, or any cache generate() may compile the forward for)."""
    return bool(getattr(cache, "is_compileable", False))


def padding_mask(attention_mask: torch.Tensor | None, prefill: bool) -> torch.Tensor | None:
    """The 2-D padding mask [B, prompt length] (True = real token) behind the attention mask a model call got.
    generate() passes a 4-D mask [B, 1, q, max_cache_len] (or one per layer type) on a static cache: at the prefill
    its last row allows every real prompt token (causality allows it all earlier keys, so only padding is masked
    there); a decoding call feeds generated tokens, which are all real (None: the engine appends ones)."""
    if isinstance(attention_mask, dict):  # one mask per layer type (Qwen2-VL's create_masks_for_generate)
        attention_mask = attention_mask["full_attention"]
    if attention_mask is None or attention_mask.dim() == 2:
        return attention_mask
    if not prefill:
        return None
    last_row = attention_mask[:, 0, -1, : attention_mask.shape[2]]
    return last_row if last_row.dtype == torch.bool else last_row == 0


def allocated_bytes(cache) -> list[int]:
    """Per layer, the bytes of the static buffers (keys and values), allocated whole at the prefill."""
    return [layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in cache.layers]  # fmt: skip


def written_keys(engine, layer: int, query_length: int, key, value, attention_mask):
    """Key, value [B, Hkv, max_cache_len, d] and mask [..., max_cache_len] of a call of `layer` on a static cache,
    trimmed to the slots the layer has written (this call's included): at the prefill its rows; while decoding its
    cached prompt keys (all, or the kept ones) and the generated tokens fed so far. A probe (no cache) keeps its keys
    and gets the mask of its rows. Untouched where no method acts on the layer and it holds every prompt key: the
    model's own mask already covers the whole buffer (the unwrapped model's call, shapes fixed under compile)."""
    run = engine.run
    prompt = run.layer_positions.get(layer)
    if prompt is None and layer in engine.plain_layers and engine.probing is None and not engine.returns_weights:
        return key, value, attention_mask
    if run.prefill:
        written = query_length
    else:
        prompt_keys = run.prompt_length if prompt is None else prompt.shape[1]
        written = prompt_keys + run.fed + query_length - run.prompt_length
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape[-1] != written:
        attention_mask = attention_mask[..., :written]
    if key.shape[2] != written:
        key, value = key[:, :, :written], value[:, :, :written]
    return key, value, attention_mask
