"""2-D neighbour window among image tokens (YOPO, Zhang et al., 2024, "Treat Visual Tokens as Text? But Your MLLM
Only Needs Fewer Efforts to See"): an image token attends to the image tokens of the same image (and the same
LLaVA-NeXT grid) within `size` cells on the 2-D grid (Chebyshev distance, layout.coords), and to all text before it.
Still causal: a token sees its earlier neighbours only. Tokens without a grid cell (LLaVA-NeXT row newlines, a
[CLS] feature) see no image token but themselves. YOPO fine-tunes with it; training-free it costs quality.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_efficient.kernels.api import MaskSpec
from vlm_efficient.registry import register_method

from .common import PrefillMask


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

    def mask_spec(self, run):
        return MaskSpec.neighbor_window(self.size, self.size, causal_window=True)
