"""NAAViT (SAISA, Yuan et al., 2024, "SAISA: Towards Multimodal Large Language Models with Both Training and
Inference Efficiency"): no attention among image tokens. An image token attends to the text before it and to
itself; text rows are unchanged. SAISA trains the model with this mask (-66% FLOPs); used training-free on a model
trained with full attention it lowers quality: measure it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_efficient.kernels.api import MaskSpec
from vlm_efficient.registry import register_method

from .common import PrefillMask, same_token


@register_method
@dataclass
class NAAViT(PrefillMask):
    name = "naavit"
    summary = "mask: no attention among image tokens (each sees the text before it and itself)"

    def allowed(self, run, context):
        visual = run.layout.visual
        among_images = context.queries_where(visual)[:, :, None] & context.keys_where(visual)[:, None, :]
        return ~(among_images & ~same_token(context))

    def mask_spec(self, run):
        return MaskSpec.naavit()
