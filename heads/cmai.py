"""CMAI, cross-modal attention inhibition (from the VMTC + CMAI paper in REFERENCE.md section 1): a text token's
focus on an image token is its text->image attention aggregated through its text->text attention,
    F[t, j] = sum over text tokens t' of A[t, t'] A[t', j]
(t' = t included), per head; text->image pairs with a low focus score are inhibited. Our reading of "low": below
`threshold` x the row's mean focus over the image tokens it can see (threshold = 1: below average). The scores come
from the layer's own attention; inhibiting a pair and renormalising the row equals masking it before the softmax.
Prefill rows only (the text rows after the first image); decoding rows keep their attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.method import AttentionEdit
from vlm_efficient.registry import register_method

from .common import PrefillMask, has_image, text_after_image


@register_method
@dataclass
class CMAI(PrefillMask):
    name = "cmai"
    summary = "inhibit text->image pairs whose focus score (text->image through text->text) is below the row mean"

    threshold: float = 1.0

    def bind(self, engine) -> None:
        if self.threshold < 0:
            raise ValueError(f"cmai: threshold={self.threshold} must be >= 0")
        super().bind(engine)

    def attention_edit(self, layer, run, context):
        if not context.prefill or layer not in self.chosen or not has_image(run):
            return None
        layout = run.layout
        rows = context.queries_where(text_after_image(layout))[:, None, :, None]
        text = context.keys_where(layout.text)[:, None, None, :]
        image = context.keys_where(layout.visual)[:, None, None, :]
        causal = context.key_positions[:, None, :] <= context.query_positions[:, :, None]
        seen = image & causal[:, None]

        def post_softmax(probs):
            # prefill: rows and keys are the same tokens, so key t' has attention row probs[..., t', :]
            focus = (probs * text) @ (probs * image)
            mean = (focus * seen).sum(-1, keepdim=True) / seen.sum(-1, keepdim=True).clamp(min=1)
            blocked = seen & rows & (focus < self.threshold * mean)
            kept = probs.masked_fill(blocked, 0.0)
            total = kept.sum(-1, keepdim=True)
            return torch.where(total > 0, kept / total.clamp_min(1e-30), probs)

        return AttentionEdit(post_softmax=post_softmax)
