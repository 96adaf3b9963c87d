"""Torch implementations of the attention pieces the engine needs beside the untouched SDPA call.

These are the CPU path and the references for the Triton kernels in `vlm_efficient.kernels`."""

from __future__ import annotations

import dataclasses

import torch


def repeat_kv(key: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, N, d] -> [B, Hkv * groups, N, d], query head h reading key head h // groups."""
    return key if groups == 1 else key.repeat_interleave(groups, dim=1)


def allowed_keys(attention_mask: torch.Tensor | None, rows: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Boolean [B, 1 or H, S, kv] of the keys each selected query row may see.

    `attention_mask` is what the attention function received: None (causal, no padding), a boolean mask or an
    additive float mask [B, 1|H, q, kv]. `rows` [B, S] are query indices (-1 = unused slot)."""
    batch = rows.shape[0]
    safe = rows.clamp(min=0)
    if attention_mask is None:
        keys = torch.arange(kv_len, device=rows.device)
        return (keys[None, None, None, :] <= safe[:, None, :, None] + (kv_len - q_len)).expand(batch, 1, -1, -1)
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    mask = mask.expand(batch, -1, -1, -1)
    return mask.gather(2, safe[:, None, :, None].expand(-1, mask.shape[1], -1, kv_len))


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor,
    *,
    per_head: bool = False,
) -> torch.Tensor:
    """Attention that each key receives from the selected query rows, averaged over those rows.

    query [B, Hq, q, d], key [B, Hkv, kv, d] (not repeated for GQA), rows [B, S] (-1 = unused). Softmax in fp32 over
    only the selected rows: the N x N matrix is never formed. Returns [B, Hq, kv] if per_head else the mean over heads
    [B, kv]."""
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    keys = repeat_kv(key, heads // key.shape[1]).float()
    picked = query.gather(2, rows.clamp(min=0)[:, None, :, None].expand(batch, heads, -1, dim)).float()
    logits = (picked @ keys.transpose(-1, -2)) * scaling  # [B, H, S, kv]
    allowed = allowed_keys(attention_mask, rows, q_len, kv_len)
    logits = logits.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = logits.softmax(-1) * allowed  # a fully masked row contributes nothing
    used = (rows >= 0).float()
    probs = probs * used[:, None, :, None]
    received = probs.sum(2) / used.sum(1).clamp(min=1)[:, None, None]
    return received if per_head else received.mean(1)


def _marked_pairs(edits, name: str) -> torch.Tensor | None:
    """The union over edits of their boolean `name` pairs (each limited to the edit's rows), or None."""
    union = None
    for edit in edits:
        pairs = getattr(edit, name, None)
        if pairs is None:
            continue
        if edit.rows is not None:
            pairs = pairs & edit.rows[:, None, :, None]
        union = pairs if union is None else union | pairs
    return union


def edited_attention(query, key, value, attention_mask, scaling: float, edits, unrotated=None, weights: bool = False,
                     query_rows: torch.Tensor | None = None, q_total: int | None = None):
    """Dense attention with AttentionEdits applied in order; the torch reference of the group-attention kernel.

    query [B, Hq, q, d], key/value [B, Hkv, kv, d]; returns [B, q, Hq, d] like HF attention functions (and, with
    `weights`, the probabilities [B, Hq, q, kv] after every edit, in the query's dtype).
    `unrotated` = (query [B, Hq, q, d], key [B, Hkv, m, d]) before rotary position, m <= kv: the pre-rotary copies of
    this call's query rows and of the FIRST m keys (the engine's: the prompt's keys in decoding). Pairs an edit marks
    `unrotated` take their base logit from them; marked pairs on keys beyond m keep the rotated logit.
    Order (AttentionEdit's docstring): base logits (unrotated pairs), scale / |a| / bias per edit, allowed =
    (causal & padding | any `allow`) & every `mask`, fp32 softmax, post_softmax per edit, observe. `allow` is trusted
    to name valid keys only (the engine ANDs it with them). `query_rows` [B, q] with `q_total`: the given query rows are these
    rows of a call of q_total rows (edited_rows_attention), for the causal and padding mask."""
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    groups = heads // key.shape[1]
    logits = (query.float() @ repeat_kv(key, groups).float().transpose(-1, -2)) * scaling
    pre_rotary = _marked_pairs(edits, "unrotated")
    if pre_rotary is not None:
        if unrotated is None:
            raise ValueError(
                "an AttentionEdit marks unrotated pairs but no pre-rotary query and key were supplied: the method "
                "must declare uses_unrotated(layer) for this layer so the engine captures them"
            )
        plain_query, plain_key = unrotated
        known = plain_key.shape[2]
        plain = (plain_query.float() @ repeat_kv(plain_key, groups).float().transpose(-1, -2)) * scaling
        head = torch.where(pre_rotary[..., :known], plain, logits[..., :known])
        logits = torch.cat([head, logits[..., known:]], dim=-1) if known < kv_len else head
    rows = torch.arange(q_len, device=query.device).expand(batch, -1) if query_rows is None else query_rows
    allowed = allowed_keys(attention_mask, rows, q_total or q_len, kv_len).expand(batch, heads, -1, -1)
    blocked = None
    for edit in edits:
        edited = logits
        if edit.logit_scale is not None:
            edited = edited * edit.logit_scale
        if edit.logit_abs is not None:
            edited = edited + edit.logit_abs * logits.abs()
        if edit.logit_bias is not None:
            edited = edited + edit.logit_bias
        logits = edited if edit.rows is None else torch.where(edit.rows[:, None, :, None], edited, logits)
        if edit.mask is not None:
            removed = ~edit.mask if edit.rows is None else ~edit.mask & edit.rows[:, None, :, None]
            blocked = removed if blocked is None else blocked | removed
    added = _marked_pairs(edits, "allow")
    if added is not None:
        allowed = allowed | added
    if blocked is not None:
        allowed = allowed & ~blocked
    probs = logits.masked_fill(~allowed, torch.finfo(torch.float32).min).softmax(-1) * allowed
    for edit in edits:
        if edit.post_softmax is not None:
            changed = edit.post_softmax(probs)
            probs = changed if edit.rows is None else torch.where(edit.rows[:, None, :, None], changed, probs)
    observers = [edit.observe for edit in edits if edit.observe is not None]
    if observers:
        head_mean = probs.mean(1)
        for observe in observers:
            observe(head_mean)
    out = (probs @ repeat_kv(value, groups).float()).to(query.dtype).transpose(1, 2).contiguous()
    return (out, probs.to(query.dtype)) if weights else out


def rows_edited(edits) -> torch.Tensor | None:
    """[B, q] the query rows these edits change, where every edit limits itself to its `rows` (no added or pre-rotary
    pairs, and any post_softmax works row by row); else None."""
    union = None
    for edit in edits:
        if (edit.rows is None or edit.allow is not None or edit.unrotated is not None or edit.observe is not None
                or (edit.post_softmax is not None and not edit.rowwise_post)):  # fmt: skip
            return None
        union = edit.rows if union is None else union | edit.rows
    return union


def edited_rows_attention(query, key, value, attention_mask, scaling: float, edits, rows: torch.Tensor, width: int,
                          unedited: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """edited_attention's output at the cost of the edited rows only: `unedited` [B, q, Hq, d] (the call's plain
    attention) with the `rows` [B, q] that the edits change (at most `width` per sample) recomputed by the dense edited
    attention. The edits must allow it (rows_edited)."""
    batch, heads, q_len, dim = query.shape
    if width == 0:
        return unedited
    order = torch.sort((~rows).to(torch.int8), dim=1, stable=True).indices[:, :width]  # each sample's edited rows first

    def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or tensor.dim() != 4 or tensor.shape[2] != q_len:
            return tensor  # None, or the same for every row
        tensor = tensor.expand(batch, -1, -1, -1)
        return tensor.gather(2, order[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3]))

    picked = [dataclasses.replace(edit, rows=edit.rows.gather(1, order), logit_scale=take(edit.logit_scale),
                                  logit_abs=take(edit.logit_abs), logit_bias=take(edit.logit_bias),
                                  mask=take(edit.mask)) for edit in edits]  # fmt: skip
    queries = query.gather(2, order[:, None, :, None].expand(-1, heads, -1, dim))
    out = edited_attention(queries, key, value, attention_mask, scaling, picked, query_rows=order, q_total=q_len)
    return unedited.scatter(1, order[:, :, None, None].expand(-1, -1, heads, dim), out)
