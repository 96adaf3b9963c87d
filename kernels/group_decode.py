"""Kernel 3, decoding form: group-reweighted attention for one query row per sample (a generation step).

The same formulas as group_attention.py (pre-softmax a -> a * scale[h,g] + abs[h,g] * |a| + bias[h,g] + key_bias[b,j];
post-softmax exact redistribution c_g = keep + receive * F / R under the optional row condition) for q_len = 1, every
row selected, up to MAX_GROUPS key groups. Built for the per-step cost: the engine keeps each layer's key groups in a
buffer longer than the cache (the generated keys are group 0) and passes it whole, so a step costs one launch and no
host work (the tables are folded once per spec and device).

Grid (B * Hkv, n_split): a program loads the Hq / Hkv query heads of one KV head as one tile (padded to 16 rows for
the tensor cores), walks its slice of the keys in BLOCK_N tiles with one running max and a (sum, accumulator) per key
group (split-KV as kernel 5, split_decode.py: B * Hkv alone is 4 programs for Qwen2-VL-7B at batch 1). With one split
it applies the coefficients in its epilogue; with several, each split stores its max and per-group partials and a
merge kernel brings them to one max, sums them and runs the same epilogue (the redistribution needs every key's
group masses).

The torch reference is group_attention_reference on the single row (key_group / key_bias cut to the cache length).
"""

from __future__ import annotations

import torch

from ._common import check_qkv, last_dim_contiguous, triton_available
from .group_attention import LOG2E, GroupSpec, group_attention_reference
from .launch import launch
from .split_decode import decode_blocks, decode_tiles, split_geometry

MAX_GROUPS = 4

