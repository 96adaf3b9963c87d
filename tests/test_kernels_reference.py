"""The torch references of vlm_efficient.kernels against even more obvious implementations (python loops,
materialised masks and probabilities). Pure torch on CPU: no Triton involved."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_efficient.kernels.api import (
    ROLE_IMAGE,
    ROLE_LAST,
    ROLE_MIDDLE,
    ROLE_PAD,
    ROLE_PREFIX,
    ROLE_QUESTION,
    GroupSpec,
    MaskSpec,
    RaggedKVCache,
    StructuredMask,
    TokenLayout,
    attention_reference,
    attention_with_received_stats,
    attention_with_received_stats_reference,
    build_block_lists,
    dense_allowed,
    dense_masked_decode,
    flash_attention,
    group_attention_reference,
    masked_attention_reference,
    ragged_decode_attention_reference,
    ragged_decode_attention_torch,
)
from vlm_efficient.kernels.attention_stats import received_from_probs
from vlm_efficient.kernels.masked_attention import attention_from_mask
from vlm_efficient.heads.act import act_groups
from vlm_efficient.heads.pai import pai_groups
from vlm_efficient.heads.vaf import vaf_groups
from vlm_efficient.heads.var import var_groups


def _layout(n=22, b=2):
    is_img = torch.zeros(b, n, dtype=torch.bool)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :3] = False
    is_img[0, 4:13] = True  # 9 tokens, grid 3 wide
    is_img[1, 6:12] = True  # 6 tokens
    is_img[1, 14:17] = True  # a second image
    return TokenLayout.from_modality(is_img, valid, grid_width=3)


SPECS = {
    "causal": MaskSpec(),
    "naavit": MaskSpec.naavit(),
    "mutual": MaskSpec.modality_mutual(),
    "window": MaskSpec.neighbor_window(1, 1),
    "window_bidir": MaskSpec.neighbor_window(1, 2, causal_window=False),
    "knockout": MaskSpec.naavit().with_knockout((ROLE_QUESTION, ROLE_IMAGE), (ROLE_LAST, ROLE_PREFIX)),
    "noncausal_naavit": MaskSpec(causal=False, image_image="none"),
}


def _rule_loop(layout: TokenLayout, spec: MaskSpec) -> torch.Tensor:
    """The rule of layout.py written out literally, one pair at a time."""
    b, n = layout.is_image.shape
    out = torch.zeros(b, n, n, dtype=torch.bool)
    for s in range(b):
        for i in range(n):
            for j in range(n):
                ii, ij = bool(layout.is_image[s, i]), bool(layout.is_image[s, j])
                ok = j <= i if spec.causal else True
                if spec.image_image == "none" and ii and ij and i != j:
                    ok = False
                if spec.image_image == "window" and ii and ij:
                    ok = (int(layout.image_id[s, i]) == int(layout.image_id[s, j])
                          and abs(int(layout.grid_row[s, i]) - int(layout.grid_row[s, j])) <= spec.window[0]
                          and abs(int(layout.grid_col[s, i]) - int(layout.grid_col[s, j])) <= spec.window[1]
                          and (j <= i or not spec.window_causal))
                if spec.mutual_roles and ii and not ij and j > i and int(layout.role[s, j]) in spec.mutual_roles:
                    ok = True
                if (int(layout.role[s, i]), int(layout.role[s, j])) in spec.knockout:
                    ok = False
                out[s, i, j] = ok and bool(layout.valid[s, j])
    return out


def test_layout_fields():
    lay = _layout()
    assert lay.role[0].tolist()[:6] == [ROLE_PREFIX] * 4 + [ROLE_IMAGE] * 2
    assert lay.role[0, 13].item() == ROLE_QUESTION and lay.role[0, -1].item() == ROLE_LAST
    assert lay.role[1, :3].tolist() == [ROLE_PAD] * 3
    assert lay.role[1, 12].item() == ROLE_MIDDLE  # between the two images
    assert lay.image_id[1, 6].item() == 0 and lay.image_id[1, 14].item() == 1 and lay.image_id[1, 0].item() == -1
    assert lay.grid_row[0, 4:13].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert lay.grid_col[0, 4:13].tolist() == [0, 1, 2] * 3
    info, grid = lay.pack()
    assert info.dtype == torch.int32 and int(info[0, 5]) >> 4 & 1 == 1 and int(info[1, 0]) >> 5 & 1 == 0


def test_layout_from_engine_layout():
    class Fake:  # the engine's ModalityLayout, duck-typed
        kind = torch.tensor([[0, 1, 2, 2, 2, 2, 1, 1]])
        image_index = torch.tensor([[-1, -1, 0, 0, 0, 0, -1, -1]])
        coords = torch.tensor([[[-1] * 3, [-1] * 3, [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [-1] * 3, [-1] * 3]])

    lay = TokenLayout.from_modality_layout(Fake())
    assert lay.valid.tolist() == [[False] + [True] * 7]
    assert lay.grid_row[0, 2:6].tolist() == [0, 0, 1, 1] and lay.grid_col[0, 2:6].tolist() == [0, 1, 0, 1]
    assert lay.role[0, -1].item() == ROLE_LAST and lay.role[0, 6].item() == ROLE_QUESTION


@pytest.mark.parametrize("name", list(SPECS))
def test_rule_matches_loop(name):
    lay = _layout()
    spec = SPECS[name]
    assert torch.equal(dense_allowed(lay, spec), _rule_loop(lay, spec))


def test_rule_detects_wrong_spec():
    lay = _layout()
    assert not torch.equal(dense_allowed(lay, SPECS["naavit"]), _rule_loop(lay, SPECS["causal"]))


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("bm,bn,q_len", [(4, 4, 22), (8, 4, 22), (4, 8, 9)])
def test_block_lists_classification(name, bm, bn, q_len):
    lay = _layout()
    spec = SPECS[name]
    n = lay.length
    allowed = _rule_loop(lay, spec)[:, n - q_len:]
    lists = build_block_lists(lay, spec, bm, bn, q_len, max_elems=200)  # small chunks: exercises the chunking
    for s in range(lay.batch_size):
        for qb in range(lists.n_qblocks):
            full = set(lists.full_idx[s, qb, : lists.full_cnt[s, qb]].tolist())
            part = set(lists.part_idx[s, qb, : lists.part_cnt[s, qb]].tolist())
            assert not full & part
            for kb in range(lists.n_kblocks):
                tile = allowed[s, qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn]
                rows = tile.shape[0]
                all_ok = bool(tile.all()) and tile.shape[1] == bn  # keys past the end are never allowed
                any_ok = bool(tile.any())
                assert (kb in full) == all_ok, (s, qb, kb)
                assert (kb in part) == (any_ok and not all_ok), (s, qb, kb)
                assert rows > 0


def _sdpa_obvious(q, k, v, allowed, scaling):
    """Per-row softmax over the allowed keys, loops over batch/head/row."""
    b, hq, nq, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros(b, nq, hq, d)
    for s in range(b):
        for h in range(hq):
            for i in range(nq):
                ok = allowed[s, i]
                if not ok.any():
                    continue
                logits = (k[s, h // g][ok].double() @ q[s, h, i].double()) * scaling
                p = torch.softmax(logits, 0)
                out[s, i, h] = (p[:, None] * v[s, h // g][ok].double()).sum(0).float()
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_attention_reference_vs_loop(causal):
    torch.manual_seed(0)
    b, hq, hkv, nq, nk, d = 2, 4, 2, 7, 11, 16
    q, k, v = torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d)
    kv = torch.ones(b, nk, dtype=torch.bool)
    kv[1, :6] = False  # with causal, query 0 of sample 1 sees only padding -> 0
    out, lse = attention_reference(q, k, v, scaling=0.3, causal=causal, key_valid=kv, return_lse=True)
    qpos = torch.arange(nq)[:, None] + nk - nq
    allowed = ((torch.arange(nk)[None] <= qpos) if causal else torch.ones(nq, nk, dtype=torch.bool))[None] & kv[:, None]
    ref = _sdpa_obvious(q, k, v, allowed, 0.3)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.isnan(out).any()
    if causal:
        assert out[1, 0].abs().max() == 0 and torch.isinf(lse[1, :, 0]).all()
    # the dispatcher on CPU tensors uses the reference
    assert torch.equal(flash_attention(q, k, v, scaling=0.3, causal=causal, key_valid=kv), out)


@pytest.mark.parametrize("name", ["naavit", "window", "knockout", "mutual"])
def test_masked_reference_vs_loop(name):
    torch.manual_seed(1)
    lay = _layout()
    n = lay.length
    q, k, v = torch.randn(2, 2, n, 16), torch.randn(2, 1, n, 16), torch.randn(2, 1, n, 16)
    mask = StructuredMask(lay, SPECS[name])
    out = masked_attention_reference(q, k, v, mask=mask, scaling=0.25)
    ref = _sdpa_obvious(q, k, v, _rule_loop(lay, SPECS[name]), 0.25)
    assert torch.allclose(out, ref, atol=1e-5)
    wrong = _sdpa_obvious(q, k, v, _rule_loop(lay, SPECS["causal"]), 0.25)
    assert not torch.allclose(out, wrong, atol=1e-3)


@pytest.mark.parametrize("per_head", [True, False, "kv"])
def test_stats_reference_vs_full_probs(per_head):
    torch.manual_seed(2)
    b, hq, hkv, n, d = 2, 4, 2, 13, 8
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    kv = torch.ones(b, n, dtype=torch.bool)
    kv[1, :4] = False
    sq = torch.tensor([[12, -1, 5], [12, 12, 2]])  # unused slot, duplicate, fully-masked row (2 of sample 1)
    out, rec = attention_with_received_stats_reference(q, k, v, key_valid=kv, causal=True, scaling=0.4,
                                                       stat_queries=sq, per_head=per_head)
    allowed = (torch.arange(n)[None, :] <= torch.arange(n)[:, None])[None] & kv[:, None]
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.4
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
    expect = received_from_probs(probs, sq, per_head, hkv)
    assert torch.allclose(rec, expect, atol=1e-6)
    # hand check of one entry: sample 0, the mean over rows 12 and 5
    manual = (probs[0, :, 12] + probs[0, :, 5]) / 2
    got0 = rec[0] if per_head is True else None
    if got0 is not None:
        assert torch.allclose(got0, manual, atol=1e-6)
    assert torch.allclose(out, attention_reference(q, k, v, scaling=0.4, key_valid=kv))
    # the dispatcher on CPU
    out2, rec2 = attention_with_received_stats(q, k, v, key_valid=kv, scaling=0.4, stat_queries=sq, per_head=per_head)
    assert torch.equal(rec2, rec)


def _group_loop(q, k, v, groups, spec: GroupSpec, scaling, sel, kv, causal=True, kbias=None):
    """Pre-softmax modification and post-softmax redistribution, one row at a time, in float64."""
    scale, ab, bias, keep, recv = spec.tables()
    b, hq, n, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros(b, n, hq, d, dtype=torch.float64)
    for s in range(b):
        for h in range(hq):
            for i in range(n):
                keys = [j for j in range(n) if (j <= i or not causal) and kv[s, j]]
                if not keys:
                    continue
                a = {j: float(q[s, h, i].double() @ k[s, h // g, j].double()) * scaling for j in keys}
                if sel[s, i]:
                    for j in keys:
                        gj = int(groups[s, j])
                        a[j] = a[j] * float(scale[h, gj]) + float(ab[h, gj]) * abs(a[j]) + float(bias[h, gj])
                        if kbias is not None:
                            a[j] += float(kbias[s, j])
                mx = max(a.values())
                z = sum(math.exp(x - mx) for x in a.values())
                p = {j: math.exp(a[j] - mx) / z for j in keys}
                mass = [0.0] * spec.num_groups
                for j in keys:
                    mass[int(groups[s, j])] += p[j]
                freed = sum((1 - float(keep[h, gg])) * mass[gg] for gg in range(spec.num_groups))
                rec = sum(float(recv[h, gg]) * mass[gg] for gg in range(spec.num_groups))
                active = bool(sel[s, i]) and rec > 0
                if spec.cond_mass_groups:
                    active = active and sum(mass[x] for x in spec.cond_mass_groups) >= spec.cond_mass_min
                if spec.cond_ratio_groups is not None:
                    num = sum(mass[x] for x in spec.cond_ratio_groups[0])
                    den = sum(mass[x] for x in spec.cond_ratio_groups[1])
                    active = active and num >= spec.cond_ratio_min * den
                for j in keys:
                    gj = int(groups[s, j])
                    c = float(keep[h, gj]) + float(recv[h, gj]) * freed / rec if active else 1.0
                    out[s, i, h] += c * p[j] * v[s, h // g, j].double()
    return out.float()


def _group_inputs(seed=3, n=12):
    torch.manual_seed(seed)
    b, hq, hkv, d = 2, 4, 2, 8
    q, k, v = torch.randn(b, hq, n, d) * 2, torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    groups = torch.zeros(b, n, dtype=torch.long)
    groups[:, 2:8] = 1
    groups[:, [0, 4]] = 2
    sel = torch.zeros(b, n, dtype=torch.bool)
    sel[:, 8:] = True
    kv = torch.ones(b, n, dtype=torch.bool)
    kv[1, :2] = False
    return q, k, v, groups, sel, kv


@pytest.mark.parametrize("name", ["pai", "vaf", "var", "act", "mixed"])
def test_group_reference_vs_loop(name):
    q, k, v, groups, sel, kv = _group_inputs()
    hq = q.shape[1]
    specs = {
        "pai": pai_groups(hq, 0.5, image_group=1, num_groups=3),
        "vaf": vaf_groups(hq, [0.95, 1.15, 1.0], heads=[1, 3]),
        "var": var_groups(hq, p=0.6, rho=0.3, min_image_mass=0.1),
        "act": act_groups(hq, 0.4, sink_group=2, num_groups=3),
        "mixed": GroupSpec(hq, 3, logit_scale=torch.rand(hq, 3) + 0.5, logit_abs=torch.rand(hq, 3),
                           logit_bias=torch.randn(hq, 3), keep=torch.tensor([1.0, 0.7, 0.3]),
                           receive=torch.tensor([1.0, 0.0, 0.0]), sink_group=2),
    }
    kbias = torch.randn(2, q.shape[2]) if name == "mixed" else None
    spec = specs[name]
    out = group_attention_reference(q, k, v, key_group=groups, spec=spec, key_valid=kv, scaling=0.35,
                                    query_select=sel, key_bias=kbias)
    ref = _group_loop(q, k, v, groups, spec, 0.35, sel, kv, kbias=kbias)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    plain = attention_reference(q, k, v, scaling=0.35, key_valid=kv)
    assert not torch.allclose(out, plain, atol=1e-3)  # the method changed something
    assert torch.allclose(out[~sel], plain[~sel], atol=1e-6)  # ... only on the selected rows


def test_group_var_condition_splits_rows():
    q, k, v, groups, sel, kv = _group_inputs(seed=5, n=16)
    hq = q.shape[1]
    spec = var_groups(hq, p=0.6, rho=0.5, min_image_mass=0.3)
    nocond = var_groups(hq, p=0.6, rho=0.0, min_image_mass=0.0)
    with_c = group_attention_reference(q, k, v, key_group=groups, spec=spec, key_valid=kv, scaling=0.35,
                                       query_select=sel)
    without = group_attention_reference(q, k, v, key_group=groups, spec=nocond, key_valid=kv, scaling=0.35,
                                        query_select=sel)
    plain = attention_reference(q, k, v, scaling=0.35, key_valid=kv)
    rows_cond = (with_c - plain).abs().amax(-1)[sel]  # [rows, heads]
    rows_nocond = (without - plain).abs().amax(-1)[sel]
    changed, unchanged = (rows_cond > 1e-6), (rows_cond <= 1e-6)
    assert changed.any() and unchanged.any()  # the condition keeps some (row, head) pairs and drops others
    assert (rows_nocond > 1e-6).sum() > changed.sum()


def test_group_prepare_classes():
    prep = var_groups(4).prepare("cpu")
    assert prep["two_class"] and prep["sink"] == 2 and prep["has_cond"]
    assert prep["cm_bits"] == 0b110 and prep["cn_bits"] == 0b010 and prep["cd_bits"] == 0b110
    prep = act_groups(4, sink_group=1, num_groups=3).prepare("cpu")
    assert not prep["two_class"] and prep["sink"] == 1
    prep = pai_groups(4).prepare("cpu")
    assert prep["has_pre"] and not prep["has_post"] and prep["sink"] is None
    with pytest.raises(NotImplementedError):
        GroupSpec(2, 3, keep=torch.tensor([1.0, 0.5, 0.7])).prepare("cpu")


def test_ragged_reference_vs_dense_and_append():
    torch.manual_seed(4)
    b, hq, hkv, n, d = 2, 6, 3, 20, 8
    k, v = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    keep = torch.rand(b, hkv, n) < 0.5
    keep[0, 1] = False
    kv = torch.ones(b, n, dtype=torch.bool)
    kv[1, :5] = False
    cache = RaggedKVCache.from_dense(k, v, keep, max_new_tokens=2, key_valid=kv)
    assert cache.lengths.tolist() == (keep & kv[:, None]).sum(-1).flatten().tolist()
    keep_all = keep & kv[:, None]
    for _ in range(2):
        q = torch.randn(b, hq, 1, d)
        kn, vn = torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
        cache.append(kn, vn)
        k, v = torch.cat([k, kn], 2), torch.cat([v, vn], 2)
        keep_all = torch.cat([keep_all, torch.ones(b, hkv, 1, dtype=torch.bool)], 2)
        got = ragged_decode_attention_reference(q, cache, scaling=0.3)
        assert torch.allclose(got, dense_masked_decode(q, k, v, keep_all, 0.3), atol=1e-5)
    with pytest.raises(RuntimeError):
        cache.append(kn, vn)  # capacity exhausted
    # index form of keep gives the same cache content
    idx = torch.stack([torch.randperm(n)[:5] for _ in range(b * hkv)]).view(b, hkv, 5)
    c1 = RaggedKVCache.from_dense(k[:, :, :n], v[:, :, :n], idx)
    mask = torch.zeros(b, hkv, n, dtype=torch.bool).scatter_(2, idx, True)
    c2 = RaggedKVCache.from_dense(k[:, :, :n], v[:, :, :n], mask)
    q = torch.randn(b, hq, 1, d)
    assert torch.allclose(ragged_decode_attention_reference(q, c1, scaling=0.3),
                          ragged_decode_attention_reference(q, c2, scaling=0.3))


def test_ragged_grow_and_torch_path_match_the_reference():
    """grow() moves every segment to its larger slot without losing a row; the batched torch path equals the
    segment-by-segment reference before and after, through appends."""
    torch.manual_seed(5)
    b, hq, hkv, n, d = 2, 4, 2, 12, 8
    k, v = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    keep = torch.rand(b, hkv, n) < 0.6
    cache = RaggedKVCache.from_dense(k, v, keep, max_new_tokens=1)
    for step in range(4):
        if cache._slack_host == 0:
            before = [(kk.clone(), vv.clone()) for kk, vv in cache.segments()]
            cache.grow(2)
            assert all(torch.equal(x, y) for (x, _), (y, _) in zip(before, cache.segments()))
        cache.append(torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d))
        q = torch.randn(b, hq, 1, d)
        ref = ragged_decode_attention_reference(q, cache, scaling=0.3)
        assert torch.allclose(ragged_decode_attention_torch(q, cache, scaling=0.3), ref, atol=1e-5), step
    assert cache.lengths.tolist() == (keep.sum(-1) + 4).flatten().tolist()
