"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision Language Models").

Per image (LLaVA-NeXT: per tile), before the LLM, keep (1 - R) of the tokens: dominant tokens = the highest [CLS]
attention in the vision layer that produces the features (summed over heads), then contextual tokens: the remaining
tokens in order, every (remaining // contextual)-th one is a target, each other token joins the target whose
head-averaged key (the layer's "metric") is most cosine-similar, and a target becomes target + mean(joined tokens)
(public code). On CLIP towers the merge happens in the ViT feature space, before the projector (paper and code); the
projector's input rows of the contextual targets are rewritten, so the LLM gets projector(merged feature).

Qwen towers have no [CLS]: the authors' Qwen variant ranks by the attention each token receives (mean over queries and
heads) in the vision tower, splits dominant : contextual as 65 : 5 and merges the merger's outputs (the projected
features); that is `contextual=None`'s default there (10 : 54 on CLIP towers, the paper's 64-token setting). The
[CLS] token is dominant in the public code; here it reaches the LLM only with vision_feature_select_strategy='full'
(and then always stays), as the prompt has no placeholder for it otherwise.

Positions: the authors' LLaVA code (visionzip/clip_encoder.py, visionzip/llava_arch.py) feeds [CLS] and the
dominant tokens in position order, then the contextual ones in position order, with contiguous positions.
`positions=renumber` does the same: each image's kept tokens reach the LLM dominant first, then contextual, with
contiguous positions (LLaVA-NeXT: the base image's, then the high-resolution grid's, whose newlines stay in place with
its dominant tokens, and whose contextual tokens follow in grid order; the authors' high-resolution grid has no
newlines, puts the tiles' [CLS] before the contextual tokens and those tile by tile). The default keeps their
original positions and the prompt order, chosen by measurement: on the testbed (CPU, 100 POPE + 100 VQA questions,
results/testbed_positions_cpu/) VQA accuracy at 75% / 89% pruning is 0.80 / 0.68 with original positions and
0.65 / 0.53 renumbered in prompt order (POPE F1 0.970 / 0.938 against 0.970 / 0.928), and 0.64 / 0.55 renumbered in
the authors' order (POPE F1 0.970 / 0.938; results/testbed_positions_staged_cpu/visionzip_authors_order_sweep.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vlm_efficient.layout import IMAGE
from vlm_efficient.method import BEFORE_LLM, Selection
from vlm_efficient.registry import register_method
from vlm_efficient.selection import check_drop_ratio, check_positions, keep_count, row_sums, top_k_mask

from .vision_capture import VisionTowerMethod, grid_sizes


@register_method
@dataclass
class VisionZip(VisionTowerMethod):
    name = "visionzip"
    summary = "dominant tokens by vision attention + contextual tokens merged by key similarity, before the LLM"
    merge_in_vit = True

    ratio: float = 0.889
    contextual: float | None = None
    positions: str = "original"  # or renumber: dominant, then contextual tokens, contiguous positions (as the authors)

    def bind(self, engine) -> None:
        check_drop_ratio("visionzip", self.ratio)
        check_positions("visionzip", self.positions, engine)
        inside = [m.name for m in engine.methods if m.prune_layers() - {BEFORE_LLM}]
        if self.positions == "renumber" and inside:
            # the engine's masks for rows pruned inside the LLM order rows by original position
            raise ValueError(f"visionzip: positions=renumber reorders the image tokens, which {', '.join(inside)} "
                             "(pruning inside the LLM) cannot follow: use visionzip:positions=original with it")
        if self.contextual is not None and not 0 <= self.contextual < 1:
            raise ValueError(f"visionzip: contextual={self.contextual} must be in [0, 1): the contextual share")
        super().bind(engine)
        cls = self.capture.vision.has_cls  # the authors' split on CLIP towers, else their attention-mean variant's
        self.share = self.contextual if self.contextual is not None else (10 / 64 if cls else 5 / 70)

    def counts(self, total_grid: int) -> tuple[int, int]:
        """(dominant, contextual) tokens kept of an image's `total_grid` grid tokens."""
        total = keep_count(total_grid, self.ratio)
        contextual = min(int(total * self.share + 0.5), total - 1) if total > 1 else 0
        return total - contextual, contextual

    def tile_kept(self, grid_size: int) -> int:
        dominant, contextual = self.counts(grid_size)
        return dominant + min(contextual, grid_size - dominant)  # choose_tiles' targets: exactly that many

    def dominant(self, scores: torch.Tensor, grid_size: int) -> torch.Tensor:
        """[T, n]: the dominant tokens of tiles of `grid_size` grid tokens each (the highest scores; +inf always)."""
        grid = torch.isfinite(scores)
        count, _ = self.counts(grid_size)
        return top_k_mask(scores, grid, torch.full((scores.shape[0],), count, device=scores.device)) | ~grid

    def select_tokens(self, layer, run, hidden) -> Selection:
        selection = super().select_tokens(layer, run, hidden)
        if self.positions == "original":
            return selection
        return dataclasses.replace(selection, order=self.authors_order(run, hidden))

    def authors_order(self, run, hidden: torch.Tensor) -> torch.Tensor:
        """Selection.order of positions=renumber: every row in position order, except each image's contextual
        tokens, which follow the last row of their part (LLaVA-NeXT: base image, high-resolution grid)."""
        records = self.capture._first_call()["records"]
        dominant = [self.dominant(record["score"][None], record["grid_size"])[0] for record in records]
        device = hidden.device
        image = run.current(run.layout.kind, fill=0).to(device) == IMAGE
        contextual = image & ~self.capture.tile_rows(run, dominant, hidden)
        positions = run.current_positions().to(device)
        part = run.current(run.layout.coords[..., 0], fill=-1).to(device)
        index = run.current(run.layout.image_index, fill=-1).to(device)
        parts = 2 * (int(index.max()) + 1)
        segment = torch.where(image, 2 * index + (part != 0).long(), parts)
        end = torch.full((positions.shape[0], parts + 1), -1, device=device)
        end = end.scatter_reduce(1, segment, positions, "amax")
        return torch.where(contextual, 2 * end.gather(1, segment) + 1, 2 * positions)

    def choose(self, score, metric, features, grid_size=None):
        keep, merged = self.choose_tiles(score[None], metric[None], None if features is None else features[None],
                                         grid_size)  # fmt: skip
        return keep[0], None if merged is None else merged[0]

    def choose_tiles(self, scores, metrics, features, grid_size=None):
        """Every tile at once (their grid sizes known on the host): the dominant tokens by score, then among the rest
        in position order every (rest // contextual)-th one a target, the others merged into the target of the most
        similar metric (ties: the earliest target)."""
        grid = torch.isfinite(scores)
        sizes = grid_sizes(scores, grid_size)
        if len(set(sizes)) > 1:  # tiles of different grid sizes: one at a time
            return super().choose_tiles(scores, metrics, features)
        dominant_count, contextual = self.counts(sizes[0])
        keep = self.dominant(scores, sizes[0])
        dominant = keep & grid
        rest = grid & ~dominant
        rest_count = sizes[0] - dominant_count
        if contextual == 0 or rest_count == 0:
            return keep, None
        contextual = min(contextual, rest_count)
        step = max(1, rest_count // contextual)
        rank = rest.long().cumsum(1) - 1  # position among the rest
        target = rest & (rank % step == 0) & (rank < contextual * step)
        keep |= target
        if features is None:
            return keep, None
        others = rest & ~target
        unit = torch.nn.functional.normalize(metrics.float(), dim=-1)
        # each tile's `contextual` targets in position order (a stable sort puts them first)
        targets = target.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :contextual]
        target_units = unit.gather(1, targets[..., None].expand(-1, -1, unit.shape[-1]))
        # [T, n]: the position of each row's most similar target (meaningful on `others` rows)
        joined = targets.gather(1, (unit @ target_units.transpose(1, 2)).argmax(-1))
        weight = others.float()
        sums = row_sums(features.float() * weight[..., None], joined, features.shape[1])
        counts = torch.zeros_like(weight).scatter_add_(1, joined, weight).clamp(min=1)  # whole numbers: exact
        added = (features.float() + sums / counts[..., None]).to(features.dtype)
        return keep, torch.where(target[..., None], added, features)
