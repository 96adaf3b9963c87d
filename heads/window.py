"""2-D neighbour window among image tokens (YOPO, Zhang et al., 2024, "Treat Visual Tokens as Text? But Your MLLM
Only Needs Fewer Efforts to See"): an image token attends to the image tokens of the same image (and the same
LLaVA-NeXT grid) within `size` cells on the 2-D grid (Chebyshev distance, layout.coords), and to all text before it.
Still causal: a token sees its earlier neighbours only. Tokens without a grid cell (LLaVA-NeXT row newlines, a
[CLS] feature) see no image token but themselves. YOPO fine-tunes with it; training-free it costs quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.kernels.api import MaskSpec
from vlm_efficient.method import at_positions
from vlm_efficient.registry import register_method

from .common import PrefillMask, same_token


@register_method
@dataclass
class NeighbourWindow(PrefillMask):
    name = "window"
    summary = "mask: image tokens see only image tokens within a 2-D window on their grid"

    size: int = 1

    def bind(self, engine) -> None:
        if self.size < 0:
            raise ValueError(f"window: size={self.size} must be >= 0 (cells on each side)")
        super().bind(engine)

    def allowed(self, run, context):
        layout = run.layout
        q_coords = at_positions(layout.coords, context.query_positions, -1)[:, :, None]
        k_coords = at_positions(layout.coords, context.key_positions, -1)[:, None, :]
        q_image = at_positions(layout.image_index, context.query_positions, -1)[:, :, None]
        k_image = at_positions(layout.image_index, context.key_positions, -1)[:, None, :]
        near = (
            (q_image == k_image)
            & (q_coords[..., 0] == k_coords[..., 0])
            & (q_coords[..., 0] >= 0)
            & ((q_coords[..., 1:] - k_coords[..., 1:]).abs().amax(-1) <= self.size)
        )
        visual = layout.visual
        among_images = context.queries_where(visual)[:, :, None] & context.keys_where(visual)[:, None, :]
        return ~among_images | near | same_token(context)

    def mask_spec(self, run):
        return MaskSpec.neighbor_window(self.size, self.size, causal_window=True)
