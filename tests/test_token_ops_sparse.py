"""SparseVLM: raters, rank-based counts and recycling against a slow implementation of the paper's formulas, and
decoding with the pruned, merged cache against the dense reference on every family."""

from __future__ import annotations

import math

import pytest
import torch

import vlm_efficient as ve
from test_token_ops_helpers import (
    capture_entering,
    check_batched_equals_alone,
    check_generate,
    num_layers,
    recorded_probs,
    two_samples,
)
from vlm_efficient.token_ops.sparsevlm import SparseVLM, dpc_knn, ranks
from vlm_efficient.testing import FAMILIES, tiny_model

SPEC = "sparsevlm:layers=0/1/2,lam=0.5"


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _merged_rows(run, methods):
    """hidden_overrides entries for every merged token, with the value the wrapped model carried."""
    entering, overrides = run.scratch["test_entering"], {}
    for layer, per_sample in run.memory(methods[0]).get("merged", {}).items():
        positions = run.layer_positions[layer]
        for b, (_, centres) in per_sample.items():
            for p in centres.tolist():
                row = positions[b].tolist().index(p)
                overrides.setdefault(layer, []).append((b, p, entering[layer][b, row]))
    return overrides


def test_generate_matches_reference(family):
    run, methods = check_generate(family, SPEC, extra=lambda run, methods, n: ({}, {}, _merged_rows(run, methods)))
    assert run.memory(methods[0]).get("merged"), "nothing was recycled"


def test_batched_equals_alone(family):
    check_batched_equals_alone(family, SPEC)


def slow_dpc(x: torch.Tensor, k: int):
    n, d = x.shape
    dist = [[float(torch.linalg.vector_norm(x[i].double() - x[j].double())) / math.sqrt(d) for j in range(n)]
            for i in range(n)]  # fmt: skip
    density = [math.exp(-sum(v * v for v in sorted(row)[:k]) / k) for row in dist]
    top = max(max(row) for row in dist)
    parent = [min([dist[i][j] for j in range(n) if density[j] > density[i]] or [top]) for i in range(n)]
    score = [parent[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:k]
    assign = [min(range(k), key=lambda c: (dist[centres[c]][j], c)) for j in range(n)]
    for c, i in enumerate(centres):
        assign[i] = c
    return centres, assign


@pytest.mark.parametrize(
    "family, lam, recycle, cluster_ratio",
    [(f, 0.5, 0.3, 0.1) for f in FAMILIES] + [("llava", 0.3, 1.0, 0.5), ("qwen2_5_vl", 0.8, 0.6, 0.4)],
)
def test_kept_and_merged_tokens_follow_the_papers_formulas(family, lam, recycle, cluster_ratio):
    """Stage by stage on the dense reference: raters from the input embeddings, P from the sparse layer's attention
    (earlier stages' deletions masked, their merged tokens injected), keep L_v - round(lam (L_v - rank P)) by the mean
    rater attention, cluster the top `recycle` of the deleted ones into int(ratio m) + 1 clusters, average each."""
    stages = (0, 1, 2)
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, f"sparsevlm:layers=0/1/2,lam={lam},recycle={recycle},cluster_ratio={cluster_ratio}")
    with capture_entering(model, range(num_layers(model))) as wrapped_entering, torch.no_grad():
        model(**batch)
    run = ve.engine_of(model).run
    ve.unwrap(model)
    layout = run.layout
    visual, question = layout.visual, layout.after_visual_text
    with capture_entering(model, [0]) as entering, torch.no_grad():
        model(**batch)
    embeds = entering[0]
    raters = []
    for b in range(visual.shape[0]):
        v, t = visual[b].nonzero().flatten(), question[b].nonzero().flatten()
        relevance = (embeds[b, v].double() @ embeds[b, t].double().T).softmax(-1).mean(0)
        raters.append(t[relevance > relevance.mean()].tolist())
    alive = {b: visual[b].nonzero().flatten().tolist() for b in range(visual.shape[0])}
    masks, overrides = {}, {}
    for layer in stages:
        with capture_entering(model, [layer + 1]) as after:
            probs = recorded_probs(model, batch, dict(masks), None, dict(overrides))[layer]["probs"]
        hidden = after[layer + 1]
        for b in range(visual.shape[0]):
            cols = alive[b]
            matrix = probs[b].mean(0)[raters[b]][:, cols]
            rank = int(torch.linalg.matrix_rank(matrix.float()))
            score = matrix.mean(0)
            n = len(cols)
            count = min(max(n - int(lam * (n - rank) + 0.5), 1), n)
            order = sorted(range(n), key=lambda i: (-float(score[i]), i))
            kept = sorted(cols[i] for i in order[:count])
            deleted = [i for i in order[count:]]  # by score, best first
            pool = [cols[i] for i in deleted[: min(int(len(deleted) * recycle) + 1, len(deleted))]] if deleted else []
            centres = []
            if pool:
                k = min(int(len(pool) * cluster_ratio) + 1, len(pool))
                centre_idx, assign = slow_dpc(hidden[b, pool], k)
                for c, i in enumerate(centre_idx):
                    members = [pool[j] for j in range(len(pool)) if assign[j] == c]
                    value = hidden[b, members].double().mean(0)
                    overrides.setdefault(layer + 1, []).append((b, pool[i], value))
                    centres.append(pool[i])
                    row = run.layer_positions[layer + 1][b].tolist().index(pool[i])
                    torch.testing.assert_close(wrapped_entering[layer + 1][b, row].double(), value, atol=1e-4,
                                               rtol=1e-4)  # fmt: skip
            alive[b] = sorted(kept + centres)
            got = [p for p in run.layer_positions[layer + 1][b].tolist() if p >= 0 and bool(visual[b, p])]
            assert got == alive[b], (layer, b)
        allowed = ~visual.clone()
        for b, cols in alive.items():
            allowed[b, cols] = True
        masks.update({l: allowed for l in range(layer + 1, num_layers(model))})


