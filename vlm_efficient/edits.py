"""The dense form of a structured edit: `dense_edit` turns a method's KernelEdit (per original prompt position) into
the AttentionEdit of one attention call (over its query rows and cached keys), which the engine's dense torch path
runs wherever the kernels do not: kernels off, a layer where another method has no structured form, a composition no
kernel runs, output_attentions, the fast path's dense decoding. The formulas are the kernels' own torch references
(kernels/group_attention.py's tables and redistribution, kernels/layout.py's mask rule), so the dense path and the
kernels compute one definition.

    spec + groups    key groups at each key's original position (generated keys and slot padding: group 0); the
                     GroupSpec's scale / |a| / bias tables (+ key_bias) as the logit terms, its keep / receive
                     redistribution under its row condition as the post_softmax
    head_scale       each head's probabilities multiplied by its factor after the redistribution (= its output)
    mask             the MaskSpec rule on the kernels' layout of the cached keys (prefill only): the pairs it blocks
                     become `mask`, the later keys it opens `allow`
    rows             the prompt rows the spec / head_scale change (prefill); every decoding row is edited
"""

from __future__ import annotations

import dataclasses
import typing

import torch

from .kernel_plan import has_post, token_layout
from .method import AttentionContext, AttentionEdit, KernelEdit, at_positions

if typing.TYPE_CHECKING:
    from .run_state import RunState


def dense_edit(edit: KernelEdit, run: RunState, context: AttentionContext) -> AttentionEdit:
    """`edit` as the AttentionEdit of the call `context` describes (KernelEdit's docstring has the meaning)."""
    from .kernels.group_attention import IDENTITY, group_redistribution, key_table

    device = context.key_positions.device
    fields: dict = {}
    posts = []
    if edit.spec is not None:
        spec = edit.spec
        if edit.groups is None:
            raise ValueError("KernelEdit: a GroupSpec needs `groups` (each prompt position's key group)")
        if spec.num_heads != context.num_heads:
            raise ValueError(f"KernelEdit: the GroupSpec has {spec.num_heads} heads, the layer {context.num_heads}")
        groups = at_positions(edit.groups, context.key_positions, 0)
        names = ("logit_scale", "logit_abs", "logit_bias")  # only the terms that change something (host tables)
        fields = {name: key_table(table, groups) for name, table, identity in zip(names, spec.tables(), IDENTITY)
                  if bool((table != identity).any())}
        if edit.key_bias is not None:
            key_bias = at_positions(edit.key_bias.float(), context.key_positions, 0.0)[:, None, None, :]
            fields["logit_bias"] = fields["logit_bias"] + key_bias if "logit_bias" in fields else key_bias
        if has_post(spec):
            posts.append(lambda probs: group_redistribution(probs, groups, spec))
    if edit.head_scale is not None:
        factors = edit.head_scale.to(device=device, dtype=torch.float32)[:, :, None, None]
        posts.append(lambda probs: probs * factors)
    if edit.mask is not None:
        if not context.prefill:
            raise ValueError("KernelEdit: a MaskSpec edits the prefill only; return no mask for decoding calls")
        if edit.rows is not None:
            raise ValueError("KernelEdit: a MaskSpec applies to every row; give no `rows` with it")
        fields.update(_mask_fields(edit.mask, run, context))
    if posts:
        fields["post_softmax"] = posts[0] if len(posts) == 1 else lambda probs: posts[1](posts[0](probs))
    rows = context.queries_where(edit.rows) if edit.rows is not None and context.prefill else None
    return AttentionEdit(rows=rows, rowwise_post=True, **fields)  # its post-softmax terms are per key and head


def _mask_fields(spec, run: RunState, context: AttentionContext) -> dict:
    """{"mask": the pairs the rule blocks whatever their order (False), "allow": the later keys it adds, if any}
    [B, 1, q, kv] on the kernels' layout of this call's keys, the queries being the last q of them (as the kernels
    take it). The mask leaves causality to the model's own mask, which a family may widen (Gemma3's image blocks)."""
    from .kernels.api import MaskSpec, dense_allowed

    keys = context.key_positions
    q_len, kv_len = context.query_positions.shape[1], keys.shape[1]
    blocking = dataclasses.replace(spec, causal=False, window_causal=False)
    fields = {"mask": dense_allowed(token_layout(run, keys), blocking, kv_len - q_len, kv_len)[:, None]}
    if not spec.causal or (spec.image_image == "window" and not spec.window_causal) or spec.mutual_roles:
        layout = token_layout(run, keys, at_positions(run.layout.valid, keys, False))
        causal = dense_allowed(layout, MaskSpec(), kv_len - q_len, kv_len)
        fields["allow"] = (dense_allowed(layout, spec, kv_len - q_len, kv_len) & ~causal)[:, None]
    return fields
