"""SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference").

1. Raters: on the LLM's input embeddings, R = mean over visual tokens of softmax over text tokens of H_v H_t^T (text =
   the question after the last image); the text tokens with R above its mean rate the image (public code: no 1/sqrt(d)
   in the softmax; as here).
2. At each sparse layer (2, 6, 15 of 32, scaled to the depth) the layer's own attention P (head average, rater rows x
   visual columns) ranks the visual tokens by their mean over raters; after the layer, N = lam x (L_v - rank(P)) of
   the L_v visual tokens are deleted (paper; lam is the paper's scaling factor, tuned per token budget). The public code
   (github.com/Gumpest/SparseVLMs, llava/model/language_model/score.py: sparse_token_dict) instead keeps fixed counts
   per stage out of 576, one table per token budget: its default budget, RETAIN_TOKN=192, keeps 300/200/110
   (`keep=0.521/0.347/0.191`); 128: 303/110/36 (`keep=0.526/0.191/0.0625`); 96: 238/48/26; 64: 66/30/17 (v1.0
   tables; USE_VERSION=2_0 has others). `keep` gives that variant as shares of the image's tokens.
3. Recycling: the top 30% of the deleted tokens by score (int(0.3 n) + 1) are clustered by density-peak kNN clustering
   (DPC-kNN, k = number of clusters = int(0.1 m) + 1) on their hidden states and each cluster is averaged into one
   token. The public code appends the merged tokens after the kept visual ones; here each merged token is written
   into the row of its cluster centre. The public code adds 1e-6 random noise to break density ties; here ties go to
   the earlier token.

Positions: the public code (llava/model/language_model/modelling_sparse_llama.py, v1.0) gives the rows after each
sparse layer contiguous positions (position_ids[:, :new_length]) and decodes each layer at its own cache length;
`positions=renumber` does the same (the merged tokens in their centres' rows). The default keeps the original
positions (`positions=original`): on the testbed (CPU, 50 POPE + 50 VQA questions, default keep table,
results/testbed_positions_staged_cpu/) the two tie (VQA accuracy 0.58, POPE F1 0.939 in both).

The attention rows are read in the three sparse layers only (those layers run the dense reference attention in prefill;
every other layer stays on SDPA). All visual tokens of a sample (every image) are ranked together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.method import AttentionEdit, Method, Selection
from vlm_efficient.registry import register_method
from vlm_efficient.selection import check_positions, cluster_means, top_k_mask

PAPER_LAYERS, PAPER_DEPTH = (2, 6, 15), 32


def dpc_knn(x: torch.Tensor, sizes: list[int], clusters: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with kNN density (SparseVLM's cluster_and_merge), every sample at once: x [B, P, d]
    whose first sizes[b] rows are sample b's tokens, clusters[b] <= sizes[b] -> (centre rows [B, K], cluster of each
    row [B, P]), K = max(clusters); sample b's centres are its first clusters[b] entries (the rest, and its rows past
    sizes[b], are meaningless). Density: exp(-mean squared distance to the k nearest, itself included); a token's
    parent distance: to the nearest denser token (none: the largest distance); centres: the k highest
    density x parent distance (ties: the earlier row); each token joins its nearest centre (ties: the earlier one)."""
    x = x.float()
    batch, length, width = x.shape
    k_max = max(clusters)
    sizes_t, clusters_t = (torch.tensor(v, device=x.device) for v in (sizes, clusters))
    real = torch.arange(length, device=x.device)[None, :] < sizes_t[:, None]
    pairs = real[:, :, None] & real[:, None, :]
    # the direct difference, not the matmul form, so that a sample's distances do not depend on the batch's padding
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / width**0.5
    distance = distance.masked_fill(~pairs, float("inf"))
    nearest = distance.topk(k_max, dim=-1, largest=False).values
    in_k = torch.arange(k_max, device=x.device)[None, None, :] < clusters_t[:, None, None]
    density = (-(nearest.masked_fill(~in_k, 0) ** 2).sum(-1) / clusters_t[:, None]).exp()
    denser = density[:, None, :] > density[:, :, None]  # padding rows: no finite distance, density 0, never denser
    largest = distance.masked_fill(~pairs, 0).amax((1, 2))
    parent = torch.where(denser, distance, largest[:, None, None]).amin(-1)
    score = (parent * density).masked_fill(~real, float("-inf"))
    centres = score.sort(dim=1, descending=True, stable=True).indices[:, :k_max]
    is_centre = torch.arange(k_max, device=x.device)[None, :] < clusters_t[:, None]
    to_centres = distance.gather(1, centres[..., None].expand(-1, -1, length))
    assignment = to_centres.masked_fill(~is_centre[..., None], float("inf")).argmin(1)
    # every centre in its own cluster (one column past the rows takes the writes of the unused centre slots)
    slot = torch.where(is_centre, centres, length)
    assignment = torch.cat([assignment, assignment[:, :1]], 1)
    assignment.scatter_(1, slot, torch.arange(k_max, device=x.device).expand(batch, -1))
    return centres, assignment[:, :length]


