"""Baselines that recent benchmarks (UniPruneBench, VTC-Bench) find strong: report them beside every method.

- random: keep a uniformly random (1 - R) of each image's tokens, before the LLM. The k-th image of a sample is
  drawn with seed (seed, k), so a sample gets the same tokens alone or in any batch.
- pool: average-pool each image's token grid in size x size blocks before the LLM; each block becomes one token
  (written into the block's top-left token, which keeps its position). LLaVA-NeXT's base and high-resolution grids
  are pooled separately; tokens without a grid cell (newlines, [CLS]) are kept as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.method import BEFORE_LLM, Method, Selection
from vlm_efficient.registry import register_method
from vlm_efficient.selection import check_drop_ratio, cluster_means, keep_per_image


@register_method
@dataclass
class RandomKeep(Method):
    name = "random"
    summary = "keep a uniformly random share of each image's tokens (baseline)"

    ratio: float = 0.5
    seed: int = 0

    def bind(self, engine) -> None:
        check_drop_ratio("random", self.ratio)

    def prune_layers(self) -> set[int]:
        return {BEFORE_LLM}

    def select_tokens(self, layer, run, hidden) -> Selection:
        def choose(samples, items, rows, count):
            generators = [torch.Generator().manual_seed(self.seed * 1_000_003 + item) for item in items]
            return torch.stack([torch.randperm(rows.shape[1], generator=g)[:count] for g in generators])

        return keep_per_image(run, self.ratio, choose)


@register_method
@dataclass
class GridPool(Method):
    name = "pool"
    summary = "average-pool each image's token grid in size x size blocks (baseline)"

    size: int = 2

    def bind(self, engine) -> None:
        if self.size < 1:
            raise ValueError(f"pool: size={self.size} must be >= 1")

    def prune_layers(self) -> set[int]:
        return {BEFORE_LLM}

    def select_tokens(self, layer, run, hidden) -> Selection:
        coords = run.current(run.layout.coords, fill=-1).to(hidden.device)  # [B, n, 3] (part, row, col)
        image_index = run.current(run.layout.image_index, fill=-1).to(hidden.device)
        on_grid = (image_index >= 0) & (coords[..., 0] >= 0)
        # one id per (image, part, block row, block col); tokens off the grid get their own id (-1: untouched)
        block = torch.stack(
            [image_index, coords[..., 0], coords[..., 1] // self.size, coords[..., 2] // self.size], dim=-1
        )
        keep = ~on_grid
        merged = hidden.clone()
        for b in range(hidden.shape[0]):
            rows = on_grid[b].nonzero().flatten()
            groups, inverse = torch.unique(block[b, rows], dim=0, return_inverse=True)
            means, _ = cluster_means(hidden[b, rows], inverse, len(groups))
            first = torch.full((len(groups),), hidden.shape[1], dtype=torch.long, device=hidden.device)
            first.scatter_reduce_(0, inverse, rows, reduce="amin")
            keep[b].index_fill_(0, first, True)  # not keep[b, first] = True: a host bool copied over waits for the device
            merged[b, first] = means.to(hidden.dtype)
        return Selection(keep=keep, hidden=merged)
