"""FasterVLM (Zhang et al., 2024, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster").

Before the LLM, keep each image's (LLaVA-NeXT: each tile's) top (1 - R) patch tokens by the attention the vision
tower's [CLS] token pays them in the feature layer (vision_feature_layer, -2), averaged over heads; LLaVA-NeXT's row
newlines always stay (public code). Selection only, no merging. Needs a [CLS] token: Qwen towers have none (there
VisionZip's attention-mean variant is the counterpart).

Positions: the authors' code (github.com/Theia-4869/FasterVLM) feeds the kept tokens with contiguous positions
(`positions=renumber`); the default keeps their original positions (`positions=original`), like every other method
here, chosen by measurement: on the testbed (CPU, 100 POPE + 100 VQA questions,
results/testbed_positions_cpu/) VQA accuracy at 75% / 89% pruning is 0.73 / 0.58 with original positions and
0.61 / 0.51 renumbered (POPE F1 0.970 / 0.905 in both).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_efficient.adapters import families_with
from vlm_efficient.registry import register_method
from vlm_efficient.selection import check_drop_ratio, check_positions, keep_count

from .vision_capture import VisionTowerMethod, grid_counts, top


@register_method
@dataclass
class FasterVLM(VisionTowerMethod):
    name = "fastervlm"
    summary = "keep each image's patches with the highest vision [CLS] attention, before the LLM"

    ratio: float = 0.75
    positions: str = "original"  # or renumber: contiguous positions for the kept tokens, as the authors' code

    def bind(self, engine) -> None:
        check_drop_ratio("fastervlm", self.ratio)
        check_positions("fastervlm", self.positions, engine)
        if not engine.adapter.vision_cls_token:
            raise ValueError(
                "fastervlm: ranks by the vision tower's [CLS] attention and this vision tower has no [CLS] token "
                f"(families with one: {families_with(lambda adapter: adapter.vision_cls_token)}); use visionzip "
                "(attention-mean variant) for Qwen models"
            )
        super().bind(engine)

    def tile_kept(self, grid_size: int) -> int:
        return keep_count(grid_size, self.ratio)

    def choose(self, score, metric, features, grid_size=None):
        grid, count = grid_counts(score, self.ratio, grid_size)
        return top(score, grid, count) | ~grid, None