def rater_rows(hidden: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, n] rater rows of every sample at once: of its `text` rows, those whose relevance R (mean over its `visual`
    rows of the softmax over its text rows of H_v H_t^T) is above R's mean over the text rows, else the most relevant
    one; none where a sample has no visual rows."""
    h = hidden.float()
    probs = (h @ h.transpose(1, 2)).masked_fill(~text[:, None, :], float("-inf")).softmax(-1).nan_to_num(0.0)
    weight = visual.float()[..., None]
    relevance = (probs * weight).sum(1) / weight.sum(1).clamp(min=1)
    mean = (relevance * text).sum(1, keepdim=True) / text.sum(1, keepdim=True).clamp(min=1)
    above = text & (relevance > mean)
    most = relevance.masked_fill(~text, float("-inf")).argmax(1, keepdim=True)
    fallback = torch.zeros_like(text).scatter_(1, most, True) & ~above.any(1, keepdim=True)
    return (above | fallback) & visual.any(1, keepdim=True)


def ranks(matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[B] rank of each sample's matrix[b][rows[b]][:, cols[b]] (matrix [B, n_q, n_k]), on the host, by
    torch.linalg.matrix_rank's default tolerance (eps x max(m, n) x the largest singular value) for that sample's own
    m x n: the samples' rows are packed first and padded with zeros, which adds only zero singular values."""
    m, n = rows.sum(1), cols.sum(1)
    packed_count = int(m.max()) if m.numel() else 0
    if packed_count == 0:
        return torch.zeros_like(m)
    order = rows.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :packed_count]
    real = torch.arange(packed_count, device=rows.device)[None, :] < m[:, None]
    packed = matrix.float().gather(1, order[..., None].expand(-1, -1, matrix.shape[-1]))
    packed = packed * real[..., None] * cols[:, None, :]
    # LAPACK on the host: CUDA decomposes a batch of these small matrices one after another, a launch sequence each
    singular = torch.linalg.svdvals(packed.cpu())
    tolerance = singular.amax(-1) * torch.finfo(torch.float32).eps * torch.maximum(m, n).cpu()
    return (singular > tolerance[:, None]).sum(-1)


