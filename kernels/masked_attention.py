"""Kernel 1: flash-style prefill attention with structured masks (and the plain causal / padding fast path).

One Triton kernel serves three entry points:
  * `flash_attention`      plain causal or full attention with key padding (dense iteration, no block lists);
  * `masked_attention`     a StructuredMask: per-query-block lists of FULL key blocks (no mask work) and PARTIAL
                           key blocks (the rule evaluated per element from packed token info); the rest skipped;
  * `attention_with_received_stats` (attention_stats.py) reuses it: STATS=1 stores the selected rows' scaled
                           logits against the key tiles each program owns (its diagonal tiles, already in shared
                           memory in the causal loop) for a small finalize kernel; STATS=2 re-walks the key blocks
                           for the selected rows after the main loop and adds column sums with atomics.
  * `group_attention` (group_attention.py) launches it with SKIP_SEL to compute the unmodified tiles.

Layout: query [B, Hq, Nq, d], key/value [B, Hkv, Nk, d] (GQA: query head h reads kv head h // (Hq / Hkv)), output
[B, Nq, Hq, d]. Queries are the LAST Nq token positions (q_off = Nk - Nq). Rows with no allowed key give 0.
head_dim 80 runs in a 128-wide tile with masked lanes (37.5% wasted MMA work).

The torch references are at the bottom (`masked_attention_reference`, `attention_reference`).
"""

from __future__ import annotations

import math
import typing

import torch
import torch.nn.functional as F

from ._common import (block_d, byte_flags, cdiv, check_qkv, interpret_mode, last_dim_contiguous, repeat_kv,
                      triton_available)
from .configs import launch_config
from .launch import launch
from .layout import StructuredMask

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

