"""NAAViT (SAISA, Yuan et al., 2024, "SAISA: Towards Multimodal Large Language Models with Both Training and
Inference Efficiency"): no attention among image tokens. An image token attends to the text before it and to
itself; text rows are unchanged. SAISA trains the model with this mask (-66% FLOPs); used training-free on a model
trained with full attention it lowers quality: measure it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_efficient.kernels.api import MaskSpec
from vlm_efficient.registry import register_method

from .common import PrefillMask


@register_method
@dataclass
class NAAViT(PrefillMask):
    name = "naavit"
    summary = "mask: no attention among image tokens (each sees the text before it and itself)"

    def mask_spec(self, run):
        return MaskSpec.naavit()
