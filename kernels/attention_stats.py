"""Kernel 2: attention output plus received-attention statistics.

received[b, h, j] = (1 / S_b) * sum over the selected query rows i of softmax_j(q_i k^T * scale + mask)
where S_b counts the used entries of stat_queries[b] (-1 = unused slot; duplicates count twice). This is the score
FastV (S = 1: the last prompt token, averaged over heads), PyramidDrop, SparseVLM and PLPHP rank image tokens by.

stats_impl="auto" / "rows" (the default): the attention output comes from the fastest path (SDPA's default backend,
cuDNN on Hopper, when there is no key padding, no structured mask and no LSE asked; else the forward kernel of
masked_attention.py), and the statistics from a separate small pass over the selected rows only
(`received_attention_triton`): program (b, h, key chunk) multiplies the S rows' q (16-row tiles) with its keys,
stores the masked log2 logits x [B, Hq, S, Nk] and the chunk's partial (max, sum); a finalize kernel combines the
partials into each row's log-sum-exp and sums exp2(x - lse) over rows and heads. K is read once, the keys are split
over ~2 programs per SM, no atomics (deterministic), no host sync. About 2 S N d FLOPs per head.

Fused into the forward kernel (kept as stats_impl options, measured in the benchmark):
  "logits" (any S): every program of the forward kernel
      (masked_attention.py) also multiplies the selected rows' q (16-row tiles) with the key tile it owns - the
      diagonal key blocks of its query block, already in shared memory in the causal loop - and stores those scaled
      logits (fp32, -inf where masked) into x [B, Hq, S, Nk]; the forward also writes the LSE. A second small kernel
      computes exp2(x - lse) and the means over rows and heads (no atomics: deterministic). The extra work is
      spread over all programs (no serial tail) and the N x N matrix is never formed; x is S x N per head.
  "colsum": the programs owning selected rows re-walk their key blocks after the main loop and add column sums
      with fp32 atomics (summation order varies between runs at the 1e-7 level).
Per-head output [B, Hq, Nk]; per_head="kv": mean over each GQA group [B, Hkv, Nk]; per_head=False: mean over all
heads [B, Nk].
"""

from __future__ import annotations

import functools

import torch

from ._common import byte_flags, cdiv, check_qkv, next_pow2, repeat_kv, triton_available
from .configs import launch_config
from .launch import launch
from .layout import StructuredMask
from .masked_attention import (attention_from_mask, block_m_for, dense_mask, launch_fwd, mask_args, placeholder,
                               sdpa_attention, sdpa_routable)

SHARED_ROWS_MAX = 256  # in-kernel column sums: every program scans the shared list; above, split per block

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _stats_finalize_kernel(X, LSE, ROWS, OUT, srb, Hq, Nq, Nk, S, head_div,
                               BLOCK: tl.constexpr, SB: tl.constexpr):
        """OUT[b, o, j] = 1/(S_b * head_div) * sum over heads h of output o and used rows s of
        exp2(X[b, h, s, j] - LSE[b, h, row_s] * log2e)."""
        pid = tl.program_id(0)
        n_out = Hq // head_div
        b = pid // n_out
        o = pid % n_out
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < Nk
        offs_s = tl.arange(0, SB)
        n_used = tl.sum(tl.zeros([SB], tl.int32), 0)
        for c in range(0, tl.cdiv(S, SB)):
            r = tl.load(ROWS + b.to(tl.int64) * srb + c * SB + offs_s, mask=c * SB + offs_s < S, other=-1)
            n_used += tl.sum(((r >= 0) & (r < Nq)).to(tl.int32), 0)
        acc = tl.zeros([BLOCK], tl.float32)
        for hh in range(0, head_div):
            h = o * head_div + hh
            for s in range(0, S):
                row = tl.load(ROWS + b.to(tl.int64) * srb + s).to(tl.int32)
                ok = (row >= 0) & (row < Nq)
                lse = tl.load(LSE + (b * Hq + h).to(tl.int64) * Nq + tl.where(ok, row, 0))
                ok = ok & (lse > float("-inf"))
                lse2 = tl.where(ok, lse * 1.4426950408889634, 0.0)
                ld = (col_ok.to(tl.int32) * ok.to(tl.int32)) != 0
                x = tl.load(X + ((b * Hq + h).to(tl.int64) * S + s) * Nk + cols, mask=ld, other=float("-inf"))
                acc += tl.where(x > float("-inf"), tl.math.exp2(x - lse2), 0.0)
        norm = 1.0 / tl.maximum(n_used * head_div, 1).to(tl.float32)
        tl.store(OUT + pid.to(tl.int64) * Nk + cols, acc * norm, mask=col_ok)