if triton_available():
    import triton
    import triton.language as tl

    from .masked_attention import _load_rows, mma, pv_dot, softmax_step

    @triton.jit
    def _column(TAB, heads, row_ok, FIELD: tl.constexpr, GROUP: tl.constexpr):
        """TAB[heads, FIELD, GROUP] ([Hq, 5, MAX_GROUPS] fp32) as a [rows] vector."""
        return tl.load(TAB + heads * (5 * 4) + FIELD * 4 + GROUP, mask=row_ok, other=0.0)

    @triton.jit
    def _per_key(group, v0, v1, v2, v3, NG: tl.constexpr):
        """[rows, keys]: v_g(row) for each key's group g."""
        out = tl.where(group[None, :] == 0, v0[:, None], 0.0)
        if NG > 1:
            out = tl.where(group[None, :] == 1, v1[:, None], out)
        if NG > 2:
            out = tl.where(group[None, :] == 2, v2[:, None], out)
        if NG > 3:
            out = tl.where(group[None, :] == 3, v3[:, None], out)
        return out

    @triton.jit
    def _mass(m0, m1, m2, m3, BITS: tl.constexpr):
        """Sum of the group masses whose bit is set in BITS."""
        total = m0 * 0.0
        if (BITS & 1) != 0:
            total += m0
        if (BITS & 2) != 0:
            total += m1
        if (BITS & 4) != 0:
            total += m2
        if (BITS & 8) != 0:
            total += m3
        return total

    @triton.jit
    def _accumulate(p, group, v, l_g, acc_g, alpha, GROUP: tl.constexpr):
        p_g = tl.where(group[None, :] == GROUP, p, 0.0)
        return l_g * alpha + tl.sum(p_g, 1), pv_dot(p_g, v, acc_g * alpha[:, None])

    @triton.jit
    def _zero_groups(BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Per key group (up to MAX_GROUPS) an empty sum [BLOCK_R] and accumulator [BLOCK_R, BLOCK_D]."""
        return (tl.zeros([BLOCK_R], tl.float32), tl.zeros([BLOCK_R], tl.float32), tl.zeros([BLOCK_R], tl.float32),
                tl.zeros([BLOCK_R], tl.float32), tl.zeros([BLOCK_R, BLOCK_D], tl.float32),
                tl.zeros([BLOCK_R, BLOCK_D], tl.float32), tl.zeros([BLOCK_R, BLOCK_D], tl.float32),
                tl.zeros([BLOCK_R, BLOCK_D], tl.float32))

    @triton.jit
    def _group_epilogue(l0, l1, l2, l3, acc0, acc1, acc2, acc3, TAB, heads, row_ok, mass_min, ratio_min,
                        HAS_POST: tl.constexpr, MASS_BITS: tl.constexpr, HAS_RATIO: tl.constexpr,
                        NUM_BITS: tl.constexpr, DEN_BITS: tl.constexpr):
        """The output rows from the per-group sums and accumulators (one max): normalised, and where the spec
        redistributes (HAS_POST) each group's share scaled by keep + receive * freed / received."""
        total = l0 + l1 + l2 + l3
        has = total > 0.0
        inv = tl.where(has, 1.0 / tl.where(has, total, 1.0), 0.0)
        if HAS_POST:
            m0, m1, m2, m3 = l0 * inv, l1 * inv, l2 * inv, l3 * inv
            k0 = _column(TAB, heads, row_ok, 3, 0)
            k1 = _column(TAB, heads, row_ok, 3, 1)
            k2 = _column(TAB, heads, row_ok, 3, 2)
            k3 = _column(TAB, heads, row_ok, 3, 3)
            r0 = _column(TAB, heads, row_ok, 4, 0)
            r1 = _column(TAB, heads, row_ok, 4, 1)
            r2 = _column(TAB, heads, row_ok, 4, 2)
            r3 = _column(TAB, heads, row_ok, 4, 3)
            freed = (1 - k0) * m0 + (1 - k1) * m1 + (1 - k2) * m2 + (1 - k3) * m3
            received = r0 * m0 + r1 * m1 + r2 * m2 + r3 * m3
            active = received > 0.0
            if MASS_BITS != 0:
                active = active & (_mass(m0, m1, m2, m3, MASS_BITS) >= mass_min)
            if HAS_RATIO:
                active = active & (_mass(m0, m1, m2, m3, NUM_BITS) >= ratio_min * _mass(m0, m1, m2, m3, DEN_BITS))
            share = freed / tl.where(received > 0.0, received, 1.0)
            acc = (acc0 * tl.where(active, k0 + r0 * share, 1.0)[:, None]
                   + acc1 * tl.where(active, k1 + r1 * share, 1.0)[:, None]
                   + acc2 * tl.where(active, k2 + r2 * share, 1.0)[:, None]
                   + acc3 * tl.where(active, k3 + r3 * share, 1.0)[:, None])
        else:
            acc = acc0 + acc1 + acc2 + acc3
        return acc * inv[:, None]

    @triton.jit
    def _store_group(PO, PL, part, g, l_g, acc_g, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NG: tl.constexpr):
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        row = (part * NG + g) * BLOCK_R + offs_r
        tl.store(PO + row[:, None] * BLOCK_D + offs_d[None, :], acc_g)
        tl.store(PL + row, l_g)

    @triton.jit
    def _load_group(PO, PL, part, g, scale, l_g, acc_g, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                    NG: tl.constexpr):
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        row = (part * NG + g) * BLOCK_R + offs_r
        acc_g += tl.load(PO + row[:, None] * BLOCK_D + offs_d[None, :]) * scale[:, None]
        l_g += tl.load(PL + row) * scale
        return l_g, acc_g

    @triton.jit
    def _group_decode_kernel(
        Q, K, V, O, GRP, KBIAS, KVALID, TAB, PO, PL, PM,
        sqb, sqh, skb, skh, skn, svb, svh, svn, sob, soh, sgb, skbb, skvb, skvn,
        Hkv, KVG, NK, mass_min, ratio_min, n_split, split_len,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        NG: tl.constexpr, HAS_KBIAS: tl.constexpr, HAS_KVALID: tl.constexpr, PRE_ABS: tl.constexpr,
        HAS_POST: tl.constexpr, MASS_BITS: tl.constexpr, HAS_RATIO: tl.constexpr, NUM_BITS: tl.constexpr,
        DEN_BITS: tl.constexpr, DIRECT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        b = (pid // Hkv).to(tl.int64)
        h = pid % Hkv
        offs_r = tl.arange(0, BLOCK_R)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_r < KVG
        heads = h * KVG + offs_r
        q = _load_rows(Q + b * sqb, heads, sqh, offs_d, row_ok, HEAD_D, BLOCK_D, True)
        s0 = _column(TAB, heads, row_ok, 0, 0)
        s1 = _column(TAB, heads, row_ok, 0, 1)
        s2 = _column(TAB, heads, row_ok, 0, 2)
        s3 = _column(TAB, heads, row_ok, 0, 3)
        a0 = _column(TAB, heads, row_ok, 1, 0)
        a1 = _column(TAB, heads, row_ok, 1, 1)
        a2 = _column(TAB, heads, row_ok, 1, 2)
        a3 = _column(TAB, heads, row_ok, 1, 3)
        c0 = _column(TAB, heads, row_ok, 2, 0)
        c1 = _column(TAB, heads, row_ok, 2, 1)
        c2 = _column(TAB, heads, row_ok, 2, 2)
        c3 = _column(TAB, heads, row_ok, 2, 3)
        k_base = K + b * skb + h.to(tl.int64) * skh
        v_base = V + b * svb + h.to(tl.int64) * svh
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l0, l1, l2, l3, acc0, acc1, acc2, acc3 = _zero_groups(BLOCK_R, BLOCK_D)
        start = sp * split_len
        end = tl.minimum(start + split_len, NK)
        for n in range(start, end, BLOCK_N):
            cols = n + offs_n
            ok = cols < end
            if HAS_KVALID:
                ok = ok & (tl.load(KVALID + b * skvb + cols * skvn, mask=ok, other=0) != 0)
            group = tl.load(GRP + b * sgb + cols, mask=ok, other=0)
            k = _load_rows(k_base, cols, skn, offs_d, ok, HEAD_D, BLOCK_D, True)
            dot = mma(q, tl.trans(k), None)  # q.k; the tables hold scaling * log2(e)
            s = dot * _per_key(group, s0, s1, s2, s3, NG) + _per_key(group, c0, c1, c2, c3, NG)
            if PRE_ABS:
                s += _per_key(group, a0, a1, a2, a3, NG) * tl.abs(dot)
            if HAS_KBIAS:
                s += tl.load(KBIAS + b * skbb + cols, mask=ok, other=0.0)[None, :] * 1.4426950408889634
            p, alpha, m_new = softmax_step(tl.where(ok[None, :], s, float("-inf")), m_i)
            v = _load_rows(v_base, cols, svn, offs_d, ok, HEAD_D, BLOCK_D, True)
            l0, acc0 = _accumulate(p, group, v, l0, acc0, alpha, 0)
            if NG > 1:
                l1, acc1 = _accumulate(p, group, v, l1, acc1, alpha, 1)
            if NG > 2:
                l2, acc2 = _accumulate(p, group, v, l2, acc2, alpha, 2)
            if NG > 3:
                l3, acc3 = _accumulate(p, group, v, l3, acc3, alpha, 3)
            m_i = m_new
        if DIRECT:
            out = _group_epilogue(l0, l1, l2, l3, acc0, acc1, acc2, acc3, TAB, heads, row_ok, mass_min, ratio_min,
                                  HAS_POST, MASS_BITS, HAS_RATIO, NUM_BITS, DEN_BITS)
            o_ptrs = O + b * sob + heads[:, None].to(tl.int64) * soh + offs_d[None, :]
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_D)[None, :])
        else:  # this split's running max and per-group sums and accumulators (relative to it), for the merge
            part = pid.to(tl.int64) * n_split + sp
            tl.store(PM + part * BLOCK_R + offs_r, m_i)
            _store_group(PO, PL, part, 0, l0, acc0, BLOCK_R, BLOCK_D, NG)
            if NG > 1:
                _store_group(PO, PL, part, 1, l1, acc1, BLOCK_R, BLOCK_D, NG)
            if NG > 2:
                _store_group(PO, PL, part, 2, l2, acc2, BLOCK_R, BLOCK_D, NG)
            if NG > 3:
                _store_group(PO, PL, part, 3, l3, acc3, BLOCK_R, BLOCK_D, NG)

    @triton.jit
    def _group_merge_kernel(
        O, TAB, PO, PL, PM, sob, soh, Hkv, KVG, mass_min, ratio_min, n_split,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, NG: tl.constexpr,
        HAS_POST: tl.constexpr, MASS_BITS: tl.constexpr, HAS_RATIO: tl.constexpr, NUM_BITS: tl.constexpr,
        DEN_BITS: tl.constexpr,
    ):
        """The splits' per-group partials brought to one max and summed, then the epilogue (the redistribution
        needs every key's group masses, so it runs after the merge)."""
        pid = tl.program_id(0)
        b = (pid // Hkv).to(tl.int64)
        h = pid % Hkv
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_r < KVG
        heads = h * KVG + offs_r
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for s in range(0, n_split):
            m = tl.maximum(m, tl.load(PM + (pid.to(tl.int64) * n_split + s) * BLOCK_R + offs_r))
        m_use = tl.where(m == float("-inf"), 0.0, m)
        l0, l1, l2, l3, acc0, acc1, acc2, acc3 = _zero_groups(BLOCK_R, BLOCK_D)
        for s in range(0, n_split):
            part = pid.to(tl.int64) * n_split + s
            scale = tl.math.exp2(tl.load(PM + part * BLOCK_R + offs_r) - m_use)  # 0 for a split with no key
            l0, acc0 = _load_group(PO, PL, part, 0, scale, l0, acc0, BLOCK_R, BLOCK_D, NG)
            if NG > 1:
                l1, acc1 = _load_group(PO, PL, part, 1, scale, l1, acc1, BLOCK_R, BLOCK_D, NG)
            if NG > 2:
                l2, acc2 = _load_group(PO, PL, part, 2, scale, l2, acc2, BLOCK_R, BLOCK_D, NG)
            if NG > 3:
                l3, acc3 = _load_group(PO, PL, part, 3, scale, l3, acc3, BLOCK_R, BLOCK_D, NG)
        out = _group_epilogue(l0, l1, l2, l3, acc0, acc1, acc2, acc3, TAB, heads, row_ok, mass_min, ratio_min,
                              HAS_POST, MASS_BITS, HAS_RATIO, NUM_BITS, DEN_BITS)
        o_ptrs = O + b * sob + heads[:, None].to(tl.int64) * soh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_D)[None, :])