def test_code_variant_keeps_fixed_shares():
    model, processor = tiny_model("llava")
    batch = two_samples(processor)
    ve.wrap(model, "sparsevlm:layers=0/1/2,keep=0.5/0.25/0.125,recycle=0")
    with torch.no_grad():
        model(**batch)
    counts = [v.tolist() for v in ve.engine_of(model).run.visual_per_layer]
    ve.unwrap(model)
    assert counts == [[16, 32], [8, 16], [4, 8], [2, 4]]


def test_bad_parameters_are_refused():
    model, _ = tiny_model("llava")
    for spec, match in [
        ("sparsevlm:layers=2/1", "increasing"),
        ("sparsevlm:layers=0/3", "increasing"),
        ("sparsevlm:keep=0.5", "one share"),
        ("sparsevlm:lam=0", "lam"),
    ]:
        with pytest.raises(ValueError, match=match):
            ve.wrap(model, spec)
    assert isinstance(ve.parse_methods("sparsevlm")[0], SparseVLM)


def test_ranks_of_all_samples_at_once_equal_matrix_rank_of_each():
    """Every sample's rater rows x visual columns packed into one batch: each rank equals torch.linalg.matrix_rank of
    that sample's own sub-matrix (fewer columns than rows, a rank-2 product, no raters)."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.rand(4, 6, 9, generator=generator)
    matrix[1] = torch.rand(6, 2, generator=generator) @ torch.rand(2, 9, generator=generator)
    rows = torch.ones(4, 6, dtype=torch.bool)
    cols = torch.ones(4, 9, dtype=torch.bool)
    cols[0, 3:] = False  # 6 rows, 3 columns: rank 3
    rows[1, ::2] = False
    rows[2] = False
    cols[3, ::3] = False
    expected = [int(torch.linalg.matrix_rank(matrix[b][rows[b]][:, cols[b]])) if rows[b].any() else 0 for b in range(4)]
    assert expected == [3, 2, 0, 6]
    assert ranks(matrix, rows, cols).tolist() == expected


def test_dpc_knn_of_padded_samples_equals_the_slow_clustering_of_each():
    """Samples of different sizes and cluster counts clustered in one padded batch: each sample's centres and
    assignment equal the slow density-peak clustering of its own tokens."""
    generator = torch.Generator().manual_seed(0)
    sizes, clusters = [12, 5, 9, 12, 7], [4, 1, 3, 6, 2]
    for _ in range(10):
        x = torch.randn(5, 12, 6, generator=generator) * 5  # padding rows hold values too: they must not count
        centres, assignment = dpc_knn(x, sizes, clusters)
        for b, (size, k) in enumerate(zip(sizes, clusters)):
            expected_centres, expected_assignment = slow_dpc(x[b, :size], k)
            assert centres[b, :k].tolist() == expected_centres
            assert assignment[b, :size].tolist() == expected_assignment
