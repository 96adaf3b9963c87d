"""VMTC, visual-modality token compression (Yang et al., 2024, "Enhancing Instruction-Following Capability of
Visual-Language Models by Reducing Image Redundancy"; no public code).

Per image (LLaVA-NeXT: per tile), before the LLM: an importance score from the vision tower's attention ([CLS]
attention in the feature layer; on Qwen towers the attention each token receives) splits the tokens into primary
tokens, which stay, and redundant ones, which are condensed: K-Means on cosine similarity groups them into clusters and
each cluster is averaged into one token, written into the row of its member with the highest score (which keeps its
position). Kept tokens = (1 - R) of the image: `primary` of them primary, the rest one per cluster. The paper gives no
counts; R = 0.75 (LLaVA-1.5's 576 -> 144, the level of its down-sampling pilot) and primary = 0.5 are ours. K-Means
starts from evenly spaced redundant tokens and runs `iterations` steps. Like VisionZip, the merge is in the ViT feature
space on CLIP towers and on the projected features on Qwen towers. CMAI, the paper's second part, is the `cmai`
method (heads/cmai.py): use "vmtc+cmai".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.registry import register_method
from vlm_efficient.selection import check_drop_ratio, cluster_means, keep_count, row_sums, top_k_mask

from .vision_capture import VisionTowerMethod, grid_sizes


def cosine_kmeans(x: torch.Tensor, clusters: int, iterations: int) -> torch.Tensor:
    """Cluster of each row of x [..., m, d] (spherical K-Means from evenly spaced rows; every leading index apart)."""
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    starts = torch.linspace(0, x.shape[-2] - 1, clusters, device=x.device).round().long()
    centres = unit[..., starts, :]
    for _ in range(iterations):
        assignment = (unit @ centres.transpose(-1, -2)).argmax(-1)
        sums = row_sums(unit, assignment, clusters)
        empty = sums.norm(dim=-1, keepdim=True) == 0
        centres = torch.where(empty, centres, torch.nn.functional.normalize(sums, dim=-1))
    return (unit @ centres.transpose(-1, -2)).argmax(-1)


@register_method
@dataclass
class VMTC(VisionTowerMethod):
    name = "vmtc"
    summary = "keep primary tokens by vision attention, condense the redundant ones by K-Means and merging"
    merge_in_vit = True

    ratio: float = 0.75
    primary: float = 0.5
    iterations: int = 10

    def bind(self, engine) -> None:
        check_drop_ratio("vmtc", self.ratio)
        if not 0 < self.primary <= 1 or self.iterations < 1:
            raise ValueError("vmtc: primary must be in (0, 1] and iterations >= 1")
        super().bind(engine)

    def choose(self, score, metric, features, grid_size=None):
        keep, merged = self.choose_tiles(score[None], metric[None], None if features is None else features[None],
                                         grid_size)  # fmt: skip
        return keep[0], None if merged is None else merged[0]

    def choose_tiles(self, scores, metrics, features, grid_size=None):
        """Every tile at once when their grid sizes agree (LLaVA's tiles; known on the host): the primary tokens by
        score, then the redundant ones condensed by K-Means and merging, batched over the tiles."""
        grid = torch.isfinite(scores)
        sizes = grid_sizes(scores, grid_size)
        if len(set(sizes)) > 1:
            return super().choose_tiles(scores, metrics, features)
        tiles, n = scores.shape
        total = keep_count(sizes[0], self.ratio)
        primary_count = min(max(int(total * self.primary + 0.5), 1), sizes[0])
        primary = top_k_mask(scores, grid, torch.full((tiles,), primary_count, device=scores.device))
        keep = primary | ~grid
        redundant_count = sizes[0] - primary_count
        clusters = min(total - primary_count, redundant_count)
        if clusters <= 0 or features is None:
            return keep, None
        width = features.shape[-1]
        # each tile's redundant positions in ascending order (a stable sort puts them first)
        redundant = (grid & ~primary).to(torch.uint8).sort(dim=1, descending=True, stable=True).indices
        redundant = redundant[:, :redundant_count]
        assignment = cosine_kmeans(features.gather(1, redundant[..., None].expand(-1, -1, width)), clusters,
                                   self.iterations)
        # the tiles' clusters condensed as one flat problem: rows and cluster ids offset per tile
        offsets = torch.arange(tiles, device=features.device)[:, None]
        hosts, means = condense(features.reshape(tiles * n, width), scores.reshape(-1),
                                (redundant + offsets * n).flatten(), (assignment + offsets * clusters).flatten(),
                                tiles * clusters)
        # one spare row past the last takes the empty clusters' writes (no host read to leave them out)
        merged = torch.cat([features.reshape(tiles * n, width), features.new_zeros(1, width)])
        merged[hosts] = means
        keep = torch.cat([keep.reshape(-1), keep.new_zeros(1)]).index_fill_(0, hosts, True)  # no scalar copied in
        return keep[:-1].view(tiles, n), merged[:-1].view(tiles, n, width)


def condense(features, score, members, assignment, clusters: int):
    """Every cluster of `members` (rows of features) averaged into the row of its highest-scoring member, the first
    such row on ties: -> (host rows [clusters], their merged features); an empty cluster's host row is
    features.shape[0], one past the last. All clusters at once and no host read: a loop over clusters reads the
    device per cluster, hundreds of times per image, and an encoding captured in a CUDA graph may read it never."""
    member_score = score[members].float()
    best = member_score.new_full((clusters,), float("-inf")).scatter_reduce(0, assignment, member_score, "amax")
    past_last = features.shape[0]
    candidates = torch.where(member_score == best[assignment], members, past_last)
    first = torch.full((clusters,), past_last, dtype=members.dtype, device=members.device)
    first = first.scatter_reduce(0, assignment, candidates, "amin")
    means, _ = cluster_means(features[members], assignment, clusters)
    return first, means.to(features.dtype)