def _bits(groups) -> int:
    return sum(1 << g for g in set(groups))


def decode_tables(spec: GroupSpec, scaling: float, device) -> dict:
    """The spec's tables for the decoding kernel, cached on the spec: TAB [Hq, 5, MAX_GROUPS] fp32 (scale * c,
    abs * c, bias * log2e, keep, receive with c = scaling * log2e; unused groups are identity) and the flags."""
    key = ("decode", float(scaling), str(device))
    if key not in spec._cache:
        if spec.num_groups > MAX_GROUPS:
            raise NotImplementedError(f"the decoding kernel takes up to {MAX_GROUPS} key groups, not {spec.num_groups}")
        scale, absolute, bias, keep, receive = spec.tables()
        c = float(scaling) * LOG2E
        table = torch.zeros(spec.num_heads, 5, MAX_GROUPS)
        table[:, 0], table[:, 3] = c, 1.0
        g = spec.num_groups
        table[:, 0, :g], table[:, 1, :g], table[:, 2, :g] = scale * c, absolute * c, bias * LOG2E
        table[:, 3, :g], table[:, 4, :g] = keep, receive
        has_post = bool((keep != 1).any() or (receive != 0).any())
        ratio = spec.cond_ratio_groups
        spec._cache[key] = dict(
            table=table.to(device).contiguous(), groups=g, pre_abs=bool((absolute != 0).any()), has_post=has_post,
            mass_bits=_bits(spec.cond_mass_groups) if has_post else 0, has_ratio=has_post and ratio is not None,
            num_bits=_bits(ratio[0]) if ratio else 0, den_bits=_bits(ratio[1]) if ratio else 0,
        )
    return spec._cache[key]


