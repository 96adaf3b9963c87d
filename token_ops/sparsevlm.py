"""SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference").

1. Raters: on the LLM's input embeddings, R = mean over visual tokens of softmax over text tokens of H_v H_t^T (text =
   the question after the last image); the text tokens with R above its mean rate the image (public code: no 1/sqrt(d)
   in the softmax; as here).
2. At each sparse layer (2, 6, 15 of 32, scaled to the depth) the layer's own attention P (head average, rater rows x
   visual columns) ranks the visual tokens by their mean over raters; after the layer, N = lam x (L_v - rank(P)) of
   the L_v visual tokens are deleted (paper; lam is the paper's scaling factor, tuned per token budget). The public code
   instead keeps fixed counts per stage (e.g. 303/110/36 of 576 for its 128-token setting): `keep=0.526/0.191/0.0625`
   gives that variant as shares of the image's tokens.
3. Recycling: the top 30% of the deleted tokens by score (int(0.3 n) + 1) are clustered by density-peak kNN clustering
   (DPC-kNN, k = number of clusters = int(0.1 m) + 1) on their hidden states and each cluster is averaged into one
   token. The public code appends the merged tokens after the kept ones with renumbered positions; here each merged
   token is written into the row of its cluster centre, which keeps that token's original position. The public code
   adds 1e-6 random noise to break density ties; here ties go to the earlier token.

The attention rows are read in the three sparse layers only (those layers run the dense reference attention in prefill;
every other layer stays on SDPA). All visual tokens of a sample (every image) are ranked together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.method import AttentionEdit, Method, Selection
from vlm_efficient.selection import top_k_mask

PAPER_LAYERS, PAPER_DEPTH = (2, 6, 15), 32


def dpc_knn(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with kNN density (SparseVLM's cluster_and_merge): x [n, d] -> (centre indices [k],
    cluster of each token [n])."""
    x = x.float()
    distance = torch.cdist(x, x) / x.shape[1] ** 0.5
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]
    parent = torch.where(denser, distance, distance.max()).min(-1).values
    score = parent * density
    order = score.sort(descending=True, stable=True).indices
    centres = order[:clusters]
    assignment = distance[centres].argmin(0)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


def raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices into `text` [t, d] of the rater tokens for visual tokens [v, d]."""
    relevance = (visual.float() @ text.float().T).softmax(-1).mean(0)
    chosen = (relevance > relevance.mean()).nonzero().flatten()
    return chosen if chosen.numel() else relevance.argmax().view(1)


@dataclass
class SparseVLM(Method):
    name = "sparsevlm"
    summary = "text raters rank image tokens at 3 layers; rank-based counts; recycle deleted tokens by clustering"

    layers: tuple[int, ...] = ()
    lam: float = 0.5
    keep: tuple[float, ...] = ()
    recycle: float = 0.3
    cluster_ratio: float = 0.1

    def bind(self, engine) -> None:
        depth = engine.num_layers
        stages = self.layers or tuple(sorted({int(l * depth / PAPER_DEPTH + 0.5) for l in PAPER_LAYERS}))
        if list(stages) != sorted(set(stages)) or not all(0 <= l <= depth - 2 for l in stages):
            raise ValueError(
                f"sparsevlm: layers={'/'.join(map(str, stages))} must be increasing layer indices in [0, {depth - 2}]"
                " (tokens are deleted after each of these layers; write layers=2/6/15)"
            )
        if self.keep and (len(self.keep) != len(stages) or not all(0 < k <= 1 for k in self.keep)):
            raise ValueError(f"sparsevlm: keep needs one share in (0, 1] per sparse layer ({len(stages)}): 0.5/0.3/0.1")
        if not 0 < self.lam <= 1 or not 0 <= self.recycle <= 1 or not 0 < self.cluster_ratio <= 1:
            raise ValueError("sparsevlm: lam must be in (0, 1], recycle in [0, 1] and cluster_ratio in (0, 1]")
        self.stages = stages

    def prune_layers(self) -> set[int]:
        return {l + 1 for l in self.stages}

    def observes_hidden(self, layer: int) -> bool:
        return layer == 0

    def observe_hidden(self, layer, run, hidden) -> None:
        if not run.prefill or not run.layout.has_visual:
            return
        visual = run.current(run.layout.visual, fill=False).to(hidden.device)
        question = run.current(run.layout.after_visual_text, fill=False).to(hidden.device)
        positions = run.current_positions().to(hidden.device)
        chosen = []
        for b in range(hidden.shape[0]):
            text = question[b].nonzero().flatten()
            if text.numel() == 0:  # no text after the image: the last prompt token rates alone
                text = torch.tensor([hidden.shape[1] - 1], device=hidden.device)
            picked = text[raters(hidden[b, visual[b]], hidden[b, text])] if visual[b].any() else text[:0]
            chosen.append(set(positions[b, picked].tolist()))
        run.memory(self)["raters"] = chosen

    def attention_edit(self, layer, run, context):
        if not context.prefill or layer not in self.stages or "raters" not in run.memory(self):
            return None
        memory = run.memory(self)
        visual = context.keys_where(run.layout.visual)

        def record(probs):
            stats = []
            for b in range(probs.shape[0]):
                rows = [i for i, p in enumerate(context.query_positions[b].tolist()) if p in memory["raters"][b]]
                matrix = probs[b].mean(0)[rows][:, visual[b]]
                rank = int(torch.linalg.matrix_rank(matrix.float())) if matrix.numel() else 0
                stats.append((matrix.mean(0), rank))
            memory[layer] = stats
            return probs

        return AttentionEdit(post_softmax=record)

    def select_tokens(self, layer, run, hidden) -> Selection | None:
        memory = run.memory(self)
        stage = self.stages.index(layer - 1)
        stats = memory.pop(layer - 1, None)
        if stats is None:
            return None
        visual = run.current(run.layout.visual, fill=False).to(hidden.device)
        keep = ~visual
        merged = hidden.clone()
        record = memory.setdefault("merged", {})
        for b in range(hidden.shape[0]):
            rows = visual[b].nonzero().flatten()
            n = rows.numel()
            if n == 0:
                continue
            score, rank = stats[b]
            if self.keep:
                count = int(self.keep[stage] * int(run.layout.num_visual[b]) + 0.5)
            else:
                count = n - int(self.lam * (n - rank) + 0.5)
            count = min(max(count, 1), n)
            chosen = top_k_mask(score[None], torch.ones_like(score[None], dtype=torch.bool), torch.tensor([count]))[0]
            keep[b, rows[chosen]] = True
            deleted = rows[~chosen]
            if deleted.numel() == 0 or self.recycle == 0:
                continue
            pooled = min(int(deleted.numel() * self.recycle) + 1, deleted.numel())
            pool = deleted[score[~chosen].sort(descending=True, stable=True).indices[:pooled]]
            clusters = min(int(pooled * self.cluster_ratio) + 1, pooled)
            centres, assignment = dpc_knn(hidden[b, pool], clusters)
            sums = torch.zeros(clusters, hidden.shape[-1], device=hidden.device).index_add_(
                0, assignment, hidden[b, pool].float()
            )
            counts = torch.bincount(assignment, minlength=clusters).clamp(min=1)
            merged[b, pool[centres]] = (sums / counts[:, None]).to(hidden.dtype)
            keep[b, pool[centres]] = True
            positions = run.current_positions()[b].to(hidden.device)  # for tests and inspection
            record.setdefault(layer, {})[b] = (positions[pool].tolist(), positions[pool[centres]].tolist())
        return Selection(keep=keep, hidden=merged)
