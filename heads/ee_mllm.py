"""EE-MLLM composite attention (Ma et al., 2024, "EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large
Language Model"): no self-attention within the visual tokens, the LLM's attention weights reused. Our reading: an
image row attends only to itself, so its attention output is o_proj(v_proj(x)), the layer's weights reused as a
per-token map; text rows are unchanged and still attend to the image. (NAAViT differs: its image rows also see the
text before them.) The paper trains with it; training-free (EE-MLLM-F) it costs quality: measure it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_efficient.kernels.api import ROLE_IMAGE, ROLE_LAST, ROLE_MIDDLE, ROLE_PREFIX, ROLE_QUESTION, MaskSpec
from vlm_efficient.registry import register_method

from .common import PrefillMask


@register_method
@dataclass
class EEMLLM(PrefillMask):
    name = "ee_mllm"
    summary = "mask: image rows attend only to themselves (composite attention, weights reused)"

    def mask_spec(self, run):
        # no image -> other image edge (NAAViT's rule) and no image -> text edge
        text = (ROLE_PREFIX, ROLE_MIDDLE, ROLE_QUESTION, ROLE_LAST)
        return MaskSpec(image_image="none", knockout=tuple((ROLE_IMAGE, role) for role in text))
