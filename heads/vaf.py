"""VAF, visual amplification fusion (Yin et al., 2025, "ClearSight: Visual Signal Enhancement for Object
Hallucination Mitigation in Multimodal Large Language Models").

In the middle layers (9..14 of LLaVA-1.5-7B's 32, scaled to the model's depth), all heads: the scaled logits of
image keys are multiplied by 1.15 and those of the system prompt (the text before the first image) by 0.95, before
the softmax. As in the public code, in prefill only the text rows after the image change (the code: rows after
SYS_LEN + IMG_LEN); every decoding row changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.kernels.api import GroupSpec
from vlm_efficient.method import KernelEdit, Method
from vlm_efficient.registry import register_method

from .common import has_image, parse_layers, scaled_range, text_after_image


def vaf_groups(num_heads: int, weights, heads=None) -> GroupSpec:
    """VAF's (and AdaptVis') term as kernel 3's tables: logits of keys in group g multiplied by weights[g] in `heads`
    (None: all)."""
    weights = torch.as_tensor(weights, dtype=torch.float32)
    return GroupSpec(num_heads, weights.numel(), logit_scale=weights).on_heads(heads)


@register_method
@dataclass
class VAF(Method):
    name = "vaf"
    summary = "ClearSight: image-key logits x1.15, system-prompt logits x0.95 in the middle layers"
    reported = "CHAIR_S / CHAIR_I down, POPE F1 up (LLaVA-1.5, LLaVA-NeXT)"

    image_scale: float = 1.15
    system_scale: float = 0.95
    layers: str = ""  # default 9..14 of 32, scaled

    def bind(self, engine) -> None:
        if self.image_scale <= 0 or self.system_scale <= 0:
            raise ValueError(f"vaf: image_scale={self.image_scale} and system_scale={self.system_scale} must be > 0")
        self.chosen = parse_layers("vaf", self.layers, engine.num_layers, scaled_range(9, 14, engine.num_layers))
        heads = engine.text_config.num_attention_heads
        self.groups = vaf_groups(heads, [1.0, self.image_scale, self.system_scale])  # other, image, system

    def kernel_edit(self, layer, run, prefill):
        if layer not in self.chosen or not has_image(run):
            return None
        layout = run.layout
        groups = torch.where(layout.visual, 1, torch.where(layout.before_visual_text, 2, 0))
        return KernelEdit(spec=self.groups, groups=groups, rows=text_after_image(layout))