# min_split / target_programs: the split geometry (split_decode.split_geometry), as kernel 5's; not tuned on a GPU yet
DECODE_CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 3, "min_split": 256, "target_programs": 528}


def group_decode_triton(query, key, value, *, key_group, spec: GroupSpec, key_valid=None, scaling: float,
                        key_bias=None):
    batch, hq, hkv, nq, nk, d = check_qkv(query, key, value)
    if nq != 1:
        raise ValueError("group_decode_attention takes one query row per sample")
    if spec.num_heads != hq:
        raise ValueError(f"spec has {spec.num_heads} heads, query has {hq}")
    if key_group.shape[1] < nk or (key_bias is not None and key_bias.shape[1] < nk):
        raise ValueError(f"key_group / key_bias cover fewer than the {nk} keys")
    prep = decode_tables(spec, scaling, query.device)
    query, key, value = (last_dim_contiguous(t) for t in (query, key, value))
    group = key_group if key_group.stride(-1) == 1 else key_group.contiguous()
    out = torch.empty(batch, 1, hq, d, dtype=query.dtype, device=query.device)
    valid = key_valid.view(torch.uint8) if key_valid is not None and key_valid.dtype == torch.bool else key_valid
    bd, block_r = decode_blocks(d, hq, hkv)
    block_n, stages, min_split = decode_tiles(DECODE_CONFIG["block_n"], DECODE_CONFIG["num_stages"],
                                              DECODE_CONFIG["min_split"], bd, query.element_size(), query.device)
    split_len, n_split = split_geometry(nk, batch * hkv, target_programs=DECODE_CONFIG["target_programs"],
                                        min_split=min_split, split_multiple=block_n)
    ng, programs = prep["groups"], batch * hkv
    direct = n_split == 1
    if direct:
        po = pl = pm = out
    else:
        po = torch.empty(programs * n_split * ng * block_r * bd, dtype=torch.float32, device=out.device)
        pl = torch.empty(programs * n_split * ng * block_r, dtype=torch.float32, device=out.device)
        pm = torch.empty(programs * n_split * block_r, dtype=torch.float32, device=out.device)
    flags = dict(HAS_POST=prep["has_post"], MASS_BITS=prep["mass_bits"], HAS_RATIO=prep["has_ratio"],
                 NUM_BITS=prep["num_bits"], DEN_BITS=prep["den_bits"])
    launch(_group_decode_kernel, (programs, n_split),
        query, key, value, out, group, key_bias if key_bias is not None else group,
        valid if valid is not None else group, prep["table"], po, pl, pm,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), out.stride(0), out.stride(2), group.stride(0),
        key_bias.stride(0) if key_bias is not None else 0,
        valid.stride(0) if valid is not None else 0, valid.stride(1) if valid is not None else 0,
        hkv, hq // hkv, nk, float(spec.cond_mass_min), float(spec.cond_ratio_min), n_split, split_len,
        HEAD_D=d, BLOCK_D=bd, BLOCK_R=block_r, BLOCK_N=block_n, NG=ng, HAS_KBIAS=key_bias is not None,
        HAS_KVALID=valid is not None, PRE_ABS=prep["pre_abs"], DIRECT=direct, **flags,
        num_warps=DECODE_CONFIG["num_warps"], num_stages=stages,
    )  # fmt: skip
    if not direct:
        launch(_group_merge_kernel, (programs,),
            out, prep["table"], po, pl, pm, out.stride(0), out.stride(2), hkv, hq // hkv,
            float(spec.cond_mass_min), float(spec.cond_ratio_min), n_split,
            HEAD_D=d, BLOCK_D=bd, BLOCK_R=block_r, NG=ng, **flags, num_warps=4,
        )  # fmt: skip
    return out


def group_decode_reference(query, key, value, *, key_group, spec: GroupSpec, key_valid=None, scaling: float,
                           key_bias=None):
    """group_attention_reference on the one row, the group and bias buffers cut to the cache length."""
    nk = key.shape[2]
    return group_attention_reference(query, key, value, key_group=key_group[:, :nk], spec=spec,
                                     key_valid=key_valid, causal=True, scaling=scaling,
                                     key_bias=None if key_bias is None else key_bias[:, :nk])
