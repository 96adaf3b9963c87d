"""Slow, obviously-correct references for the engine's tests.

`masked_reference`: dense attention (scores materialised, plain softmax) in which chosen layers may only attend to
chosen key positions. A pruning method run with the KV cache must equal this cache-free forward over prompt +
generated tokens, with the pruned positions masked out as keys from the pruning layer on."""

from __future__ import annotations

import contextlib
import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

REFERENCE = "vlm_efficient_test_reference"
_KEY_MASKS: dict[int, torch.Tensor] = {}  # layer -> [B, kv] keys (or [B, q, kv] pairs) that layer may attend to
_LOGIT_FNS: dict[int, object] = {}  # layer -> fn(scores [B, H, q, kv] float64) -> scores
RECORDED: dict[int, dict[str, torch.Tensor]] = {}  # layer -> probabilities and keys of the last reference call


def dense_attention(query, key, value, attention_mask, scaling, *, logits=None, pairs=None, post=None,
                    zero_blocked=False, allow=None, unrotated=None):
    """The obviously-correct attention: float64 scores, the causal / padding mask, then optional edits in this
    order: `unrotated` = (marked, query0, key0): the marked pairs' scores (bool, broadcast to [B, H, q, kv]) from
    the pre-rotary query0 [B, H, q, d] and key0 [B, Hkv, kv, d] (Vista-LLaMA); `logits(scores)`; `allow` (bool pairs
    of valid keys) ORed into the mask; `pairs` (bool) ANDed into it; softmax (blocked entries zeroed if
    `zero_blocked`); `post(probs)`. Returns (output [B, q, H, d], probs before post, after)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).double()
    value = value.repeat_interleave(groups, dim=1).double()
    scores = (query.double() @ key.transpose(-1, -2)) * scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)[None, None]
    else:
        allowed = attention_mask.bool()
    if unrotated is not None:
        marked, query0, key0 = unrotated
        key0 = key0.repeat_interleave(groups, dim=1).double()
        scores = torch.where(marked, (query0.double() @ key0.transpose(-1, -2)) * scaling, scores)
    if logits is not None:
        scores = logits(scores)
    if allow is not None:
        allowed = allowed | allow
    if pairs is not None:
        allowed = allowed & pairs
    probs = scores.masked_fill(~allowed, torch.finfo(torch.float64).min).softmax(-1)
    if zero_blocked:
        probs = probs * allowed
    final = probs if post is None else post(probs)
    return (final @ value).to(query.dtype).transpose(1, 2).contiguous(), probs, final


def unrotate(module, query, key, position_embeddings):
    """The query [B, H, q, d] and key [B, Hkv, kv, d] of a cache-free call before rotary position, by the inverse
    rotation: the model's own rotary function with -sin (a rotation by -theta; default rope, no attention scaling).
    Independent of how the engine gets them (hooks on the modules before rotary)."""
    modeling = sys.modules[type(module).__module__]
    cos, sin = (t.double() for t in position_embeddings)
    query, key = query.double(), key.double()
    multimodal = getattr(modeling, "apply_multimodal_rotary_pos_emb", None)
    if multimodal is not None and cos.dim() == 4:  # transformers versions that assemble M-RoPE in the attention
        section = module.config.rope_parameters["mrope_section"]
        return multimodal(query, key, cos, -sin, section)
    return modeling.apply_rotary_pos_emb(query, key, cos, -sin)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """The text model runs attention implementation `name` inside the block."""
    config = model.config.get_text_config()
    original = config._attn_implementation
    model.set_attn_implementation({"text_config": name})
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": original})


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    extra = _KEY_MASKS.get(module.layer_idx)
    if extra is not None:
        q_len = query.shape[2]
        extra = extra[:, None, None, :] if extra.dim() == 2 else extra[:, None, -q_len:, :]
    out, probs, _ = dense_attention(
        query, key, value, attention_mask, scaling, logits=_LOGIT_FNS.get(module.layer_idx), pairs=extra
    )
    RECORDED[module.layer_idx] = {"probs": probs, "keys": key.double()}
    return out, None


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


@contextlib.contextmanager
def masked_reference(model, key_masks: dict[int, torch.Tensor], logit_fns: dict | None = None):
    """Run `model` (unwrapped) with the dense reference attention, per-layer key masks and logit transforms."""
    _KEY_MASKS.clear()
    _KEY_MASKS.update(key_masks)
    _LOGIT_FNS.clear()
    _LOGIT_FNS.update(logit_fns or {})
    RECORDED.clear()
    try:
        with attention_implementation(model, REFERENCE):
            yield RECORDED
    finally:
        _KEY_MASKS.clear()
        _LOGIT_FNS.clear()


def extend_inputs(batch, sequences: torch.Tensor) -> dict:
    """The processor's inputs extended to `sequences` (prompt + generated): the attention mask and Qwen's
    mm_token_type_ids grow with the new (text) tokens."""
    inputs = dict(batch)
    new = sequences.shape[1] - batch["input_ids"].shape[1]
    inputs["input_ids"] = sequences
    ones = torch.ones(sequences.shape[0], new, dtype=batch["attention_mask"].dtype)
    inputs["attention_mask"] = torch.cat([batch["attention_mask"], ones], dim=1)
    if "mm_token_type_ids" in inputs:
        zeros = torch.zeros(sequences.shape[0], new, dtype=batch["mm_token_type_ids"].dtype)
        inputs["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], zeros], dim=1)
    return inputs


def fastv_kept_positions(attentions, input_ids, attention_mask, image_token_id, layer, ratio, scoring="last"):
    """FastV's formula, directly: rank each sample's image tokens by the head-averaged attention they receive in
    layer K-1 from the last token (or the mean over all / text query rows) and keep the top round((1-R) n)."""
    kept = []
    probs = attentions[layer - 1].double()  # [B, H, N, N]
    for b in range(input_ids.shape[0]):
        valid = attention_mask[b].bool()
        image = (input_ids[b] == image_token_id) & valid
        if scoring == "last":
            rows = [input_ids.shape[1] - 1]
        elif scoring == "all":
            rows = valid.nonzero().flatten().tolist()
        else:
            rows = (valid & ~image).nonzero().flatten().tolist()
        score = probs[b, :, rows, :].mean(1).mean(0)  # mean over query rows, then heads
        positions = image.nonzero().flatten()
        keep = int(positions.numel() * (1 - ratio) + 0.5)
        order = sorted(range(positions.numel()), key=lambda i: (-float(score[positions[i]]), i))[:keep]
        kept.append(sorted(positions[order].tolist()))
    return kept


def kept_key_masks(run, total_length: int, num_layers: int) -> dict[int, torch.Tensor]:
    """Per layer, the keys a pruned model's layer holds: its kept prompt positions plus every generated token."""
    masks = {}
    prompt = run.prompt_length
    for layer in range(num_layers):
        positions = run.layer_positions.get(layer)
        if positions is None:
            continue
        allowed = torch.zeros(positions.shape[0], total_length, dtype=torch.bool)
        allowed[:, prompt:] = True
        for b in range(positions.shape[0]):
            allowed[b, positions[b][positions[b] >= 0]] = True
        masks[layer] = allowed
    return masks