@register_method
@dataclass
class SparseVLM(Method):
    name = "sparsevlm"
    summary = "text raters rank image tokens at 3 layers; rank-based counts; recycle deleted tokens by clustering"

    layers: tuple[int, ...] = ()
    lam: float = 0.5
    keep: tuple[float, ...] = ()
    recycle: float = 0.3
    cluster_ratio: float = 0.1
    positions: str = "original"  # or renumber: contiguous positions after each sparse layer, as the authors' code

    def bind(self, engine) -> None:
        check_positions("sparsevlm", self.positions, engine, inside=True)
        depth = engine.num_layers
        stages = self.layers or tuple(sorted({int(l * depth / PAPER_DEPTH + 0.5) for l in PAPER_LAYERS}))
        if list(stages) != sorted(set(stages)) or not all(0 <= l <= depth - 2 for l in stages):
            valid = sorted({min(int(l * depth / PAPER_DEPTH + 0.5), depth - 2) for l in PAPER_LAYERS})
            example = f"e.g. layers={'/'.join(map(str, valid))}" if depth >= 2 else "this model has too few layers"
            raise ValueError(
                f"sparsevlm: layers={'/'.join(map(str, stages))} must be increasing layer indices in [0, {depth - 2}]"
                f" for this {depth}-layer model (tokens are deleted after each of these layers; {example})"
            )
        if self.keep and (len(self.keep) != len(stages) or not all(0 < k <= 1 for k in self.keep)):
            example = "/".join(f"{0.5 ** (i + 1):g}" for i in range(len(stages)))  # one decreasing share per layer
            raise ValueError(
                f"sparsevlm: keep needs one share in (0, 1] per sparse layer ({len(stages)}), e.g. keep={example}"
            )
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
        text = run.current(run.layout.after_visual_text, fill=False).to(hidden.device)
        # no text after the image: the last prompt token rates alone
        last = torch.zeros_like(text)
        last[:, -1] = True
        text = text | (last & ~text.any(1, keepdim=True))
        chosen = rater_rows(hidden, visual, text)
        # kept per original position (one extra slot takes the slot padding), looked up by the sparse layers' rows
        positions = run.current_positions().to(hidden.device)
        length = run.layout.visual.shape[1]
        index = torch.where(positions >= 0, positions, length)
        at = torch.zeros(chosen.shape[0], length + 1, dtype=torch.bool, device=hidden.device)
        run.memory(self)["raters"] = at.scatter_(1, index, chosen)[:, :length]

    def attention_edit(self, layer, run, context):
        if not context.prefill or layer not in self.stages or "raters" not in run.memory(self):
            return None
        memory = run.memory(self)
        visual = context.keys_where(run.layout.visual)
        raters = context.queries_where(memory["raters"])

        def record(probs):
            matrix = probs.mean(1)  # [B, rows, keys]: head average
            weight = raters.float()[..., None]
            score = (matrix.float() * weight).sum(1) / weight.sum(1).clamp(min=1)  # mean over the rater rows
            memory[layer] = (score, ranks(matrix, raters, visual))
            return probs

        return AttentionEdit(post_softmax=record)

    def select_tokens(self, layer, run, hidden) -> Selection | None:
        memory = run.memory(self)
        stage = self.stages.index(layer - 1)
        stats = memory.pop(layer - 1, None)
        if stats is None:
            return None
        score, rank = stats
        visual = run.current(run.layout.visual, fill=False).to(hidden.device)
        # the counts size the selections: one host read for every sample
        available, rank, original = torch.stack([visual.sum(1), rank.to(visual.device),
                                                 run.layout.num_visual.to(visual.device)]).tolist()
        counts = []
        for n, r, total in zip(available, rank, original):
            count = int(self.keep[stage] * total + 0.5) if self.keep else n - int(self.lam * (n - r) + 0.5)
            counts.append(min(max(count, 1), n))
        chosen = top_k_mask(score, visual, torch.tensor(counts))
        keep = ~visual | chosen
        if self.recycle == 0:
            return Selection(keep=keep)
        deleted = visual & ~chosen
        # each sample's recycled pool: its top `pooled` deleted tokens, in score order (ties: the earlier row)
        order = score.float().masked_fill(~deleted, float("-inf")).sort(dim=1, descending=True, stable=True).indices
        pooled = [min(int((n - k) * self.recycle) + 1, n - k) for n, k in zip(available, counts)]
        recycling = [b for b, size in enumerate(pooled) if size > 0]
        merged = hidden.clone()
        if not recycling:
            return Selection(keep=keep, hidden=merged)
        sizes = [pooled[b] for b in recycling]
        clusters = [min(int(size * self.cluster_ratio) + 1, size) for size in sizes]
        device, count = hidden.device, len(recycling)
        samples = torch.tensor(recycling, device=device)
        pool = order[samples, : max(sizes)]  # [S, P]: each recycling sample's pool, then padding rows
        members = hidden[samples[:, None], pool].float()
        centres, assignment = dpc_knn(members, sizes, clusters)
        k_max = centres.shape[1]
        # each cluster's mean by one flat scatter over (sample, cluster); padding rows go to a last, unused bucket
        real = torch.arange(pool.shape[1], device=device)[None, :] < torch.tensor(sizes, device=device)[:, None]
        flat = torch.where(real, assignment + torch.arange(count, device=device)[:, None] * k_max, count * k_max)
        means, _ = cluster_means(members.flatten(0, 1), flat.flatten(), count * k_max + 1)
        means = means[:-1].view(count, k_max, -1)
        # unused centre slots repeat slot 0's write (same row, same value)
        used = torch.arange(k_max, device=device)[None, :] < torch.tensor(clusters, device=device)[:, None]
        slot = torch.where(used, torch.arange(k_max, device=device), 0)
        centre_rows = pool.gather(1, centres.gather(1, slot))
        at = (samples[:, None].expand_as(centre_rows), centre_rows)
        merged[at] = means.gather(1, slot[..., None].expand_as(means)).to(hidden.dtype)
        keep[at] = True
        record = memory.setdefault("merged", {})
        positions = run.current_positions().to(device)  # for tests and inspection
        for i, b in enumerate(recycling):
            record.setdefault(layer, {})[b] = (positions[b, pool[i, : sizes[i]]],
                                               positions[b, centre_rows[i, : clusters[i]]])
        return Selection(keep=keep, hidden=merged)