if triton_available():
    from .masked_attention import _load_rows, _rows_allowed, mma

    @triton.jit
    def _rows_logits_kernel(Q, K, ROWS, X, PM, PL, KVALID, INFO, GRIDW, KNOCK_T,
                            sqb, sqh, sqm, skb, skh, skn, srb, skvb,
                            Hq, G, Nq, Nk, q_off, qk_scale, S, n_chunks, blocks_per_chunk, wr, wc, mutual_bits,
                            HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                            STAT_BLOCK: tl.constexpr, LISTS: tl.constexpr, CAUSAL: tl.constexpr,
                            HAS_KVALID: tl.constexpr, IMG_RULE: tl.constexpr, WINDOW_CAUSAL: tl.constexpr,
                            MUTUAL: tl.constexpr, KNOCK: tl.constexpr):
        """Program (b * Hq + h, chunk): the selected rows' scaled logits (log2 domain, -inf where masked) against the
        keys of one chunk of key blocks, stored in X [B, Hq, S, Nk], and the chunk's partial softmax statistics
        (running max PM and sum PL, [B, Hq, S, n_chunks]) for the finalize kernel's log-sum-exp."""
        pid_bh = tl.program_id(0)
        chunk = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        k_base = K + b.to(tl.int64) * skb + (h // G).to(tl.int64) * skh
        rows_base = ROWS + b.to(tl.int64) * srb
        x_base = X + pid_bh.to(tl.int64) * S * Nk
        if HAS_KVALID:
            KVALID_ROW = KVALID + b.to(tl.int64) * skvb
        else:
            KVALID_ROW = None
        INFO_ROW = INFO + b.to(tl.int64) * Nk
        GRID_ROW = GRIDW + b.to(tl.int64) * Nk
        kb_lo = chunk * blocks_per_chunk
        kb_hi = tl.minimum(kb_lo + blocks_per_chunk, tl.cdiv(Nk, BLOCK_N))
        offs_s = tl.arange(0, STAT_BLOCK)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        for c in range(0, tl.cdiv(S, STAT_BLOCK)):
            sidx = c * STAT_BLOCK + offs_s
            s_ok = sidx < S
            rows = tl.load(rows_base + sidx, mask=s_ok, other=-1).to(tl.int32)
            row_ok = (rows >= 0) & (rows < Nq)
            qs = _load_rows(q_base, rows, sqm, offs_d, row_ok, HEAD_D, BLOCK_D, True)
            m_i = tl.full([STAT_BLOCK], float("-inf"), tl.float32)
            l_i = tl.zeros([STAT_BLOCK], tl.float32)
            for kb in range(kb_lo, kb_hi):
                cols = kb * BLOCK_N + offs_n
                col_ok = cols < Nk
                k = _load_rows(k_base, cols, skn, offs_d, col_ok, HEAD_D, BLOCK_D, True)
                x = mma(qs, tl.trans(k), None) * qk_scale
                ok = _rows_allowed(rows, row_ok, cols, col_ok, q_off, KVALID_ROW, INFO_ROW, GRID_ROW, KNOCK_T, wr,
                                   wc, mutual_bits, LISTS, CAUSAL, IMG_RULE, WINDOW_CAUSAL, MUTUAL, KNOCK)
                x = tl.where(ok, x, float("-inf"))
                tl.store(x_base + sidx.to(tl.int64)[:, None] * Nk + cols[None, :], x,
                         mask=s_ok[:, None] & col_ok[None, :])
                m_new = tl.maximum(m_i, tl.max(x, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(x - m_use[:, None]), 1)
                m_i = m_new
            part = (pid_bh.to(tl.int64) * S + sidx) * n_chunks + chunk
            tl.store(PM + part, m_i, mask=s_ok)
            tl.store(PL + part, l_i, mask=s_ok)

    @triton.jit
    def _rows_finalize_kernel(X, PM, PL, ROWS, OUT, srb, Hq, Nq, Nk, S, n_chunks, head_div,
                              BLOCK: tl.constexpr, SB: tl.constexpr, PB: tl.constexpr, CB: tl.constexpr):
        """OUT[b, o, j] = 1/(S_b * head_div) * sum over heads h of output o and used rows s of exp2(X - lse2), the
        row's log-sum-exp lse2 combined from the chunks' partial statistics. The (head, row) pairs are taken PB at a
        time as one [PB, BLOCK] tile (FastV's head mean over 32 heads: one step), not one after another."""
        pid = tl.program_id(0)
        n_out = Hq // head_div
        b = pid // n_out
        o = pid % n_out
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < Nk
        offs_s = tl.arange(0, SB)
        offs_p = tl.arange(0, PB)
        offs_c = tl.arange(0, CB)
        c_ok = offs_c < n_chunks
        n_used = tl.sum(tl.zeros([SB], tl.int32), 0)
        for c in range(0, tl.cdiv(S, SB)):
            r = tl.load(ROWS + b.to(tl.int64) * srb + c * SB + offs_s, mask=c * SB + offs_s < S, other=-1)
            n_used += tl.sum(((r >= 0) & (r < Nq)).to(tl.int32), 0)
        acc = tl.zeros([BLOCK], tl.float32)
        for c in range(0, tl.cdiv(head_div * S, PB)):
            pair = c * PB + offs_p
            pair_ok = pair < head_div * S
            s = pair % S
            h = o * head_div + pair // S
            row = tl.load(ROWS + b.to(tl.int64) * srb + s, mask=pair_ok, other=-1).to(tl.int32)
            base = (b * Hq + h).to(tl.int64) * S + s  # [PB]
            part = base[:, None] * n_chunks + offs_c[None, :]
            pm = tl.load(PM + part, mask=pair_ok[:, None] & c_ok[None, :], other=float("-inf"))
            pl = tl.load(PL + part, mask=pair_ok[:, None] & c_ok[None, :], other=0.0)
            mx = tl.max(pm, 1)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            total = tl.sum(pl * tl.math.exp2(pm - mx[:, None]), 1)
            ok = (row >= 0) & (row < Nq) & (total > 0.0)
            lse2 = tl.where(ok, mx + tl.math.log2(tl.where(ok, total, 1.0)), 0.0)
            x = tl.load(X + base[:, None] * Nk + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                        other=float("-inf"))
            acc += tl.sum(tl.where(x > float("-inf"), tl.math.exp2(x - lse2[:, None]), 0.0), 0)
        norm = 1.0 / tl.maximum(n_used * head_div, 1).to(tl.float32)
        tl.store(OUT + pid.to(tl.int64) * Nk + cols, acc * norm, mask=col_ok)


def _head_div(per_head, hq: int, hkv: int) -> int:
    if per_head is True:
        return 1
    if per_head is False:
        return hq
    if per_head == "kv":
        return hq // hkv
    raise ValueError("per_head must be True, False or 'kv'")


def _split_rows(stat_queries: torch.Tensor, nq: int, block_m: int, head_div: int):
    """[B, S] -> ([B, nqb, R] rows per query block, -1 padded; norm [B]). One host sync (R)."""
    batch, s = stat_queries.shape
    nqb = -(-nq // block_m)
    dev = stat_queries.device
    q = stat_queries.long()
    ok = (q >= 0) & (q < nq)
    used = ok.sum(1)
    keyv = torch.where(ok, torch.arange(batch, device=dev)[:, None] * nqb + q.clamp(min=0) // block_m, batch * nqb)
    flat_key = keyv.flatten()
    sorted_key, order = torch.sort(flat_key, stable=True)
    q_sorted = q.flatten()[order]
    counts = torch.bincount(flat_key, minlength=batch * nqb + 1)[: batch * nqb]
    starts = counts.cumsum(0) - counts
    keep = sorted_key < batch * nqb
    sk = sorted_key[keep]
    rank = torch.arange(sk.numel(), device=dev) - starts[sk]
    width = max(1, int(counts.max()) if counts.numel() else 1)
    rows = torch.full((batch * nqb, width), -1, dtype=torch.int32, device=dev)
    rows[sk, rank] = q_sorted[keep].to(torch.int32)
    norm = 1.0 / (used.clamp(min=1).float() * head_div)
    return rows.view(batch, nqb, width), norm


# finalize tile: (columns, (head, row) pairs) per step; small under the interpreter
FINALIZE_TILE = {"cuda": (128, 32), "cpu": (32, 16)}


@functools.lru_cache(maxsize=None)
def _programs_target(device: str) -> int:
    """How many programs the rows pass aims for: two per SM on a GPU (a handful under the interpreter)."""
    if not device.startswith("cuda"):
        return 4
    return 2 * torch.cuda.get_device_properties(torch.device(device)).multi_processor_count


@functools.lru_cache(maxsize=1024)
def _rows_plan(batch: int, hq: int, nk: int, block_n: int, target: int) -> tuple[int, int]:
    """(chunks, key blocks per chunk): the keys split so that batch * Hq * chunks programs fill the GPU."""
    nkb = cdiv(nk, block_n)
    per = cdiv(nkb, min(nkb, max(1, cdiv(target, batch * hq))))
    return cdiv(nkb, per), per


def received_attention_triton(query, key, *, stat_queries: torch.Tensor, scaling: float, key_valid=None,
                              causal: bool = True, per_head=False, mask: StructuredMask | None = None):
    """The selected rows' received attention alone (the module docstring's "rows" pass): two launches, reading K
    once for the S rows; no host sync, no per-call host tensors beyond the outputs."""
    batch, hq, nq, d = query.shape
    _, hkv, nk, _ = key.shape
    head_div = _head_div(per_head, hq, hkv)
    if stat_queries.dim() != 2 or stat_queries.shape[0] != batch:
        raise ValueError("stat_queries must be [B, S]")
    rows = stat_queries if stat_queries.dtype in (torch.int32, torch.int64) else stat_queries.long()
    rows = rows.contiguous()
    n_rows = rows.shape[1]
    dev = query.device
    kind = "cuda" if dev.type == "cuda" else "cpu"
    # (BLOCK_N, num_warps, num_stages): configs.json on a GPU; tiny tiles under the interpreter (fast CPU tests)
    block_n, warps, stages = launch_config("k2_rows", d, dev) if kind == "cuda" else (16, 4, 1)
    n_chunks, per_chunk = _rows_plan(batch, hq, nk, block_n, _programs_target(str(dev)))
    x = torch.empty(batch, hq, n_rows, nk, dtype=torch.float32, device=dev)
    partial = torch.empty(2, batch, hq, n_rows, n_chunks, dtype=torch.float32, device=dev)
    if mask is not None:
        if mask.length != nk:
            raise ValueError(f"mask covers {mask.length} tokens, keys have {nk}")
        m = mask_args(mask, dev)
        kvalid, causal = placeholder(dev), m.causal
    else:
        m = mask_args(None, dev)
        kvalid = byte_flags(key_valid) if key_valid is not None else placeholder(dev)
    launch(_rows_logits_kernel, (batch * hq, n_chunks),
        query, key, rows, x, partial[0], partial[1], kvalid, m.info, m.grid, m.knock,
        *query.stride()[:3], *key.stride()[:3],
        rows.stride(0), kvalid.stride(0) if key_valid is not None and mask is None else 0,
        hq, hq // hkv, nq, nk, nk - nq, float(scaling) * 1.4426950408889634, n_rows, n_chunks, per_chunk,
        m.wr, m.wc, m.mutual_bits,
        HEAD_D=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_N=block_n, STAT_BLOCK=16, LISTS=mask is not None,
        CAUSAL=causal, HAS_KVALID=key_valid is not None and mask is None, IMG_RULE=m.img_rule,
        WINDOW_CAUSAL=m.window_causal, MUTUAL=m.mutual, KNOCK=m.knock_on, num_warps=warps, num_stages=stages)
    received = torch.empty(batch, hq // head_div, nk, dtype=torch.float32, device=dev)
    block, pairs = FINALIZE_TILE[kind]
    launch(_rows_finalize_kernel, (batch * (hq // head_div), cdiv(nk, block)),
        x, partial[0], partial[1], rows, received, rows.stride(0), hq, nq, nk, n_rows, n_chunks, head_div,
        BLOCK=block, SB=16, PB=pairs, CB=max(2, next_pow2(n_chunks)), num_warps=4)
    return received[:, 0] if per_head is False else received


def attention_with_received_stats_triton(query, key, value, *, key_valid=None, causal=True, scaling: float,
                                         stat_queries: torch.Tensor, per_head=False,
                                         mask: StructuredMask | None = None, return_lse: bool = False,
                                         stats_impl: str = "auto"):
    """stats_impl: "auto" / "rows" (the output from SDPA where it applies, then the rows pass), "logits" or "colsum"
    (statistics fused into the forward kernel; see the module docstring)."""
    if stats_impl not in ("auto", "rows", "logits", "colsum"):
        raise ValueError("stats_impl must be 'auto', 'rows', 'logits' or 'colsum'")
    batch, hq, hkv, nq, nk, d = check_qkv(query, key, value)
    head_div = _head_div(per_head, hq, hkv)
    if stat_queries.dim() != 2 or stat_queries.shape[0] != batch:
        raise ValueError("stat_queries must be [B, S]")
    if stats_impl in ("auto", "rows"):
        lse = None
        if mask is None and not return_lse and sdpa_routable(nq, nk, causal, key_valid):
            out = sdpa_attention(query, key, value, scaling=scaling, causal=causal)
        else:
            out, lse, _ = launch_fwd(query, key, value, scaling=scaling, causal=causal, key_valid=key_valid,
                                     mask=mask, want_lse=return_lse)
        received = received_attention_triton(query, key, stat_queries=stat_queries, scaling=scaling,
                                             key_valid=key_valid, causal=causal, per_head=per_head, mask=mask)
        return (out, received, lse) if return_lse else (out, received)
    rows = stat_queries if stat_queries.dtype in (torch.int32, torch.int64) else stat_queries.long()
    rows = rows.contiguous()
    n_rows = rows.shape[1]
    if stats_impl == "logits":
        out, lse, x = launch_fwd(query, key, value, scaling=scaling, causal=causal, key_valid=key_valid, mask=mask,
                                 stats={"mode": 1, "rows": rows}, want_lse=True)
        received = torch.empty(batch, hq // head_div, nk, dtype=torch.float32, device=query.device)
        block = 512 if query.is_cuda else 32
        launch(_stats_finalize_kernel, (batch * (hq // head_div), -(-nk // block)),
            x, lse, rows, received, rows.stride(0), hq, nq, nk, n_rows, head_div, BLOCK=block, SB=16, num_warps=4)
    else:
        if n_rows <= SHARED_ROWS_MAX:  # every program scans the list itself (no host work)
            stats = {"mode": 2, "rows": rows, "per_block": False, "norm": None, "head_div": head_div}
        else:
            split, norm = _split_rows(stat_queries, nq, block_m_for(query, "dense" if mask is None else "lists"),
                                      head_div)
            stats = {"mode": 2, "rows": split, "per_block": True, "norm": norm, "head_div": head_div}
        out, lse, received = launch_fwd(query, key, value, scaling=scaling, causal=causal, key_valid=key_valid,
                                        mask=mask, stats=stats, want_lse=return_lse)
    if per_head is False:
        received = received[:, 0]
    return (out, received, lse) if return_lse else (out, received)


def received_from_probs(probs: torch.Tensor, stat_queries: torch.Tensor, per_head, hkv: int) -> torch.Tensor:
    """probs [B, Hq, Nq, Nk] (full softmax) -> received statistics as defined in the module docstring."""
    batch, hq, nq, nk = probs.shape
    q = stat_queries.long()
    ok = (q >= 0) & (q < nq)
    picked = probs.gather(2, q.clamp(0, nq - 1)[:, None, :, None].expand(batch, hq, -1, nk))
    picked = picked * ok[:, None, :, None]
    rec = picked.sum(2) / ok.sum(1).clamp(min=1)[:, None, None]
    if per_head is True:
        return rec
    if per_head == "kv":
        return rec.view(batch, hkv, hq // hkv, nk).mean(2)
    return rec.mean(1)


def received_attention_reference(query, key, *, stat_queries: torch.Tensor, scaling: float, key_valid=None,
                                 causal: bool = True, per_head=False, mask: StructuredMask | None = None,
                                 allowed: torch.Tensor | None = None):
    """fp32 torch reference of the statistics alone, from the selected rows only (`allowed`: the dense mask, when the
    caller has it)."""
    batch, hq, nq, d = query.shape
    hkv, nk = key.shape[1], key.shape[2]
    _head_div(per_head, hq, hkv)
    if allowed is None:
        allowed = (mask.dense(nq).to(query.device) if mask is not None
                   else dense_mask(nq, nk, causal=causal, key_valid=key_valid, device=query.device))
    q = stat_queries.long()
    ok = (q >= 0) & (q < nq)
    safe = q.clamp(0, nq - 1)
    rows_q = query.float().gather(2, safe[:, None, :, None].expand(batch, hq, -1, d))
    k = repeat_kv(key, hq // hkv).float()
    logits = (rows_q @ k.transpose(-1, -2)) * scaling  # [B, Hq, S, Nk]
    row_allowed = allowed.expand(batch, nq, nk).gather(1, safe[:, :, None].expand(batch, -1, nk))[:, None]
    logits = logits.masked_fill(~row_allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, -1) * row_allowed * ok[:, None, :, None]
    rec = probs.sum(2) / ok.sum(1).clamp(min=1)[:, None, None]
    if per_head == "kv":
        rec = rec.view(batch, hkv, hq // hkv, nk).mean(2)
    elif per_head is False:
        rec = rec.mean(1)
    return rec


def attention_with_received_stats_reference(query, key, value, *, key_valid=None, causal=True, scaling: float,
                                            stat_queries: torch.Tensor, per_head=False,
                                            mask: StructuredMask | None = None, return_lse: bool = False):
    """fp32 torch reference: output from the full softmax; statistics from the selected rows only."""
    batch, hq, hkv, nq, nk, d = check_qkv(query, key, value)
    _head_div(per_head, hq, hkv)
    if mask is not None:
        allowed = mask.dense(nq).to(query.device)
    else:
        allowed = dense_mask(nq, nk, causal=causal, key_valid=key_valid, device=query.device)
    out, lse = attention_from_mask(query, key, value, allowed, scaling, return_lse=True)
    rec = received_attention_reference(query, key, stat_queries=stat_queries, scaling=scaling, per_head=per_head,
                                       allowed=allowed)
    return (out, rec, lse) if return_lse else (out, rec)
