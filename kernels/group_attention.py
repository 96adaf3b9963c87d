"""Kernel 3: group-reweighted attention in one flash-style pass.

Keys carry a group id (key_group [B, Nk], e.g. 0 text, 1 image, 2 visual sink). For the selected query rows
(query_select [B, Nq], None = all rows) and per (query head, group):

  pre-softmax   a = q.k * scaling  ->  a * scale[h,g] + abs[h,g] * |a| + bias[h,g] (+ key_bias[b, j])
                (PAI: abs = alpha on image keys; VAF / ClearSight / AdaptVis: scale = w; GIFT: key_bias)
  post-softmax  P = softmax(a) over the allowed keys, M_g = sum of P over group g,
                F = sum_g (1 - keep[h,g]) M_g (freed mass), R = sum_g receive[h,g] M_g,
                P'_j = c_g(j) P_j with c_g = keep[h,g] + receive[h,g] * F / R
                (VAR: sink keep 1-p, image receive; ACT / OCR-head sink: sink keep beta, all others receive)
                applied only where R > 0 and the optional row condition holds:
                mass(cond_mass_groups) >= cond_mass_min and mass(num) >= cond_ratio_min * mass(den)
                (VAR's image-centric rows: image mass >= 0.2 and non-sink share of it >= rho).
  out = P' V.   Rows not selected, and heads with identity parameters, get plain attention.

Exactness in one pass: the kernel keeps one running max and separate (sum, accumulator) per *class* of keys
(groups that share keep/receive in every head form one class; at most two classes), so the coefficients, known only
at the end of the row, are applied in the epilogue. A sink group (spec.sink_group: few keys, e.g. token 0 or the
visual sink tokens) stays in class 0 of the main loop and is recomputed in the epilogue from an index list (16-key
tiles) with its own (max, sum, accumulator); the epilogue swaps its coefficient (c_sink - c_0), so no third
accumulator lives through the main loop and the main loop needs no per-key sink mask.

Launches: the (head, query block) tiles without a selected row (or of an identity head) come from SDPA's default
backend when it computes the same attention (no key padding, as many queries as keys when causal: SDPA runs over
every tile and this kernel overwrites the modified ones; up to SELECTED_ROWS_MAX selected rows per sample (PAI's last
row, VAR's question rows) it computes those rows only, split over key chunks and merged through the log-sum-exp by
_group_rows_merge_kernel, which runs the epilogue; more rows: 64-row tiles), else from the plain forward kernel of
masked_attention.py (which skips the modified tiles); this kernel computes only the modified tiles. When every tile
is modified (every row of every head: VAF, ACT) this kernel runs alone. Per-key inputs (below) are built once per
key-group tensor and reused by every layer that passes the same tensor. Pre-softmax tables
are expanded on the host into per-key vectors (scale +- abs folded with scaling*log2e, bias*log2e), so the loop
does one multiply (+ one select for abs, one add for bias) per logit.

The torch reference `group_attention_reference` computes exactly the formulas above in fp32; its two halves,
`group_logits` (pre-softmax) and `group_redistribution` (post-softmax), are also the engine's dense path for a
method's group edit (vlm_efficient/edits.py).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from ._common import block_d, byte_flags, cdiv, check_qkv, last_dim_contiguous, next_pow2, repeat_kv, triton_available
from .configs import launch_config
from .launch import launch
from .masked_attention import dense_mask, placeholder, sdpa_attention, sdpa_routable

LOG2E = 1.4426950408889634

if triton_available():
    import triton
    import triton.language as tl

    from .masked_attention import _load_rows, mma, pv_dot, softmax_step

    @triton.jit
    def _premod(s, sel, FPOS_H, FNEG_H, BIAS_H, idx, idx_ok, scaling,
                HAS_PRE: tl.constexpr, PRE_ABS: tl.constexpr, PRE_BIAS: tl.constexpr, SEL_ALL: tl.constexpr):
        """Raw dot s -> log2-domain logits. Selected rows: s * f(sign s)[key] + bias[key] with per-key vectors
        precomputed on the host (f = scaling*log2e*(scale +- abs), bias = (bias + key_bias)*log2e)."""
        c = scaling * 1.4426950408889634
        if HAS_PRE:
            fp = tl.load(FPOS_H + idx, mask=idx_ok, other=0.0)
            if PRE_ABS:
                fn = tl.load(FNEG_H + idx, mask=idx_ok, other=0.0)
                x2 = s * tl.where(s >= 0, fp[None, :], fn[None, :])
            else:
                x2 = s * fp[None, :]
            if PRE_BIAS:
                x2 = x2 + tl.load(BIAS_H + idx, mask=idx_ok, other=0.0)[None, :]
            if SEL_ALL:
                x = x2
            else:
                x = tl.where(sel[:, None], x2, s * c)
        else:
            x = s * c
        return x

    @triton.jit
    def _glogits(q, sel, qpos, k_base, skn, cols, col_ok, offs_d, scaling, FPOS_H, FNEG_H, BIAS_H, KVALID_ROW,
                 MASKED: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_PRE: tl.constexpr, PRE_ABS: tl.constexpr, PRE_BIAS: tl.constexpr, SEL_ALL: tl.constexpr):
        """One key tile's log2-domain logits with the group edit's terms before the softmax, -inf where masked."""
        k = _load_rows(k_base, cols, skn, offs_d, col_ok, HEAD_D, BLOCK_D, MASKED)
        s = mma(q, tl.trans(k), None)
        x = _premod(s, sel, FPOS_H, FNEG_H, BIAS_H, cols, col_ok, scaling, HAS_PRE, PRE_ABS, PRE_BIAS, SEL_ALL)
        if MASKED:
            if CAUSAL:
                x = tl.where((cols[None, :] <= qpos[:, None]) & col_ok[None, :], x, float("-inf"))
            else:
                x = tl.where(col_ok[None, :], x, float("-inf"))
        if KVALID_ROW is not None:
            kv = tl.load(KVALID_ROW + cols, mask=col_ok, other=0)
            x = tl.where((kv != 0)[None, :], x, float("-inf"))
        return x

    @triton.jit
    def _gstep(acc, acc1, l_i, l1, m_i, q, sel, qpos, k_base, v_base, skn, svn, start_n, offs_n, offs_d, scaling,
               FPOS_H, FNEG_H, BIAS_H, KVALID_ROW, CLS_ROW, Nk,
               MASKED: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_PRE: tl.constexpr, PRE_ABS: tl.constexpr, PRE_BIAS: tl.constexpr, SEL_ALL: tl.constexpr):
        """One key tile of the two-class form: every allowed key's mass and output, and class 1's apart."""
        cols = start_n + offs_n
        col_ok = cols < Nk
        x = _glogits(q, sel, qpos, k_base, skn, cols, col_ok, offs_d, scaling, FPOS_H, FNEG_H, BIAS_H, KVALID_ROW,
                     MASKED, HEAD_D, BLOCK_D, CAUSAL, HAS_PRE, PRE_ABS, PRE_BIAS, SEL_ALL)
        p, alpha, m_new = softmax_step(x, m_i)
        v = _load_rows(v_base, cols, svn, offs_d, col_ok, HEAD_D, BLOCK_D, MASKED)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = pv_dot(p, v, acc * alpha[:, None])
        p1 = tl.where((tl.load(CLS_ROW + cols, mask=col_ok, other=0) != 0)[None, :], p, 0.0)
        l1 = l1 * alpha + tl.sum(p1, 1)
        acc1 = pv_dot(p1, v, acc1 * alpha[:, None])
        return acc, acc1, l_i, l1, m_new

    @triton.jit
    def _gstep1(acc, l_i, m_i, q, sel, qpos, k_base, v_base, skn, svn, start_n, offs_n, offs_d, scaling,
                FPOS_H, FNEG_H, BIAS_H, KVALID_ROW, Nk,
                MASKED: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_PRE: tl.constexpr, PRE_ABS: tl.constexpr, PRE_BIAS: tl.constexpr, SEL_ALL: tl.constexpr):
        """_gstep with a single class (one accumulator, nothing else loop-carried: keeps the wgmma pipeline as in the
        plain kernel)."""
        cols = start_n + offs_n
        col_ok = cols < Nk
        x = _glogits(q, sel, qpos, k_base, skn, cols, col_ok, offs_d, scaling, FPOS_H, FNEG_H, BIAS_H, KVALID_ROW,
                     MASKED, HEAD_D, BLOCK_D, CAUSAL, HAS_PRE, PRE_ABS, PRE_BIAS, SEL_ALL)
        p, alpha, m_new = softmax_step(x, m_i)
        v = _load_rows(v_base, cols, svn, offs_d, col_ok, HEAD_D, BLOCK_D, MASKED)
        l_i = l_i * alpha + tl.sum(p, 1)
        return pv_dot(p, v, acc * alpha[:, None]), l_i, m_new

    @triton.jit
    def _unit_mass(bits, m0, m1, ms):
        return (tl.where((bits & 1) != 0, m0, 0.0) + tl.where((bits & 2) != 0, m1, 0.0)
                + tl.where((bits & 4) != 0, ms, 0.0))

    @triton.jit
    def _group_epilogue(acc, acc1, l_i, l1, m_i, q, sel, qpos, special, row_ok, o_rows, O, b, h, sob, som, soh,
                        k_base, v_base, skn, svn, offs_d, scaling, FPOS_H, FNEG_H, BIAS_H, KVALID_ROW, SINK_IDX,
                        SINK_CNT, POST, Nk, cm_bits, cm_min, cn_bits, cd_bits, cr_min, BLOCK_M: tl.constexpr,
                        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_PRE: tl.constexpr,
                        PRE_ABS: tl.constexpr, PRE_BIAS: tl.constexpr, SEL_ALL: tl.constexpr,
                        TWO_CLASS: tl.constexpr, HAS_SINK: tl.constexpr, HAS_POST: tl.constexpr,
                        HAS_COND: tl.constexpr, SINK_BLOCK: tl.constexpr):
        """From the main loop's (max, sums, accumulators) of BLOCK_M query rows (token rows o_rows of the output):
        the sink keys' own pass, the post-softmax coefficients, the store of the rows in row_ok."""
        # sink keys: own (max, sum, accumulator), from the index list
        m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_s = tl.zeros([BLOCK_M], tl.float32)
        acc_s = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if HAS_SINK:
            n_s = tl.where(special, tl.load(SINK_CNT + b), 0)
            offs_j = tl.arange(0, SINK_BLOCK)
            for c in range(0, tl.cdiv(n_s, SINK_BLOCK)):
                j = c * SINK_BLOCK + offs_j
                jok = j < n_s
                sidx = tl.load(SINK_IDX + b.to(tl.int64) * Nk + j, mask=jok, other=0)
                ks = _load_rows(k_base, sidx, skn, offs_d, jok, HEAD_D, BLOCK_D, True)
                s = mma(q, tl.trans(ks), None)
                x = _premod(s, sel, FPOS_H, FNEG_H, BIAS_H, sidx, jok, scaling, HAS_PRE, PRE_ABS, PRE_BIAS,
                            SEL_ALL)
                ok = (qpos >= 0)[:, None] & jok[None, :]
                if CAUSAL:
                    ok = ok & (sidx[None, :] <= qpos[:, None])
                if KVALID_ROW is not None:
                    kv = tl.load(KVALID_ROW + sidx, mask=jok, other=0)
                    ok = ok & (kv != 0)[None, :]
                p, alpha, m_new = softmax_step(tl.where(ok, x, float("-inf")), m_s)
                l_s = l_s * alpha + tl.sum(p, 1)
                vs = _load_rows(v_base, sidx, svn, offs_d, jok, HEAD_D, BLOCK_D, True)
                acc_s = pv_dot(p, vs, acc_s * alpha[:, None])
                m_s = m_new
        m_all = tl.maximum(m_i, m_s)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        a_main = tl.math.exp2(m_i - m_all)
        a_sink = tl.math.exp2(m_s - m_all)
        big_l = l_i * a_main  # every allowed key, the sinks included
        big_l1 = l1 * a_main  # class-1 keys (never sinks)
        big_ls = l_s * a_sink  # the sinks again, from the epilogue pass
        total = big_l
        has = total > 0.0
        inv = tl.where(has, 1.0 / tl.where(has, total, 1.0), 0.0)
        c0 = tl.full([BLOCK_M], 1.0, tl.float32)
        c1 = c0
        cs = c0
        if HAS_POST:
            mass1 = big_l1 * inv
            mass_s = tl.minimum(big_ls * inv, 1.0 - mass1)
            mass0 = tl.maximum(1.0 - mass1 - mass_s, 0.0) * tl.where(has, 1.0, 0.0)
            POST_H = POST + h * 6
            k0 = tl.load(POST_H + 0)
            r0 = tl.load(POST_H + 1)
            k1 = tl.load(POST_H + 2)
            r1 = tl.load(POST_H + 3)
            k_s = tl.load(POST_H + 4)
            r_s = tl.load(POST_H + 5)
            freed = (1.0 - k0) * mass0 + (1.0 - k1) * mass1 + (1.0 - k_s) * mass_s
            recv = r0 * mass0 + r1 * mass1 + r_s * mass_s
            active = sel & has & (recv > 0.0)
            if HAS_COND:
                active = active & (_unit_mass(cm_bits, mass0, mass1, mass_s) >= cm_min)
                active = active & (_unit_mass(cn_bits, mass0, mass1, mass_s)
                                   >= cr_min * _unit_mass(cd_bits, mass0, mass1, mass_s))
            fr = freed / tl.where(recv > 0.0, recv, 1.0)
            c0 = tl.where(active, k0 + r0 * fr, 1.0)
            c1 = tl.where(active, k1 + r1 * fr, 1.0)
            cs = tl.where(active, k_s + r_s * fr, 1.0)
        if TWO_CLASS:
            o_main = acc * c0[:, None] + acc1 * (c1 - c0)[:, None]
        else:
            o_main = acc * c0[:, None]
        # sink keys sit in class 0 of the main accumulators: swap their coefficient c0 for cs
        out = (o_main * a_main[:, None] + acc_s * ((cs - c0) * a_sink)[:, None]) * inv[:, None]
        o_ptrs = (O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + o_rows.to(tl.int64)[:, None] * som
                  + offs_d[None, :])
        if BLOCK_D != HEAD_D:
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_D)[None, :])
        else:
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _group_bases(Q, K, V, FPOS, FNEG, BIAS, CLS1, b, h, kvh, sqb, sqh, skb, skh, svb, svh, sfb, sfh, Nk):
        """The pointers of sample b, query head h (KV head kvh) that kernel 3's programs read: its query, key and
        value rows, its per-key factor and bias rows, the sample's class-1 flags."""
        b64, h64, kv64 = b.to(tl.int64), h.to(tl.int64), kvh.to(tl.int64)
        return (Q + b64 * sqb + h64 * sqh, K + b64 * skb + kv64 * skh, V + b64 * svb + kv64 * svh,
                FPOS + b64 * sfb + h64 * sfh, FNEG + b64 * sfb + h64 * sfh, BIAS + b64 * sfb + h64 * sfh,
                CLS1 + b64 * Nk)

    @triton.jit
    def _group_fwd_kernel(
        Q, K, V, O, KVALID, QSEL, FPOS, FNEG, BIAS, CLS1, HEAD_ON, POST, SINK_IDX, SINK_CNT,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, som, soh, sfb, sfh, skvb, sselb,
        Hq, G, Nq, Nk, q_off, scaling, n_qblocks, cm_bits, cm_min, cn_bits, cd_bits, cr_min,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KVALID: tl.constexpr, HAS_QSEL: tl.constexpr,
        HAS_PRE: tl.constexpr, PRE_ABS: tl.constexpr, PRE_BIAS: tl.constexpr, TWO_CLASS: tl.constexpr,
        HAS_SINK: tl.constexpr, HAS_POST: tl.constexpr, HAS_COND: tl.constexpr, SINK_BLOCK: tl.constexpr,
    ):
        """Only the (head, query block) programs with a selected row and a non-identity head compute; the others
        are left to the plain kernel (launched with skip_sel) and write nothing here."""
        pid_bh = tl.program_id(0)
        qb = n_qblocks - 1 - tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < Nq
        if HAS_QSEL:
            sel = (tl.load(QSEL + b.to(tl.int64) * sselb + offs_m, mask=row_ok, other=0) != 0) & row_ok
        else:
            sel = row_ok
        special = (tl.load(HEAD_ON + h) != 0) & (tl.max(sel.to(tl.int32), 0) > 0)
        q_base, k_base, v_base, FPOS_H, FNEG_H, BIAS_H, CLS_ROW = _group_bases(
            Q, K, V, FPOS, FNEG, BIAS, CLS1, b, h, h // G, sqb, sqh, skb, skh, svb, svh, sfb, sfh, Nk)
        q = _load_rows(q_base, offs_m, sqm, offs_d, row_ok, HEAD_D, BLOCK_D, True)
        row_ok = (row_ok.to(tl.int32) * special.to(tl.int32)) != 0
        qpos = tl.where(row_ok, offs_m + q_off, -1)
        if HAS_KVALID:
            KVALID_ROW = KVALID + b.to(tl.int64) * skvb
        else:
            KVALID_ROW = None
        if CAUSAL:
            hi = tl.minimum(Nk, q_off + (qb + 1) * BLOCK_M)
            n_full = tl.minimum(tl.maximum((q_off + qb * BLOCK_M + 1) // BLOCK_N, 0), Nk // BLOCK_N)
        else:
            hi = Nk
            n_full = Nk // BLOCK_N
        hi = tl.where(special, hi, 0)
        n_full = tl.where(special, n_full, 0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        l1 = tl.zeros([BLOCK_M], tl.float32)
        SEL_ALL: tl.constexpr = not HAS_QSEL
        if TWO_CLASS:
            for kb in range(0, n_full):
                acc, acc1, l_i, l1, m_i = _gstep(acc, acc1, l_i, l1, m_i, q, sel, qpos, k_base, v_base, skn, svn,
                                                 kb * BLOCK_N, offs_n, offs_d, scaling, FPOS_H, FNEG_H, BIAS_H,
                                                 KVALID_ROW, CLS_ROW, Nk, False, HEAD_D, BLOCK_D, CAUSAL,
                                                 HAS_PRE, PRE_ABS, PRE_BIAS, SEL_ALL)
            for kb in range(n_full, tl.cdiv(hi, BLOCK_N)):
                acc, acc1, l_i, l1, m_i = _gstep(acc, acc1, l_i, l1, m_i, q, sel, qpos, k_base, v_base, skn, svn,
                                                 kb * BLOCK_N, offs_n, offs_d, scaling, FPOS_H, FNEG_H, BIAS_H,
                                                 KVALID_ROW, CLS_ROW, Nk, True, HEAD_D, BLOCK_D, CAUSAL,
                                                 HAS_PRE, PRE_ABS, PRE_BIAS, SEL_ALL)
        else:  # one accumulator only (nothing else loop-carried: keeps the wgmma pipeline as in the plain kernel)
            for kb in range(0, n_full):
                acc, l_i, m_i = _gstep1(acc, l_i, m_i, q, sel, qpos, k_base, v_base, skn, svn,
                                        kb * BLOCK_N, offs_n, offs_d, scaling, FPOS_H, FNEG_H, BIAS_H,
                                        KVALID_ROW, Nk, False, HEAD_D, BLOCK_D, CAUSAL,
                                        HAS_PRE, PRE_ABS, PRE_BIAS, SEL_ALL)
            for kb in range(n_full, tl.cdiv(hi, BLOCK_N)):
                acc, l_i, m_i = _gstep1(acc, l_i, m_i, q, sel, qpos, k_base, v_base, skn, svn,
                                        kb * BLOCK_N, offs_n, offs_d, scaling, FPOS_H, FNEG_H, BIAS_H,
                                        KVALID_ROW, Nk, True, HEAD_D, BLOCK_D, CAUSAL,
                                        HAS_PRE, PRE_ABS, PRE_BIAS, SEL_ALL)
        _group_epilogue(acc, acc1, l_i, l1, m_i, q, sel, qpos, special, row_ok, offs_m, O, b, h, sob, som, soh,
                        k_base, v_base, skn, svn, offs_d, scaling, FPOS_H, FNEG_H, BIAS_H, KVALID_ROW, SINK_IDX,
                        SINK_CNT, POST, Nk, cm_bits, cm_min, cn_bits, cd_bits, cr_min, BLOCK_M, HEAD_D, BLOCK_D,
                        CAUSAL, HAS_PRE, PRE_ABS, PRE_BIAS, SEL_ALL, TWO_CLASS, HAS_SINK, HAS_POST, HAS_COND,
                        SINK_BLOCK)


    @triton.jit
    def _group_rows_kernel(
        Q, K, V, ROWS, PSTAT, PACC, KVALID, FPOS, FNEG, BIAS, CLS1, HEAD_ON,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sfb, sfh, skvb,
        Hq, G, Nq, Nk, q_off, scaling, R, n_chunks, blocks_per_chunk,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KVALID: tl.constexpr, HAS_PRE: tl.constexpr, PRE_ABS: tl.constexpr,
        PRE_BIAS: tl.constexpr, TWO_CLASS: tl.constexpr,
    ):
        """Program (b * Hq + h, key chunk): the main loop of the group kernel for the R selected rows only (16-row
        tiles of the index list ROWS [B, R]), over one chunk of key blocks; partial (max, sum, class-1 sum) into
        PSTAT [3, B, Hq, R, chunks] and accumulators into PACC [1 or 2, B, Hq, R, chunks, BLOCK_D]. Identity
        heads compute nothing (SDPA's rows stand)."""
        pid_bh = tl.program_id(0)
        chunk = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        on = tl.load(HEAD_ON + h) != 0
        kb_lo = chunk * blocks_per_chunk
        kb_hi = tl.where(on, tl.minimum(kb_lo + blocks_per_chunk, tl.cdiv(Nk, BLOCK_N)), kb_lo)
        offs_r = tl.arange(0, ROW_BLOCK)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q_base, k_base, v_base, FPOS_H, FNEG_H, BIAS_H, CLS_ROW = _group_bases(
            Q, K, V, FPOS, FNEG, BIAS, CLS1, b, h, h // G, sqb, sqh, skb, skh, svb, svh, sfb, sfh, Nk)
        if HAS_KVALID:
            KVALID_ROW = KVALID + b.to(tl.int64) * skvb
        else:
            KVALID_ROW = None
        plane = tl.num_programs(0) * R * n_chunks  # one [B, Hq, R, chunks] plane
        for c in range(0, tl.cdiv(R, ROW_BLOCK)):
            ridx = c * ROW_BLOCK + offs_r
            rows = tl.load(ROWS + b.to(tl.int64) * R + ridx, mask=ridx < R, other=-1)
            row_ok = (rows >= 0) & (rows < Nq)
            q = _load_rows(q_base, rows, sqm, offs_d, row_ok, HEAD_D, BLOCK_D, True)
            qpos = tl.where(row_ok, rows + q_off, -1)
            m_i = tl.full([ROW_BLOCK], float("-inf"), tl.float32)
            l_i = tl.zeros([ROW_BLOCK], tl.float32)
            l1 = tl.zeros([ROW_BLOCK], tl.float32)
            acc = tl.zeros([ROW_BLOCK, BLOCK_D], tl.float32)
            acc1 = tl.zeros([ROW_BLOCK, BLOCK_D], tl.float32)
            for kb in range(kb_lo, kb_hi):
                if TWO_CLASS:
                    acc, acc1, l_i, l1, m_i = _gstep(acc, acc1, l_i, l1, m_i, q, row_ok, qpos, k_base, v_base, skn,
                                                     svn, kb * BLOCK_N, offs_n, offs_d, scaling, FPOS_H, FNEG_H,
                                                     BIAS_H, KVALID_ROW, CLS_ROW, Nk, True, HEAD_D, BLOCK_D, CAUSAL,
                                                     HAS_PRE, PRE_ABS, PRE_BIAS, True)
                else:
                    acc, l_i, m_i = _gstep1(acc, l_i, m_i, q, row_ok, qpos, k_base, v_base, skn, svn,
                                            kb * BLOCK_N, offs_n, offs_d, scaling, FPOS_H, FNEG_H, BIAS_H,
                                            KVALID_ROW, Nk, True, HEAD_D, BLOCK_D, CAUSAL,
                                            HAS_PRE, PRE_ABS, PRE_BIAS, True)
            part = (pid_bh.to(tl.int64) * R + ridx) * n_chunks + chunk  # [ROW_BLOCK]
            keep = ridx < R
            tl.store(PSTAT + part, m_i, mask=keep)
            tl.store(PSTAT + plane + part, l_i, mask=keep)
            tl.store(PSTAT + 2 * plane + part, l1, mask=keep)
            a_ptrs = PACC + part[:, None] * BLOCK_D + offs_d[None, :]
            tl.store(a_ptrs, acc, mask=keep[:, None])
            if TWO_CLASS:
                tl.store(a_ptrs + plane * BLOCK_D, acc1, mask=keep[:, None])

    @triton.jit
    def _group_rows_merge_kernel(
        Q, K, V, O, ROWS, PSTAT, PACC, KVALID, FPOS, FNEG, BIAS, HEAD_ON, POST, SINK_IDX, SINK_CNT,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, som, soh, sfb, sfh, skvb,
        Hq, G, Nq, Nk, q_off, scaling, R, n_chunks, cm_bits, cm_min, cn_bits, cd_bits, cr_min,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KVALID: tl.constexpr, HAS_PRE: tl.constexpr, PRE_ABS: tl.constexpr,
        PRE_BIAS: tl.constexpr, TWO_CLASS: tl.constexpr, HAS_SINK: tl.constexpr, HAS_POST: tl.constexpr,
        HAS_COND: tl.constexpr, SINK_BLOCK: tl.constexpr,
    ):
        """Program (b * Hq + h, 16-row tile of ROWS): the chunks' partials combined through the log-sum-exp (a
        common max), then the group kernel's epilogue (sinks, coefficients) and the store of those rows."""
        pid_bh = tl.program_id(0)
        b = pid_bh // Hq
        h = pid_bh % Hq
        special = tl.load(HEAD_ON + h) != 0
        ridx = tl.program_id(1) * ROW_BLOCK + tl.arange(0, ROW_BLOCK)
        rows = tl.load(ROWS + b.to(tl.int64) * R + ridx, mask=ridx < R, other=-1)
        row_ok = (((rows >= 0) & (rows < Nq)).to(tl.int32) * special.to(tl.int32)) != 0
        offs_d = tl.arange(0, BLOCK_D)
        offs_c = tl.arange(0, CHUNKS)
        plane = tl.num_programs(0) * R * n_chunks
        part = (pid_bh.to(tl.int64) * R + ridx)[:, None] * n_chunks + offs_c[None, :]  # [ROW_BLOCK, CHUNKS]
        ok2 = (ridx < R)[:, None] & (offs_c < n_chunks)[None, :]
        pm = tl.load(PSTAT + part, mask=ok2, other=float("-inf"))
        m_i = tl.max(pm, 1)
        m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
        scale = tl.math.exp2(pm - m_use[:, None])  # 0 for empty chunks
        l_i = tl.sum(tl.load(PSTAT + plane + part, mask=ok2, other=0.0) * scale, 1)
        l1 = tl.sum(tl.load(PSTAT + 2 * plane + part, mask=ok2, other=0.0) * scale, 1)
        acc = tl.zeros([ROW_BLOCK, BLOCK_D], tl.float32)
        acc1 = tl.zeros([ROW_BLOCK, BLOCK_D], tl.float32)
        for c in range(0, n_chunks):
            w = tl.sum(tl.where(offs_c[None, :] == c, scale, 0.0), 1)
            a_ptrs = PACC + ((pid_bh.to(tl.int64) * R + ridx) * n_chunks + c)[:, None] * BLOCK_D + offs_d[None, :]
            acc += tl.load(a_ptrs, mask=(ridx < R)[:, None], other=0.0) * w[:, None]
            if TWO_CLASS:
                acc1 += tl.load(a_ptrs + plane * BLOCK_D, mask=(ridx < R)[:, None], other=0.0) * w[:, None]
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        q = _load_rows(q_base, rows, sqm, offs_d, row_ok, HEAD_D, BLOCK_D, True)
        qpos = tl.where(row_ok, rows + q_off, -1)
        k_base = K + b.to(tl.int64) * skb + (h // G).to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + (h // G).to(tl.int64) * svh
        FPOS_H = FPOS + b.to(tl.int64) * sfb + h.to(tl.int64) * sfh
        FNEG_H = FNEG + b.to(tl.int64) * sfb + h.to(tl.int64) * sfh
        BIAS_H = BIAS + b.to(tl.int64) * sfb + h.to(tl.int64) * sfh
        if HAS_KVALID:
            KVALID_ROW = KVALID + b.to(tl.int64) * skvb
        else:
            KVALID_ROW = None
        _group_epilogue(acc, acc1, l_i, l1, m_i, q, row_ok, qpos, special, row_ok, rows, O, b, h, sob, som, soh,
                        k_base, v_base, skn, svn, offs_d, scaling, FPOS_H, FNEG_H, BIAS_H, KVALID_ROW, SINK_IDX,
                        SINK_CNT, POST, Nk, cm_bits, cm_min, cn_bits, cd_bits, cr_min, ROW_BLOCK, HEAD_D, BLOCK_D,
                        CAUSAL, HAS_PRE, PRE_ABS, PRE_BIAS, True, TWO_CLASS, HAS_SINK, HAS_POST, HAS_COND,
                        SINK_BLOCK)


# ----------------------------------------------------------------------------------------------------------------
# the spec

IDENTITY = (1.0, 0.0, 0.0, 1.0, 0.0)  # the tables' values that change nothing: scale, abs, bias, keep, receive


def _table(value, num_heads: int, num_groups: int, default: float) -> torch.Tensor:
    if value is None:
        return torch.full((num_heads, num_groups), float(default))
    t = torch.as_tensor(value, dtype=torch.float32).cpu()
    if t.dim() == 0:
        t = t.expand(num_groups)
    if t.dim() == 1:
        t = t[None].expand(num_heads, num_groups)
    if tuple(t.shape) != (num_heads, num_groups):
        raise ValueError(f"table must be [G], [Hq, G] or a scalar; got {tuple(t.shape)}")
    return t.clone()


@dataclass
class GroupSpec:
    """Per (query head, key group) parameters; tables are [Hq, G] (or [G], broadcast over heads).
    See the module docstring for the formulas. `num_heads` is the number of QUERY heads."""

    num_heads: int
    num_groups: int
    logit_scale: object = None  # default 1
    logit_abs: object = None  # default 0
    logit_bias: object = None  # default 0
    keep: object = None  # default 1
    receive: object = None  # default 0
    sink_group: int | None = None  # group processed from an index list in the epilogue (keep it small)
    cond_mass_groups: tuple[int, ...] = ()
    cond_mass_min: float = 0.0
    cond_ratio_groups: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (numerator, denominator)
    cond_ratio_min: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def tables(self):
        h, g = self.num_heads, self.num_groups
        return (_table(self.logit_scale, h, g, 1.0), _table(self.logit_abs, h, g, 0.0),
                _table(self.logit_bias, h, g, 0.0), _table(self.keep, h, g, 1.0), _table(self.receive, h, g, 0.0))

    def on_heads(self, heads=None) -> "GroupSpec":
        """This spec in the query heads `heads` only (None: every head, self): the other heads get identity tables."""
        if heads is None:
            return self
        chosen = torch.zeros(self.num_heads, 1, dtype=torch.bool)
        chosen[list(heads)] = True
        tables = [torch.where(chosen, table, identity) for table, identity in zip(self.tables(), IDENTITY)]
        return GroupSpec(self.num_heads, self.num_groups, *tables, sink_group=self.sink_group,
                         cond_mass_groups=self.cond_mass_groups, cond_mass_min=self.cond_mass_min,
                         cond_ratio_groups=self.cond_ratio_groups, cond_ratio_min=self.cond_ratio_min)

    # ---- kernel tables ----
    def prepare(self, device):
        key = str(device)
        if key in self._cache:
            return self._cache[key]
        scale, ab, bias, keep, recv = self.tables()
        h, g = self.num_heads, self.num_groups
        has_pre = bool((scale != 1).any() or (ab != 0).any() or (bias != 0).any())
        has_post = bool((keep != 1).any() or (recv != 0).any())
        sink = self.sink_group if has_post else None
        cls_of = [0] * g
        sigs: list[tuple] = []
        for gi in range(g):
            if gi == sink:
                cls_of[gi] = 2
                continue
            sig = (tuple(keep[:, gi].tolist()), tuple(recv[:, gi].tolist())) if has_post else ()
            if sig not in sigs:
                sigs.append(sig)
            cls_of[gi] = sigs.index(sig)
        if len(sigs) > 2:
            raise NotImplementedError("more than two distinct (keep, receive) columns besides the sink group")
        post = torch.ones(h, 6)
        post[:, 1::2] = 0.0
        for gi in range(g):
            c = cls_of[gi]
            post[:, 2 * c] = keep[:, gi]
            post[:, 2 * c + 1] = recv[:, gi]

        def bits(groups):
            out = 0
            for c in {cls_of[x] for x in groups}:
                members = [x for x in range(g) if cls_of[x] == c]
                if not set(members) <= set(groups):
                    raise NotImplementedError(f"condition group set {groups} splits a class {members}")
                out |= 1 << c
            return out

        has_cond = has_post and (bool(self.cond_mass_groups) or self.cond_ratio_groups is not None)
        cm_bits = bits(self.cond_mass_groups) if has_cond else 0
        if has_cond and self.cond_ratio_groups is not None:
            cn_bits, cd_bits = bits(self.cond_ratio_groups[0]), bits(self.cond_ratio_groups[1])
        else:
            cn_bits = cd_bits = 0
        head_on = ((scale != 1) | (ab != 0) | (bias != 0) | (keep != 1) | (recv != 0)).any(1)
        pre = torch.stack([scale, ab, bias], 1)  # [Hq, 3, G]
        prepared = dict(
            pre=pre.to(device=device, dtype=torch.float32).contiguous(),
            cls=torch.tensor(cls_of, dtype=torch.int32, device=device),
            post=post.to(device=device, dtype=torch.float32).contiguous(),
            head_on=head_on.to(device=device, dtype=torch.int32), n_on=int(head_on.sum()),
            has_pre=has_pre, pre_abs=bool((ab != 0).any()), pre_bias=bool((bias != 0).any()), has_post=has_post, sink=sink, two_class=len(sigs) == 2, has_cond=has_cond,
            cm_bits=cm_bits, cn_bits=cn_bits, cd_bits=cd_bits,
        )
        self._cache[key] = prepared
        return prepared


# ----------------------------------------------------------------------------------------------------------------

_TUNED: dict = {}


def set_config(head_dim: int, config: tuple[int, int, int, int] | None) -> None:
    """Override (BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim (benchmark sweeps)."""
    if config is None:
        _TUNED.pop(head_dim, None)
    else:
        _TUNED[head_dim] = tuple(config)


def _config(head_dim: int, nq: int, device, sparse: bool = False) -> tuple[int, int, int, int]:
    """sparse: the group kernel computes only the modified tiles next to SDPA (few rows: PAI's last row, VAR's
    question rows), "k3_sparse" in configs.json (64-row tiles halve the work of a tile holding one selected row)."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if sparse:
        return launch_config("k3_sparse", head_dim, device)
    if nq <= 64:
        return 64, 64, 4, 3
    if head_dim in _TUNED:
        return _TUNED[head_dim]
    return launch_config("k3", head_dim, device)


def _folded_tables(spec: GroupSpec, scaling: float, device):
    """The pre-softmax tables folded for the kernel, [(scale + abs) c, (scale - abs) c, bias log2e] with
    c = scaling log2e, as [Hq or 1 (the same in every head), G] fp32 on `device`; cached on the spec, so a call copies
    nothing from the host (a host-to-device copy waits for the stream: it would serialise decoding steps)."""
    key = ("folded", float(scaling), str(device))
    if key not in spec._cache:
        scale, ab, bias, _, _ = spec.tables()
        c = float(scaling) * LOG2E
        tables = [(scale + ab) * c, (scale - ab) * c, bias * LOG2E]
        uniform = all(bool((t == t[:1]).all()) for t in tables)
        spec._cache[key] = [(t[:1] if uniform else t).to(device=device, dtype=torch.float32) for t in tables]
    return spec._cache[key]


def _per_key(tables, key_group: torch.Tensor):
    """[Hq or 1, G] tables (on the device) -> [B, Hq or 1, Nk] fp32 per-key vectors (one shared head stride)."""
    g = key_group.long()
    return [t[:, g].permute(1, 0, 2).contiguous() for t in tables]  # [B, H', Nk]


KEY_TABLES_KEPT = 8  # per-layout entries a spec keeps (one per distinct key_group / key_bias pair alive)


def _version(tensor: torch.Tensor | None):
    """The in-place version of a cached input. An inference tensor (made under torch.inference_mode, as the layout
    tensors are when a caller generates in it) counts no versions: it is taken as unchanged while it lives, which holds
    for the inputs the router builds (per forward, never written in place; the fast path's reloaded buffers are plain
    tensors, made outside inference mode)."""
    return None if tensor is None else ("inference" if tensor.is_inference() else tensor._version)


def _key_tables(spec: GroupSpec, prep: dict, key_group: torch.Tensor, key_bias, scaling: float, device):
    """The group kernel's per-key inputs: (fpos, fneg, fbias, batch stride, head stride), sink index list and count,
    class-1 flags. Built once per (key_group, key_bias) tensor pair and kept on the spec while those tensors live
    unmodified, so the layers of one forward that pass the same tensors do no host work for them."""
    cache = spec._cache.setdefault(("key_tables", float(scaling), str(device)), {})
    ident = (id(key_group), id(key_bias))
    versions = (_version(key_group), _version(key_bias))
    entry = cache.get(ident)
    if (entry is not None and entry[0]() is key_group and (key_bias is None or entry[1]() is key_bias)
            and entry[2] == versions):
        return entry[3]
    dz = placeholder(device)
    fz = placeholder(device, torch.float32)
    kgroup = key_group.to(device=device).long()
    if prep["has_pre"] or key_bias is not None:
        fpos, fneg, fbias = _per_key(_folded_tables(spec, scaling, device), kgroup)
        if key_bias is not None:
            fbias = (fbias + key_bias.to(device=device, dtype=torch.float32)[:, None, :] * LOG2E).contiguous()
            if fbias.shape[1] != fpos.shape[1]:
                fpos, fneg = (t.expand(-1, fbias.shape[1], -1).contiguous() for t in (fpos, fneg))
        pre = (fpos, fneg, fbias, fpos.stride(0), fpos.stride(1) if fpos.shape[1] > 1 else 0)
    else:
        pre = (fz, fz, fz, 0, 0)
    sink = prep["sink"]
    if sink is not None:
        is_sink = kgroup == sink
        sinks = (torch.argsort((~is_sink).to(torch.int8), dim=1, stable=True).to(torch.int32).contiguous(),
                 is_sink.sum(1).to(torch.int32))
    else:
        sinks = (dz, dz)
    cls1 = (prep["cls"].long()[kgroup] == 1).to(torch.int8).contiguous() if prep["two_class"] else dz
    tables = (pre, sinks, cls1)
    if len(cache) >= KEY_TABLES_KEPT:
        cache.pop(next(iter(cache)))
    cache[ident] = (weakref.ref(key_group), None if key_bias is None else weakref.ref(key_bias), versions, tables)
    return tables


def _all_heads(hq: int, device) -> torch.Tensor:
    key = (hq, str(device))
    if key not in _ALL_HEADS:
        _ALL_HEADS[key] = torch.ones(hq, dtype=torch.int32, device=device)
    return _ALL_HEADS[key]


_ALL_HEADS: dict = {}


SELECTED_ROWS_MAX = 64  # selected rows per sample up to which kernel 3 computes rows, not 64-row tiles
_ROW_LISTS: dict = {}


def _selected_rows(query_select: torch.Tensor) -> torch.Tensor | None:
    """[B, R] int32 indices of the selected rows (-1 padded), or None when a sample selects more than
    SELECTED_ROWS_MAX (or none). Built once per query_select tensor while it lives unmodified: one host read (R) per
    layout, none per layer."""
    key = id(query_select)
    entry = _ROW_LISTS.get(key)
    if entry is not None and entry[0]() is query_select and entry[1] == _version(query_select):
        return entry[2]
    sel = query_select.bool()
    counts = sel.sum(1)
    width = int(counts.max())
    rows = None
    if 0 < width <= SELECTED_ROWS_MAX:
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :width]
        used = torch.arange(width, device=sel.device)[None, :] < counts[:, None]
        rows = torch.where(used, order, -1).to(torch.int32).contiguous()
    if len(_ROW_LISTS) >= KEY_TABLES_KEPT:
        _ROW_LISTS.pop(next(iter(_ROW_LISTS)))
    _ROW_LISTS[key] = (weakref.ref(query_select), _version(query_select), rows)
    return rows


def _group_rows(query, key, value, out, rows, spec, prep, key_group, key_bias, head_on, scaling, causal):
    """Kernel 3 on the listed rows only (into `out`, whose other rows SDPA wrote): _group_rows_kernel over
    (batch x head, key chunk), ~2 programs per SM, then _group_rows_merge_kernel (log-sum-exp merge + epilogue)."""
    from .attention_stats import _programs_target, _rows_plan

    batch, hq, nq, d = query.shape
    hkv, nk = key.shape[1], key.shape[2]
    dev = query.device
    n_rows = rows.shape[1]
    block_n, warps, stages = (64, 4, 3) if dev.type == "cuda" else (16, 4, 1)
    n_chunks, per_chunk = _rows_plan(batch, hq, nk, block_n, _programs_target(str(dev)))
    bd = block_d(d)
    stat = torch.empty(3, batch, hq, n_rows, n_chunks, dtype=torch.float32, device=dev)
    acc = torch.empty(2 if prep["two_class"] else 1, batch, hq, n_rows, n_chunks, bd, dtype=torch.float32,
                      device=dev)
    (fpos, fneg, fbias, sfb, sfh), (sink_idx, sink_cnt), cls1 = _key_tables(spec, prep, key_group, key_bias,
                                                                             scaling, dev)
    pre = dict(HAS_PRE=prep["has_pre"] or key_bias is not None, PRE_ABS=prep["pre_abs"],
               PRE_BIAS=prep["pre_bias"] or key_bias is not None, TWO_CLASS=prep["two_class"])
    kvalid = placeholder(dev)  # the SDPA route has no key padding
    strides = (*query.stride()[:3], *key.stride()[:3], *value.stride()[:3])
    launch(_group_rows_kernel, (batch * hq, n_chunks),
        query, key, value, rows, stat, acc, kvalid, fpos, fneg, fbias, cls1, head_on,
        *strides, sfb, sfh, 0, hq, hq // hkv, nq, nk, nk - nq, float(scaling), n_rows, n_chunks, per_chunk,
        HEAD_D=d, BLOCK_D=bd, ROW_BLOCK=16, BLOCK_N=block_n, CAUSAL=causal, HAS_KVALID=False, **pre,
        num_warps=warps, num_stages=stages)
    launch(_group_rows_merge_kernel, (batch * hq, cdiv(n_rows, 16)),
        query, key, value, out, rows, stat, acc, kvalid, fpos, fneg, fbias, head_on, prep["post"], sink_idx,
        sink_cnt, *strides, *out.stride()[:3], sfb, sfh, 0, hq, hq // hkv, nq, nk, nk - nq, float(scaling), n_rows,
        n_chunks, prep["cm_bits"], float(spec.cond_mass_min), prep["cn_bits"], prep["cd_bits"],
        float(spec.cond_ratio_min),
        HEAD_D=d, BLOCK_D=bd, ROW_BLOCK=16, CHUNKS=max(2, next_pow2(n_chunks)), CAUSAL=causal, HAS_KVALID=False,
        **pre, HAS_SINK=prep["sink"] is not None, HAS_POST=prep["has_post"], HAS_COND=prep["has_cond"],
        SINK_BLOCK=16, num_warps=4)


def group_attention_triton(query, key, value, *, key_group: torch.Tensor, spec: GroupSpec, key_valid=None,
                           causal: bool = True, scaling: float, query_select=None, key_bias=None):
    """The unmodified (head, query block) tiles from SDPA's default backend when it computes the same attention (no
    key padding, no causal offset): SDPA runs over everything and the group kernel overwrites only the tiles with a
    selected row in a non-identity head. Otherwise the plain forward kernel computes the unmodified tiles (skipping
    the others). When every tile is modified (all rows, all heads: VAF, ACT) the group kernel alone runs."""
    from .masked_attention import launch_fwd

    batch, hq, hkv, nq, nk, d = check_qkv(query, key, value)
    if spec.num_heads != hq:
        raise ValueError(f"spec has {spec.num_heads} heads, query has {hq}")
    query, key, value = last_dim_contiguous(query), last_dim_contiguous(key), last_dim_contiguous(value)
    dev = query.device
    prep = spec.prepare(dev)
    head_on = prep["head_on"] if key_bias is None else _all_heads(hq, dev)
    n_on = int(prep["n_on"]) if key_bias is None else hq
    to_sdpa = sdpa_routable(nq, nk, causal, key_valid)
    if n_on == 0:
        if to_sdpa:
            return sdpa_attention(query, key, value, scaling=scaling, causal=causal)
        return launch_fwd(query, key, value, scaling=scaling, causal=causal, key_valid=key_valid)[0]
    qsel = byte_flags(query_select.to(device=dev)) if query_select is not None else None
    every_tile = qsel is None and n_on == hq
    bm, bn, warps, stages = _config(d, nq, dev, sparse=to_sdpa and not every_tile)
    if every_tile:
        out = torch.empty(batch, nq, hq, d, dtype=query.dtype, device=dev)
    elif to_sdpa:
        out = sdpa_attention(query, key, value, scaling=scaling, causal=causal)  # the group kernel overwrites tiles
        rows = _selected_rows(query_select) if query_select is not None else None
        if rows is not None:  # few rows: only those, split over key chunks (the tiles would walk all keys serially)
            _group_rows(query, key, value, out, rows, spec, prep, key_group, key_bias, head_on, scaling, causal)
            return out
    else:
        out = torch.empty(batch, nq, hq, d, dtype=query.dtype, device=dev)
        skip = (qsel if qsel is not None else torch.ones(batch, nq, dtype=torch.int8, device=dev), head_on)
        launch_fwd(query, key, value, scaling=scaling, causal=causal, key_valid=key_valid, skip_sel=skip, out=out)
    (fpos, fneg, fbias, sfb, sfh), (sink_idx, sink_cnt), cls1 = _key_tables(spec, prep, key_group, key_bias,
                                                                             scaling, dev)
    dz = placeholder(dev)
    kvalid = byte_flags(key_valid.to(device=dev)) if key_valid is not None else dz
    nqb = cdiv(nq, bm)
    launch(_group_fwd_kernel, (batch * hq, nqb),
        query, key, value, out, kvalid, qsel if qsel is not None else dz, fpos, fneg, fbias, cls1, head_on,
        prep["post"], sink_idx, sink_cnt,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3], sfb, sfh, kvalid.stride(0),
        qsel.stride(0) if qsel is not None else 0,
        hq, hq // hkv, nq, nk, nk - nq, float(scaling), nqb,
        prep["cm_bits"], float(spec.cond_mass_min), prep["cn_bits"], prep["cd_bits"], float(spec.cond_ratio_min),
        HEAD_D=d, BLOCK_D=block_d(d), BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
        HAS_KVALID=key_valid is not None, HAS_QSEL=qsel is not None, HAS_PRE=prep["has_pre"] or key_bias is not None,
        PRE_ABS=prep["pre_abs"], PRE_BIAS=prep["pre_bias"] or key_bias is not None, TWO_CLASS=prep["two_class"],
        HAS_SINK=prep["sink"] is not None, HAS_POST=prep["has_post"], HAS_COND=prep["has_cond"], SINK_BLOCK=16,
        num_warps=warps, num_stages=stages,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# torch reference

def key_table(table: torch.Tensor, key_group: torch.Tensor) -> torch.Tensor:
    """A [Hq, G] table at each key's group: key_group [B, k] -> [B, Hq, 1, k]."""
    return table.to(key_group.device)[:, key_group.long()].permute(1, 0, 2)[:, :, None, :]


def group_logits(logits: torch.Tensor, key_group: torch.Tensor, spec: GroupSpec, key_bias=None) -> torch.Tensor:
    """The pre-softmax formula: logits [B, Hq, q, k] (a = q.k * scaling, fp32) of keys in groups key_group [B, k] ->
    a * scale[h, g] + abs[h, g] * |a| + bias[h, g] (+ key_bias [B, k]), for every row (the caller picks the rows)."""
    scale, ab, bias = (key_table(table, key_group.to(logits.device)) for table in spec.tables()[:3])
    out = logits * scale + ab * logits.abs() + bias
    return out if key_bias is None else out + key_bias.to(logits.device).float()[:, None, None, :]


def group_redistribution(probs: torch.Tensor, key_group: torch.Tensor, spec: GroupSpec,
                         selected: torch.Tensor | None = None) -> torch.Tensor:
    """The post-softmax formula: probabilities [B, Hq, q, k] (fp32, zero on blocked keys) of keys in groups key_group
    [B, k] -> P' = c_g(j) P_j on the rows where it applies (selected [B, q] or None = every row, a positive receiving
    mass, the optional row condition); other rows unchanged."""
    dev = probs.device
    _, _, _, keep, recv = (t.to(dev) for t in spec.tables())
    onehot = torch.nn.functional.one_hot(key_group.to(dev).long(), spec.num_groups).float()  # [B, k, G]
    mass = torch.einsum("bhqk,bkg->bhqg", probs, onehot)
    keep_h = keep[None, :, None, :]
    recv_h = recv[None, :, None, :]
    freed = ((1 - keep_h) * mass).sum(-1)
    received = (recv_h * mass).sum(-1)
    active = received > 0
    if selected is not None:
        active = active & selected.to(dev)[:, None, :]
    if spec.cond_mass_groups:
        active = active & (mass[..., list(spec.cond_mass_groups)].sum(-1) >= spec.cond_mass_min)
    if spec.cond_ratio_groups is not None:
        num = mass[..., list(spec.cond_ratio_groups[0])].sum(-1)
        den = mass[..., list(spec.cond_ratio_groups[1])].sum(-1)
        active = active & (num >= spec.cond_ratio_min * den)
    coef = keep_h + recv_h * (freed / torch.where(received > 0, received, 1))[..., None]
    coef = torch.where(active[..., None], coef, 1.0)  # [B, H, q, G]
    return probs * torch.einsum("bhqg,bkg->bhqk", coef, onehot)


def group_attention_reference(query, key, value, *, key_group: torch.Tensor, spec: GroupSpec, key_valid=None,
                              causal: bool = True, scaling: float, query_select=None, key_bias=None,
                              return_probs: bool = False):
    """fp32, dense: exactly the formulas of the module docstring, per group (no classes, no tricks)."""
    batch, hq, hkv, nq, nk, d = check_qkv(query, key, value)
    dev = query.device
    k = repeat_kv(key, hq // hkv).float()
    v = repeat_kv(value, hq // hkv).float()
    a = (query.float() @ k.transpose(-1, -2)) * scaling  # [B, H, Nq, Nk]
    sel = torch.ones(batch, nq, dtype=torch.bool, device=dev) if query_select is None else query_select.bool()
    a = torch.where(sel[:, None, :, None], group_logits(a, key_group, spec, key_bias), a)
    allowed = dense_mask(nq, nk, causal=causal, key_valid=key_valid, device=dev)[:, None]
    a = a.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(a, -1) * allowed
    probs2 = group_redistribution(probs, key_group, spec, sel)
    out = (probs2 @ v).to(query.dtype).transpose(1, 2).contiguous()
    return (out, probs2) if return_probs else out
