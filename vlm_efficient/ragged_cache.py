"""Per-head pruned KV cache layers: where a method says which prompt keys each KV head of a layer keeps for decoding
(`Method.decode_cache_keep`, PLPHP), the engine replaces that layer of the model's DynamicCache, at the first
decoding step, by a `RaggedCacheLayer`. It holds only the kept keys of every (sample, KV head) in one flat buffer
(kernels.RaggedKVCache): the rest of the layer's cache is freed, and each decoding step appends the new token to
every head and attends with kernel 4 (kernels.ragged_decode_attention) on CUDA, or the same computation in torch ops.

The layer keeps the cache's interface for generate(): get_seq_length() and the mask sizes count the dense positions
(as if nothing was dropped), so positions and the model's masks stay right. What it cannot do is refused with a
reason: beam search and other batch reorders, cropping (assisted decoding), several new tokens in one call.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

GENERATED_SLACK = 64  # generated tokens each head's segment has room for before the buffers grow (they double)


class RaggedCacheLayer(DynamicLayer):
    def __init__(self, dense: DynamicLayer, keep: torch.Tensor):
        """`dense`: the layer's cache after the prefill ([B, Hkv, m, d] keys); keep: bool [B, Hkv, m], the keys each
        KV head keeps (padding keys must be False)."""
        super().__init__()
        keys, values = dense.keys, dense.values
        if keep.shape != keys.shape[:3]:
            raise ValueError(f"per-head keep {tuple(keep.shape)} does not match the cached keys {tuple(keys.shape)}")
        from .kernels.api import RaggedKVCache

        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.ragged = RaggedKVCache.from_dense(keys, values, keep.to(keys.device), max_new_tokens=GENERATED_SLACK)
        self.seq_length = self.prompt_keys = keys.shape[2]
        # mean kept prompt keys per (sample, KV head), from the capacities the host already knows
        self.kept_keys = float((self.ragged._capacity_host - GENERATED_SLACK).float().mean())
        # nothing dense is held any more; empty tensors keep the attributes generate() may look at well-formed
        self.keys, self.values = keys[:, :, :0].clone(), values[:, :, :0].clone()

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the step's token to every head's segment; the attention reads the segments (the engine routes this
        layer's decoding calls to kernel 4), so the new token itself is returned."""
        if key_states.shape[2] != 1:
            raise ValueError(
                f"a per-head pruned KV cache (plphp:cache=ragged) takes one new token per decoding call, got "
                f"{key_states.shape[2]} (assisted or speculative decoding). Use plphp:cache=mask for those."
            )
        if self.ragged._slack_host <= 0:
            self.ragged.grow(max(GENERATED_SLACK, self.seq_length - self.prompt_keys))  # room for as many again
        self.ragged.append(key_states, value_states)
        self.seq_length += 1
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seq_length

    def allocated_bytes(self) -> int:
        return 2 * self.ragged.k_buf.numel() * self.ragged.k_buf.element_size()

    def _refuse(self, *_, **__):
        raise NotImplementedError(
            "a per-head pruned KV cache (plphp:cache=ragged) cannot be reordered, repeated or cropped (beam search, "
            "assisted decoding): use num_beams=1, or plphp:cache=mask, which keeps a dense cache."
        )

    reorder_cache = batch_repeat_interleave = batch_select_indices = crop = _refuse


def per_head_keep(engine, run, layer: int, device) -> torch.Tensor | None:
    """bool [B, Hkv, m]: the prompt keys each KV head of `layer` keeps for decoding, the intersection of the methods'
    decode_cache_keep without padding keys; None where no method keeps keys per head there."""
    keeps = [k for m in engine.methods if (k := m.decode_cache_keep(layer, run)) is not None]
    if not keeps:
        return None
    keep = keeps[0]
    for other in keeps[1:]:
        keep = keep & other
    return keep.to(device) & run.valid_keys(run.prompt_keys(layer, device))[:, None, :]


def refuse_own_mask(engine, layer: int) -> None:
    """A per-head pruned cache has no mask of its own: refused where the family gives the layer one."""
    if engine.adapter.mask_group(engine.model, layer) is not None:
        raise ValueError(
            f"a per-head pruned KV cache decodes without layer {layer}'s own mask ({engine.model.config.model_type}: "
            "sliding windows, image blocks): use plphp:cache=mask, which keeps a dense cache."
        )


def store_per_head(engine, run, cache) -> None:
    """At the first decoding step: every layer where methods return a decode_cache_keep gets a RaggedCacheLayer
    holding the intersection of their keeps (and no padding key)."""
    layers = getattr(cache, "layers", None)
    for idx in range(engine.num_layers):
        keep = per_head_keep(engine, run, idx, run.layout.kind.device)
        if keep is None:
            continue
        refuse_own_mask(engine, idx)
        if layers is None or not isinstance(layers[idx], DynamicLayer) or layers[idx].keys is None:
            raise ValueError(
                f"{type(cache).__name__}: a per-head pruned KV cache replaces layers of a DynamicCache (the default "
                "cache of generate()); pass no other cache (no cache_implementation='static': its layers hold the same "
                "slots for every head), or use plphp:cache=mask, which keeps a dense cache."
            )
        dense = layers[idx]
        layers[idx] = RaggedCacheLayer(dense, keep.to(dense.keys.device))
        run.ragged[idx] = layers[idx]