if triton_available():
    import triton
    import triton.language as tl

    # Triton's CPU interpreter (3.9) computes tl.dot on bf16 operands wrongly (numpy has no bf16): upcast there.
    _INTERP = tl.constexpr(interpret_mode())

    @triton.jit
    def mma(a, b, acc):
        """tl.dot with fp32 accumulation (operands upcast under the interpreter only). fp32 operands multiply in full
        precision, as torch's matmul does by default (Triton's default for them is TF32: fp32 models routed through
        the kernels would otherwise differ from the torch path at the 1e-3 level)."""
        if _INTERP:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        if a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def pv_dot(p, v, acc):
        """acc + p @ v with p rounded to v's dtype (bf16 / fp16), fp32 accumulation."""
        return mma(p.to(v.dtype), v, acc)

    @triton.jit
    def softmax_step(x, m_i):
        """One key tile of an online softmax over base-2 logits x [rows, keys] (-inf where masked): (p, alpha, m_new),
        m_new the new running row max, p = exp2(x - m) and alpha = exp2(m_i - m) with m = m_new, or 0 in a row with no
        allowed key so far (its p stays 0, not NaN). The caller rescales its sums and accumulators by alpha."""
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        return tl.math.exp2(x - m_use[:, None]), tl.math.exp2(m_i - m_use), m_new

    @triton.jit
    def _rule(qpos, kpos, qinfo, kinfo, qgrid, kgrid, qknock, wr, wc, mutual_bits,
              CAUSAL: tl.constexpr, IMG_RULE: tl.constexpr, WINDOW_CAUSAL: tl.constexpr,
              MUTUAL: tl.constexpr, KNOCK: tl.constexpr):
        """The layout rule of layout.py for a [M, N] tile. Positions are token positions (key index space)."""
        qp = qpos[:, None]
        kp = kpos[None, :]
        if CAUSAL:
            ok = kp <= qp
        else:
            ok = (kp >= 0) & (qp >= 0)
        q_img = ((qinfo >> 4) & 1)[:, None] == 1
        k_img = ((kinfo >> 4) & 1)[None, :] == 1
        both = q_img & k_img
        if IMG_RULE == 1:  # NAAViT: image rows see no other image token
            ok = ok & ((both == 0) | (qp == kp))
        if IMG_RULE == 2:  # neighbour window inside one image
            same = (qinfo >> 8)[:, None] == (kinfo >> 8)[None, :]
            dr = (qgrid >> 16)[:, None] - (kgrid >> 16)[None, :]
            dc = (qgrid & 0xFFFF)[:, None] - (kgrid & 0xFFFF)[None, :]
            win = same & (dr <= wr) & (dr >= -wr) & (dc <= wc) & (dc >= -wc)
            if WINDOW_CAUSAL:
                win = win & (kp <= qp)
            ok = tl.where(both, win, ok)
        krole = kinfo & 15
        if MUTUAL:  # AKI: image rows also see later text keys of chosen roles
            mrole = ((mutual_bits >> krole) & 1)[None, :] == 1
            ok = ok | (q_img & (k_img == 0) & (kp > qp) & mrole)
        if KNOCK:
            blocked = ((qknock[:, None] >> krole[None, :]) & 1) == 1
            ok = ok & (blocked == 0)
        kvalid = ((kinfo >> 5) & 1)[None, :] == 1
        return ok & kvalid

    @triton.jit
    def _load_rows(base, rows, stride, offs_d, row_ok, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                   CHECK_ROWS: tl.constexpr):
        ptrs = base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
        if CHECK_ROWS:
            if BLOCK_D != HEAD_D:
                return tl.load(ptrs, mask=row_ok[:, None] & (offs_d < HEAD_D)[None, :], other=0.0)
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        if BLOCK_D != HEAD_D:
            return tl.load(ptrs, mask=(offs_d < HEAD_D)[None, :], other=0.0)
        return tl.load(ptrs)

    @triton.jit
    def _fwd_step(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n, offs_n, offs_d, qk_scale,
                  qpos, qinfo, qgrid, qknock, KVALID_ROW, INFO_ROW, GRID_ROW, Nk, wr, wc, mutual_bits,
                  MODE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                  CAUSAL: tl.constexpr, IMG_RULE: tl.constexpr, WINDOW_CAUSAL: tl.constexpr,
                  MUTUAL: tl.constexpr, KNOCK: tl.constexpr):
        """One key block of the online softmax. MODE 0: no mask; 1: key padding only; 2: structured rule;
        3: dense causal + bounds (+ key padding via KVALID_ROW when not None)."""
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_kn, offs_d, cols < Nk, HEAD_D, BLOCK_D, MODE >= 2)
        return _fwd_core(acc, l_i, m_i, q, k, v_base, stride_vn, start_n, offs_n, offs_d, qk_scale,
                         qpos, qinfo, qgrid, qknock, KVALID_ROW, INFO_ROW, GRID_ROW, Nk, wr, wc, mutual_bits,
                         MODE, HEAD_D, BLOCK_D, CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)

    @triton.jit
    def _fwd_core(acc, l_i, m_i, q, k, v_base, stride_vn, start_n, offs_n, offs_d, qk_scale,
                  qpos, qinfo, qgrid, qknock, KVALID_ROW, INFO_ROW, GRID_ROW, Nk, wr, wc, mutual_bits,
                  MODE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                  CAUSAL: tl.constexpr, IMG_RULE: tl.constexpr, WINDOW_CAUSAL: tl.constexpr,
                  MUTUAL: tl.constexpr, KNOCK: tl.constexpr):
        """_fwd_step with the key tile already loaded."""
        cols = start_n + offs_n
        col_ok = cols < Nk
        qk = mma(q, tl.trans(k), None)
        if MODE == 0:  # a tile with nothing masked: no -inf to guard against, the scale applied after the max
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        else:
            if MODE == 1:
                kv = tl.load(KVALID_ROW + cols)
                ok = (kv != 0)[None, :] & (qpos >= 0)[:, None]
            elif MODE == 2:
                kinfo = tl.load(INFO_ROW + cols, mask=col_ok, other=0)
                if IMG_RULE == 2:
                    kgrid = tl.load(GRID_ROW + cols, mask=col_ok, other=0)
                else:
                    kgrid = kinfo
                ok = _rule(qpos, cols, qinfo, kinfo, qgrid, kgrid, qknock, wr, wc, mutual_bits,
                           CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
            else:
                if CAUSAL:
                    ok = (cols[None, :] <= qpos[:, None]) & col_ok[None, :]
                else:
                    ok = col_ok[None, :] & (qpos >= 0)[:, None]
                if KVALID_ROW is not None:
                    kv = tl.load(KVALID_ROW + cols, mask=col_ok, other=0)
                    ok = ok & (kv != 0)[None, :]
            p, alpha, m_new = softmax_step(tl.where(ok, qk * qk_scale, float("-inf")), m_i)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, cols, stride_vn, offs_d, col_ok, HEAD_D, BLOCK_D, MODE >= 2)
        acc = acc * alpha[:, None]
        acc = pv_dot(p, v, acc)
        return acc, l_i, m_new

    @triton.jit
    def _rule_rows(qpos, row_ok, cols, col_ok, INFO_ROW, GRID_ROW, KNOCK_T, wr, wc, mutual_bits,
                   CAUSAL: tl.constexpr, IMG_RULE: tl.constexpr, WINDOW_CAUSAL: tl.constexpr, MUTUAL: tl.constexpr,
                   KNOCK: tl.constexpr):
        """_rule for query rows at token positions qpos (row_ok: used) against keys cols (col_ok: in range), with both
        sides' layout entries (info, grid, knockout table) loaded here."""
        kinfo = tl.load(INFO_ROW + cols, mask=col_ok, other=0)
        qinfo = tl.load(INFO_ROW + qpos, mask=row_ok, other=0)
        if IMG_RULE == 2:
            kgrid = tl.load(GRID_ROW + cols, mask=col_ok, other=0)
            qgrid = tl.load(GRID_ROW + qpos, mask=row_ok, other=0)
        else:
            kgrid = kinfo
            qgrid = qinfo
        if KNOCK:
            qknock = tl.load(KNOCK_T + (qinfo & 15))
        else:
            qknock = qinfo
        return _rule(qpos, cols, qinfo, kinfo, qgrid, kgrid, qknock, wr, wc, mutual_bits,
                     CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)

    @triton.jit
    def _rows_allowed(rows, row_ok, cols, col_ok, q_off, KVALID_ROW, INFO_ROW, GRID_ROW, KNOCK_T, wr, wc, mutual_bits,
                      LISTS: tl.constexpr, CAUSAL: tl.constexpr, IMG_RULE: tl.constexpr,
                      WINDOW_CAUSAL: tl.constexpr, MUTUAL: tl.constexpr, KNOCK: tl.constexpr):
        """[rows, cols] bool: may query row `rows` (index into the Nq axis) see key `cols` (structured rule when
        LISTS, else causal / full + key padding). False on unused rows and out-of-range keys."""
        qpos = tl.where(row_ok, rows + q_off, -1)
        if LISTS:
            ok = _rule_rows(qpos, row_ok, cols, col_ok, INFO_ROW, GRID_ROW, KNOCK_T, wr, wc, mutual_bits,
                            CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
        else:
            if CAUSAL:
                ok = cols[None, :] <= qpos[:, None]
            else:
                ok = (cols >= 0)[None, :] & (qpos >= 0)[:, None]
            if KVALID_ROW is not None:
                kv = tl.load(KVALID_ROW + cols, mask=col_ok, other=0)
                ok = ok & (kv != 0)[None, :]
        return ok & row_ok[:, None] & col_ok[None, :]

    @triton.jit
    def _stat_logits(q_base, stride_qm, k, start_n, offs_n, offs_d, qk_scale, q_off, rows_base, S, Nq, x_base, Nk,
                     KVALID_ROW, INFO_ROW, GRID_ROW, KNOCK_T, wr, wc, mutual_bits,
                     LISTS: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, STAT_BLOCK: tl.constexpr,
                     CAUSAL: tl.constexpr, IMG_RULE: tl.constexpr, WINDOW_CAUSAL: tl.constexpr,
                     MUTUAL: tl.constexpr, KNOCK: tl.constexpr):
        """Statistics mode 1: store the scaled (log2) logits of the S selected rows against one key tile, -inf where
        the row may not see the key: x[s, col] for the finalize kernel."""
        cols = start_n + offs_n
        col_ok = cols < Nk
        offs_s = tl.arange(0, STAT_BLOCK)
        for c in range(0, tl.cdiv(S, STAT_BLOCK)):
            sidx = c * STAT_BLOCK + offs_s
            s_ok = sidx < S
            rows = tl.load(rows_base + sidx, mask=s_ok, other=-1).to(tl.int32)
            row_ok = (rows >= 0) & (rows < Nq)
            qs = _load_rows(q_base, rows, stride_qm, offs_d, row_ok, HEAD_D, BLOCK_D, True)
            x = mma(qs, tl.trans(k), None) * qk_scale
            ok = _rows_allowed(rows, row_ok, cols, col_ok, q_off, KVALID_ROW, INFO_ROW, GRID_ROW, KNOCK_T, wr, wc,
                               mutual_bits, LISTS, CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
            x = tl.where(ok, x, float("-inf"))
            tl.store(x_base + sidx.to(tl.int64)[:, None] * Nk + cols[None, :], x,
                     mask=s_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _stats_block(col, q_base, stride_qm, k, start_n, offs_n, offs_d, qk_scale, q_off, rows_base, row_lo, row_hi,
                     norm, lse_base, rmax, Nk, KVALID_ROW, INFO_ROW, GRID_ROW, KNOCK_T, wr, wc, mutual_bits,
                     MODE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, STAT_BLOCK: tl.constexpr,
                     CAUSAL: tl.constexpr, IMG_RULE: tl.constexpr, WINDOW_CAUSAL: tl.constexpr,
                     MUTUAL: tl.constexpr, KNOCK: tl.constexpr):
        """Adds to `col` [BLOCK_N] the sum over the selected rows that lie in [row_lo, row_hi) (chunks of
        STAT_BLOCK) of norm * exp2(q k^T * scale - lse2) for one key block."""
        cols = start_n + offs_n
        col_ok = cols < Nk
        offs_s = tl.arange(0, STAT_BLOCK)
        for c in range(0, tl.cdiv(rmax, STAT_BLOCK)):
            in_range = c * STAT_BLOCK + offs_s < rmax
            rows = tl.load(rows_base + c * STAT_BLOCK + offs_s, mask=in_range, other=-1).to(tl.int32)
            row_ok = (rows >= row_lo) & (rows < row_hi)
            lse = tl.load(lse_base + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            use = row_ok & (lse > float("-inf"))
            lse2 = tl.where(use, lse * 1.4426950408889634, 0.0)
            qs = _load_rows(q_base, rows, stride_qm, offs_d, row_ok, HEAD_D, BLOCK_D, True)
            s = mma(qs, tl.trans(k), None) * qk_scale
            qpos = tl.where(row_ok, rows + q_off, -1)
            if MODE == 0:
                ok = use[:, None] & col_ok[None, :]
            elif MODE == 2:
                ok = _rule_rows(qpos, row_ok, cols, col_ok, INFO_ROW, GRID_ROW, KNOCK_T, wr, wc, mutual_bits,
                                CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK) & use[:, None] & col_ok[None, :]
            else:
                if CAUSAL:
                    ok = (cols[None, :] <= qpos[:, None]) & col_ok[None, :] & use[:, None]
                else:
                    ok = col_ok[None, :] & use[:, None]
                if KVALID_ROW is not None:
                    kv = tl.load(KVALID_ROW + cols, mask=col_ok, other=0)
                    ok = ok & (kv != 0)[None, :]
            p = tl.where(ok, tl.math.exp2(tl.where(ok, s - lse2[:, None], 0.0)), 0.0)
            col += tl.sum(p, 0) * norm
        return col

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, KVALID, INFO, GRIDW, KNOCK_T,
        FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,
        STAT_ROWS, STAT_NORM, STAT_OUT, STAT_X, n_stat, QSEL, HEAD_ON,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, som, soh, skvb, sselb,
        Hq, G, Nq, Nk, q_off, qk_scale, wr, wc, mutual_bits, n_qblocks, max_full, max_part,
        stat_sb, stat_sq, rmax, stat_hdiv,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_LISTS: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVALID: tl.constexpr,
        IMG_RULE: tl.constexpr, WINDOW_CAUSAL: tl.constexpr, MUTUAL: tl.constexpr, KNOCK: tl.constexpr,
        STATS: tl.constexpr, STAT_BLOCK: tl.constexpr, WRITE_LSE: tl.constexpr, SKIP_SEL: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        qb = n_qblocks - 1 - tl.program_id(1)  # heaviest (last) query blocks first
        b = pid_bh // Hq
        h = pid_bh % Hq
        kvh = h // G
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < Nq
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        q = _load_rows(q_base, offs_m, sqm, offs_d, row_ok, HEAD_D, BLOCK_D, True)
        k_base = K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
        qpos = tl.where(row_ok, offs_m + q_off, -1)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if HAS_KVALID:
            KVALID_ROW = KVALID + b.to(tl.int64) * skvb
        else:
            KVALID_ROW = None
        INFO_ROW = INFO + b.to(tl.int64) * Nk
        GRID_ROW = GRIDW + b.to(tl.int64) * Nk
        list_row = b * n_qblocks + qb
        if USE_LISTS:
            qinfo = tl.load(INFO_ROW + qpos, mask=row_ok, other=0)
            if IMG_RULE == 2:
                qgrid = tl.load(GRID_ROW + qpos, mask=row_ok, other=0)
            else:
                qgrid = qinfo
            if KNOCK:
                qknock = tl.load(KNOCK_T + (qinfo & 15))
            else:
                qknock = qinfo
            n_full = tl.load(FULL_CNT + list_row)
            for i in range(0, n_full):
                kb = tl.load(FULL_IDX + list_row.to(tl.int64) * max_full + i)
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, skn, svn, kb * BLOCK_N, offs_n, offs_d,
                                          qk_scale, qpos, qinfo, qgrid, qknock, KVALID_ROW, INFO_ROW, GRID_ROW, Nk,
                                          wr, wc, mutual_bits, 0, HEAD_D, BLOCK_D,
                                          CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
            n_part = tl.load(PART_CNT + list_row)
            for i in range(0, n_part):
                kb = tl.load(PART_IDX + list_row.to(tl.int64) * max_part + i)
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, skn, svn, kb * BLOCK_N, offs_n, offs_d,
                                          qk_scale, qpos, qinfo, qgrid, qknock, KVALID_ROW, INFO_ROW, GRID_ROW, Nk,
                                          wr, wc, mutual_bits, 2, HEAD_D, BLOCK_D,
                                          CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
        else:
            if CAUSAL:
                hi = tl.minimum(Nk, q_off + (qb + 1) * BLOCK_M)
                n_full = tl.minimum(tl.maximum((q_off + qb * BLOCK_M + 1) // BLOCK_N, 0), Nk // BLOCK_N)
            else:
                hi = Nk
                n_full = Nk // BLOCK_N
            if SKIP_SEL:  # group_attention: this (head, query block) is computed by the group kernel
                sel = tl.load(QSEL + b.to(tl.int64) * sselb + offs_m, mask=row_ok, other=0) != 0
                mine = (tl.load(HEAD_ON + h) == 0) | (tl.max(sel.to(tl.int32), 0) == 0)
                hi = tl.where(mine, hi, 0)
                n_full = tl.where(mine, n_full, 0)
                row_ok = (row_ok.to(tl.int32) * mine.to(tl.int32)) != 0
            for kb in range(0, n_full):
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, skn, svn, kb * BLOCK_N, offs_n, offs_d,
                                          qk_scale, qpos, qpos, qpos, qpos, KVALID_ROW, INFO_ROW, GRID_ROW, Nk,
                                          wr, wc, mutual_bits, 1 if HAS_KVALID else 0, HEAD_D, BLOCK_D,
                                          CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
            for kb in range(n_full, tl.cdiv(hi, BLOCK_N)):
                cols = kb * BLOCK_N + offs_n
                k = _load_rows(k_base, cols, skn, offs_d, cols < Nk, HEAD_D, BLOCK_D, True)
                if STATS == 1:
                    if CAUSAL:  # the diagonal key blocks of all query blocks cover every key once
                        _stat_logits(q_base, sqm, k, kb * BLOCK_N, offs_n, offs_d, qk_scale, q_off,
                                     STAT_ROWS + b.to(tl.int64) * stat_sb, n_stat, Nq,
                                     STAT_X + pid_bh.to(tl.int64) * n_stat * Nk, Nk, KVALID_ROW, INFO_ROW,
                                     GRID_ROW, KNOCK_T, wr, wc, mutual_bits, False, HEAD_D, BLOCK_D, STAT_BLOCK,
                                     CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
                acc, l_i, m_i = _fwd_core(acc, l_i, m_i, q, k, v_base, svn, kb * BLOCK_N, offs_n, offs_d,
                                          qk_scale, qpos, qpos, qpos, qpos, KVALID_ROW, INFO_ROW, GRID_ROW, Nk,
                                          wr, wc, mutual_bits, 3, HEAD_D, BLOCK_D,
                                          CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
        if STATS == 1:
            # keys not covered above: lists mode / non-causal -> this block's own key range; causal dense -> the
            # keys before the first query (q_off > 0) go to query block 0
            if USE_LISTS or not CAUSAL:
                own_lo = tl.where(qb == 0, 0, (q_off + qb * BLOCK_M) // BLOCK_N)
                own_hi = tl.cdiv(tl.minimum(Nk, q_off + (qb + 1) * BLOCK_M), BLOCK_N)
            else:
                own_lo = 0
                own_hi = tl.where(qb == 0, tl.minimum(tl.maximum((q_off + 1) // BLOCK_N, 0), Nk // BLOCK_N), 0)
            for kb in range(own_lo, own_hi):
                cols = kb * BLOCK_N + offs_n
                k = _load_rows(k_base, cols, skn, offs_d, cols < Nk, HEAD_D, BLOCK_D, True)
                _stat_logits(q_base, sqm, k, kb * BLOCK_N, offs_n, offs_d, qk_scale, q_off,
                             STAT_ROWS + b.to(tl.int64) * stat_sb, n_stat, Nq,
                             STAT_X + pid_bh.to(tl.int64) * n_stat * Nk, Nk, KVALID_ROW, INFO_ROW,
                             GRID_ROW, KNOCK_T, wr, wc, mutual_bits, USE_LISTS, HEAD_D, BLOCK_D, STAT_BLOCK,
                             CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
        # epilogue
        has = l_i > 0.0
        inv = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
        out = acc * inv[:, None]
        o_ptrs = (O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m.to(tl.int64)[:, None] * som
                  + offs_d[None, :])
        if BLOCK_D != HEAD_D:
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_D)[None, :])
        else:
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        lse_base = LSE + pid_bh.to(tl.int64) * Nq
        if WRITE_LSE:
            lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
            tl.store(lse_base + offs_m, lse, mask=row_ok)
        if STATS == 2:
            rows_base = STAT_ROWS + b.to(tl.int64) * stat_sb + qb.to(tl.int64) * stat_sq
            row_lo = qb * BLOCK_M
            row_hi = tl.minimum(row_lo + BLOCK_M, Nq)
            offs_s = tl.arange(0, STAT_BLOCK)
            n_in = tl.sum(tl.zeros([STAT_BLOCK], tl.int32), 0)
            n_used = tl.sum(tl.zeros([STAT_BLOCK], tl.int32), 0)
            for c in range(0, tl.cdiv(rmax, STAT_BLOCK)):
                r = tl.load(rows_base + c * STAT_BLOCK + offs_s, mask=c * STAT_BLOCK + offs_s < rmax, other=-1)
                n_in += tl.sum(((r >= row_lo) & (r < row_hi)).to(tl.int32), 0)
                n_used += tl.sum(((r >= 0) & (r < Nq)).to(tl.int32), 0)
            if n_in > 0:
                if STAT_NORM is None:
                    norm = 1.0 / (n_used * stat_hdiv).to(tl.float32)
                else:
                    norm = tl.load(STAT_NORM + b)
                tl.debug_barrier()  # this program's LSE stores are visible to all of its threads
                out_base = STAT_OUT + (b * (Hq // stat_hdiv) + h // stat_hdiv).to(tl.int64) * Nk
                if USE_LISTS:
                    for i in range(0, tl.load(FULL_CNT + list_row)):
                        kb = tl.load(FULL_IDX + list_row.to(tl.int64) * max_full + i)
                        cols = kb * BLOCK_N + offs_n
                        k = _load_rows(k_base, cols, skn, offs_d, cols < Nk, HEAD_D, BLOCK_D, True)
                        col = tl.zeros([BLOCK_N], tl.float32)
                        col = _stats_block(col, q_base, sqm, k, kb * BLOCK_N, offs_n, offs_d, qk_scale, q_off,
                                           rows_base, row_lo, row_hi, norm, lse_base, rmax, Nk, KVALID_ROW,
                                           INFO_ROW, GRID_ROW, KNOCK_T, wr, wc, mutual_bits, 0, HEAD_D, BLOCK_D,
                                           STAT_BLOCK, CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
                        tl.atomic_add(out_base + cols, col, mask=cols < Nk)
                    for i in range(0, tl.load(PART_CNT + list_row)):
                        kb = tl.load(PART_IDX + list_row.to(tl.int64) * max_part + i)
                        cols = kb * BLOCK_N + offs_n
                        k = _load_rows(k_base, cols, skn, offs_d, cols < Nk, HEAD_D, BLOCK_D, True)
                        col = tl.zeros([BLOCK_N], tl.float32)
                        col = _stats_block(col, q_base, sqm, k, kb * BLOCK_N, offs_n, offs_d, qk_scale, q_off,
                                           rows_base, row_lo, row_hi, norm, lse_base, rmax, Nk, KVALID_ROW,
                                           INFO_ROW, GRID_ROW, KNOCK_T, wr, wc, mutual_bits, 2, HEAD_D, BLOCK_D,
                                           STAT_BLOCK, CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
                        tl.atomic_add(out_base + cols, col, mask=cols < Nk)
                else:
                    if CAUSAL:
                        hi2 = tl.minimum(Nk, q_off + (qb + 1) * BLOCK_M)
                    else:
                        hi2 = Nk
                    for kb in range(0, tl.cdiv(hi2, BLOCK_N)):
                        cols = kb * BLOCK_N + offs_n
                        k = _load_rows(k_base, cols, skn, offs_d, cols < Nk, HEAD_D, BLOCK_D, True)
                        col = tl.zeros([BLOCK_N], tl.float32)
                        col = _stats_block(col, q_base, sqm, k, kb * BLOCK_N, offs_n, offs_d, qk_scale, q_off,
                                           rows_base, row_lo, row_hi, norm, lse_base, rmax, Nk, KVALID_ROW,
                                           INFO_ROW, GRID_ROW, KNOCK_T, wr, wc, mutual_bits, 3, HEAD_D, BLOCK_D,
                                           STAT_BLOCK, CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
                        tl.atomic_add(out_base + cols, col, mask=cols < Nk)


# ----------------------------------------------------------------------------------------------------------------
# launch helpers

def _pick_config(head_dim, nq, device, mode: str = "dense") -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for "dense" (plain causal / padding, also the statistics) or "lists"
    (structured masks): set_config's override, else configs.json for the GPU (kernels/configs.py)."""
    if device.type != "cuda":
        return 16, 16, 4, 1  # interpreter: tiny tiles keep CPU tests fast and exercise many blocks
    if nq <= 64:
        return 64, 64, 4, 3
    if (head_dim, mode) in _TUNED:
        return _TUNED[(head_dim, mode)]
    return launch_config(f"k1_{mode}", head_dim, device)


_TUNED: dict = {}


def set_config(head_dim: int, config: tuple[int, int, int, int] | None, mode: str = "dense") -> None:
    """Override the launch config (BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim and a mode
    ("dense": plain causal / padding, also used by the statistics; "lists": structured masks)."""
    if config is None:
        _TUNED.pop((head_dim, mode), None)
    else:
        _TUNED[(head_dim, mode)] = tuple(config)


_PLACEHOLDERS: dict = {}


def placeholder(device, dtype=torch.int32):
    """A one-element tensor for a pointer argument the kernel neither reads nor writes, one per (device, dtype): no
    allocation (and no fill launch) per call."""
    key = (device, dtype)
    found = _PLACEHOLDERS.get(key)
    if found is None:
        found = _PLACEHOLDERS[key] = torch.zeros(1, dtype=dtype, device=device)
    return found


class MaskArgs(typing.NamedTuple):
    """A StructuredMask as kernel arguments (packed token info, the rule's constants); placeholders without a mask."""

    info: torch.Tensor
    grid: torch.Tensor
    knock: torch.Tensor
    img_rule: int
    causal: bool
    wr: int
    wc: int
    mutual_bits: int
    window_causal: bool
    mutual: bool
    knock_on: bool


def mask_args(mask: StructuredMask | None, device) -> MaskArgs:
    """Built once per (mask, device) and cached on the mask: a call does no host work for it."""
    if mask is None:
        dz = placeholder(device)
        return MaskArgs(dz, dz, dz, 0, True, 0, 0, 0, True, False, False)
    key = ("args", str(device))
    if key not in mask._packed:
        info, grid, knock = mask.packed(device)
        spec = mask.spec
        mask._packed[key] = MaskArgs(info, grid, knock, {"causal": 0, "none": 1, "window": 2}[spec.image_image],
                                     spec.causal, spec.window[0], spec.window[1], spec.mutual_bits,
                                     spec.window_causal, bool(spec.mutual_roles), bool(spec.knockout))
    return mask._packed[key]


def sdpa_routable(nq: int, nk: int, causal: bool, key_valid) -> bool:
    """Whether SDPA's is_causal computes our attention: no key padding, and no causal offset (torch aligns is_causal
    top-left when there are fewer queries than keys; ours aligns bottom-right)."""
    return key_valid is None and (nq == nk or not causal)


def sdpa_attention(query, key, value, *, scaling: float, causal: bool) -> torch.Tensor:
    """SDPA with its default backend choice (cuDNN / flash on Hopper), as [B, Nq, Hq, d]: a transposed view of SDPA's
    [B, Hq, Nq, d] output (no copy; kernels may write rows into it through its strides)."""
    out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def launch_fwd(query, key, value, *, scaling: float, causal: bool = True, key_valid=None,
               mask: StructuredMask | None = None, stats: dict | None = None, want_lse: bool = False,
               skip_sel=None, out: torch.Tensor | None = None):
    """Run the forward kernel.

    stats (attention_stats.py): {"mode": 1, "rows": [B, S]} stores the selected rows' scaled logits into
    x [B, Hq, S, Nk] (fp32, log2 domain, -inf = masked) for the finalize kernel; {"mode": 2, "rows": [B, R] or
    [B, nqb, R], "per_block": bool, "norm": fp32 [B] or None, "head_div": int} accumulates column sums in-kernel
    into [B, Hq // head_div, Nk]. skip_sel = (query_select [B, Nq] as byte_flags, head_on int32 [Hq]): programs whose
    head is on and whose query block holds a selected row write nothing (group_attention computes those).
    Returns (out [B, Nq, Hq, d], lse [B, Hq, Nq] or None, stats output or None)."""
    batch, hq, hkv, nq, nk, d = check_qkv(query, key, value)
    if nq > nk:
        raise ValueError("more queries than keys")
    query, key, value = last_dim_contiguous(query), last_dim_contiguous(key), last_dim_contiguous(value)
    device = query.device
    bm, bn, warps, stages = _pick_config(d, nq, device, "lists" if mask is not None else "dense")
    bd = block_d(d)
    nqb = cdiv(nq, bm)
    if out is None:
        out = torch.empty(batch, nq, hq, d, dtype=query.dtype, device=device)
    write_lse = want_lse or stats is not None
    lse = (torch.empty(batch, hq, nq, dtype=torch.float32, device=device) if write_lse
           else placeholder(device, torch.float32))
    dz = placeholder(device)
    margs = mask_args(mask, device)
    if mask is not None:
        if mask.length != nk:
            raise ValueError(f"mask covers {mask.length} tokens, keys have {nk}")
        lists = mask.block_lists(bm, bn, nq, device)
        lists_args = (lists.full_cnt, lists.full_idx, lists.part_cnt, lists.part_idx)
        max_full, max_part = lists.full_idx.shape[-1], lists.part_idx.shape[-1]
        kvalid = dz
        has_kvalid = False
        causal = margs.causal
    else:
        lists_args = (dz, dz, dz, dz)
        max_full = max_part = 1
        has_kvalid = key_valid is not None
        kvalid = byte_flags(key_valid) if has_kvalid else dz
    stat_rows, stat_norm = dz, None
    stat_out = stat_x = placeholder(device, torch.float32)
    rmax, stat_sb, stat_sq, head_div, n_stat, stats_mode = 1, 0, 0, 1, 1, 0
    result = None
    if stats is not None:
        stats_mode = stats["mode"]
        stat_rows = stats["rows"].contiguous()
        stat_sb = stat_rows.stride(0)
        if stats_mode == 1:
            n_stat = stat_rows.shape[1]
            stat_x = torch.empty(batch, hq, n_stat, nk, dtype=torch.float32, device=device)
            result = stat_x
        else:
            rmax = stat_rows.shape[-1]
            stat_sq = stat_rows.stride(1) if stats["per_block"] else 0
            stat_norm = stats["norm"]
            head_div = stats["head_div"]
            if hq % head_div:
                raise ValueError("head_div must divide the number of query heads")
            stat_out = torch.zeros(batch, hq // head_div, nk, dtype=torch.float32, device=device)
            result = stat_out
    if skip_sel is not None:
        qsel, head_on = skip_sel
    else:
        qsel, head_on = dz, dz
    grid_dims = (batch * hq, nqb)
    launch(_attn_fwd_kernel, grid_dims,
        query, key, value, out, lse, kvalid, margs.info, margs.grid, margs.knock, *lists_args,
        stat_rows, stat_norm, stat_out, stat_x, n_stat, qsel, head_on,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3],
        kvalid.stride(0) if has_kvalid else 0, qsel.stride(0),
        hq, hq // hkv, nq, nk, nk - nq, float(scaling) * LOG2E, margs.wr, margs.wc, margs.mutual_bits, nqb,
        max_full, max_part,
        stat_sb, stat_sq, rmax, head_div,
        HEAD_D=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, USE_LISTS=mask is not None, CAUSAL=causal,
        HAS_KVALID=has_kvalid, IMG_RULE=margs.img_rule, WINDOW_CAUSAL=margs.window_causal, MUTUAL=margs.mutual,
        KNOCK=margs.knock_on,
        STATS=stats_mode, STAT_BLOCK=16, WRITE_LSE=write_lse, SKIP_SEL=skip_sel is not None,
        num_warps=warps, num_stages=stages,
    )
    return out, (lse if write_lse else None), result


def block_m_for(query: torch.Tensor, mode: str = "dense") -> int:
    return _pick_config(query.shape[-1], query.shape[2], query.device, mode)[0]


def masked_attention_triton(query, key, value, *, mask: StructuredMask, scaling: float, return_lse: bool = False):
    out, lse, _ = launch_fwd(query, key, value, scaling=scaling, mask=mask, want_lse=return_lse)
    return (out, lse) if return_lse else out


def flash_attention_triton(query, key, value, *, scaling: float, causal: bool = True, key_valid=None,
                           return_lse: bool = False):
    out, lse, _ = launch_fwd(query, key, value, scaling=scaling, causal=causal, key_valid=key_valid,
                             want_lse=return_lse)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------------------
# torch references

def dense_mask(nq: int, nk: int, *, causal: bool, key_valid: torch.Tensor | None, device) -> torch.Tensor:
    """Bool [B or 1, Nq, Nk]: causal aligned bottom-right (queries are the last Nq positions) & key padding."""
    qpos = torch.arange(nq, device=device)[:, None] + (nk - nq)
    kpos = torch.arange(nk, device=device)[None, :]
    allowed = (kpos <= qpos) if causal else torch.ones(nq, nk, dtype=torch.bool, device=device)
    allowed = allowed[None]
    if key_valid is not None:
        allowed = allowed & key_valid.bool()[:, None, :]
    return allowed


def attention_from_mask(query, key, value, allowed: torch.Tensor, scaling: float, return_lse: bool = False,
                        return_probs: bool = False):
    """fp32 softmax attention with a boolean mask [B or 1, (H or 1,) Nq, Nk]; fully masked rows give 0, LSE -inf.
    Returns [B, Nq, Hq, d] in the input dtype, then the LSE [B, Hq, Nq] and the fp32 probabilities [B, Hq, Nq, Nk]
    where asked."""
    batch, hq, hkv, nq, nk, d = check_qkv(query, key, value)
    k = repeat_kv(key, hq // hkv).float()
    v = repeat_kv(value, hq // hkv).float()
    logits = (query.float() @ k.transpose(-1, -2)) * scaling
    if allowed.dim() == 3:
        allowed = allowed[:, None]
    neg = torch.finfo(torch.float32).min
    logits = logits.masked_fill(~allowed, neg)
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - lse[..., None]) * allowed
    any_ok = allowed.any(-1)
    lse = torch.where(any_ok, lse, float("-inf"))
    out = (probs @ v).to(query.dtype).transpose(1, 2).contiguous()
    extra = [lse] * return_lse + [probs] * return_probs
    return (out, *extra) if extra else out


def attention_reference(query, key, value, *, scaling: float, causal: bool = True, key_valid=None,
                        return_lse: bool = False):
    allowed = dense_mask(query.shape[2], key.shape[2], causal=causal, key_valid=key_valid, device=query.device)
    return attention_from_mask(query, key, value, allowed, scaling, return_lse)


def masked_attention_reference(query, key, value, *, mask: StructuredMask, scaling: float, return_lse: bool = False):
    allowed = mask.dense(query.shape[2]).to(query.device)
    return attention_from_mask(query, key, value, allowed, scaling, return_lse)


def default_scaling(query: torch.Tensor) -> float:
    return 1.0 / math.sqrt(query.shape[-1])
