"""Kernel 5: decoding attention over a dense KV cache with a key mask, split over the keys (flash-decoding); and the
split-KV pieces kernel 4 (ragged_decode.py) shares.

The fast path's decoding step (vlm_efficient/fast_path.py) keeps each layer's keys in a static buffer
[B, Hkv, capacity, d] whose slots count per sample through a boolean mask (the kept prompt keys without padding, then
the generated tokens written so far). Every layer without a decoding edit attends through this kernel. SDPA with a
boolean mask is the slow case of transformers' route: it repeats the KV heads for grouped-query attention (no
`enable_gqa` with a mask) and runs the memory-efficient backend. Measured in the captured step of Qwen2-VL-7B
(2,329 keys, 28 query / 4 KV heads, H100): 55 us per call, where reading its keys and values takes under 2 us.

Grid (B * Hkv, n_split): a program loads the G = Hq / Hkv query heads of one KV head as one tile (padded to 16 rows
for the tensor cores), walks its slice of the keys in BLOCK_N tiles with the mask applied to the loads (a masked
key is neither read nor counted) and writes a partial (output, LSE) per split; a second small kernel merges the
splits (with one split the first kernel writes the output). The split geometry depends on the buffer length and
B * Hkv only, so a captured graph keeps its launches. A row with no valid key returns 0, as SDPA.
"""

from __future__ import annotations

import torch

from ._common import block_d, byte_flags, cdiv, check_qkv, last_dim_contiguous, next_pow2, triton_available
from .launch import launch

LOG2E = 1.4426950408889634
# (BLOCK_N, num_stages, num_warps, min_split, target_programs): min_split / target_programs set the split geometry
# (split_geometry). H100, kernel_bench's k5 sweep (results/fast_bench_h100_run12/kernels): with few (sample, KV head)
# programs (batch 1) 128-key tiles and 8 warps won (Qwen2-VL clip 13.7 us against 14.6, LLaVA-1.5 12.1 against
# 13.7); at batch 8 they lost (53.3 / 178.8 us against 44.7 / 146.9 for the second row)
DECODE_CONFIGS = [(32, (128, 3, 8, 256, 528)), (None, (64, 4, 4, 512, 264))]  # (up to this many programs, config)
SHARED_BUDGET = 200 * 1024  # bytes of K and V tiles over the pipeline stages (decode_tiles)

if triton_available():
    import triton
    import triton.language as tl

    from .masked_attention import _load_rows, mma, pv_dot, softmax_step

    @triton.jit
    def split_program(Q, sqb, sqh, Hkv, G, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr):
        """(sample, KV head, split, and the tile of the G query heads of that KV head) of a split-KV decoding program,
        on grid (B * Hkv, n_split)."""
        pid = tl.program_id(0)
        b = pid // Hkv
        h = pid % Hkv
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(Q + b.to(tl.int64) * sqb, h * G + offs_g, sqh, offs_d, offs_g < G, HEAD_D, BLOCK_D, True)
        return pid, tl.program_id(1), b, h, q

    @triton.jit
    def split_attend(q, k_base, v_base, stride_kn, stride_vn, start, end, valid_base, qk_scale, logits_base,
                     stride_lg, G, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                     BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, KEEP_LOGITS: tl.constexpr):
        """Online softmax of the query tile q [BLOCK_G, BLOCK_D] over keys start..end-1 (rows of k_base / v_base),
        those with a zero byte at valid_base skipped when HAS_VALID: (acc, running max, sum), base-2 logits.
        KEEP_LOGITS: the tile's G heads also store their base-2 logits (-inf at skipped keys) in rows of stride_lg
        from logits_base, for the probabilities' second pass (head_mean)."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n in range(start, end, BLOCK_N):
            cols = n + offs_n
            ok = cols < end
            if HAS_VALID:
                ok = ok & (tl.load(valid_base + cols, mask=ok, other=0) != 0)
            k = _load_rows(k_base, cols, stride_kn, offs_d, ok, HEAD_D, BLOCK_D, True)
            s = tl.where(ok[None, :], mma(q, tl.trans(k), None) * qk_scale, float("-inf"))
            if KEEP_LOGITS:
                offs_g = tl.arange(0, BLOCK_G)
                tl.store(logits_base + offs_g[:, None].to(tl.int64) * stride_lg + cols[None, :], s,
                         mask=(offs_g < G)[:, None] & (cols < end)[None, :])
            p, alpha, m_new = softmax_step(s, m_i)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_rows(v_base, cols, stride_vn, offs_d, ok, HEAD_D, BLOCK_D, True)
            acc = pv_dot(p, v, acc * alpha[:, None])
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def split_finish(acc, m_i, l_i, O, b, h, G, sob, soh, PO, PL, part,
                     HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, DIRECT: tl.constexpr):
        """Store a split's result: the output rows h * G .. h * G + G - 1 of sample b (DIRECT: the only split), or the
        partial (normalised output, LSE) of split `part` for split_combine."""
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        has = l_i > 0.0
        out = acc * tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)[:, None]
        if DIRECT:
            o_ptrs = O + b.to(tl.int64) * sob + (h * G + offs_g)[:, None].to(tl.int64) * soh + offs_d[None, :]
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_g < G)[:, None] & (offs_d < HEAD_D)[None, :])
        else:
            tl.store(PO + (part * BLOCK_G + offs_g)[:, None] * BLOCK_D + offs_d[None, :], out)
            lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(PL + part * BLOCK_G + offs_g, lse)

    @triton.jit
    def _split_combine_kernel(
        PO, PL, O, LSE, sob, soh, Hkv, G, n_split,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, WRITE_LSE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // Hkv
        h = pid % Hkv
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for s in range(0, n_split):
            part = pid.to(tl.int64) * n_split + s
            ls = tl.load(PL + part * BLOCK_G + offs_g)
            os_ = tl.load(PO + (part * BLOCK_G + offs_g)[:, None] * BLOCK_D + offs_d[None, :])
            m_new = tl.maximum(m, ls)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            a = tl.math.exp2(m - m_use)
            w = tl.math.exp2(ls - m_use)
            den = den * a + w
            acc = acc * a[:, None] + os_ * w[:, None]
            m = m_new
        has = den > 0.0
        out = acc * tl.where(has, 1.0 / tl.where(has, den, 1.0), 0.0)[:, None]
        o_ptrs = O + b.to(tl.int64) * sob + (h * G + offs_g)[:, None].to(tl.int64) * soh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_g < G)[:, None] & (offs_d < HEAD_D)[None, :])
        if WRITE_LSE:  # base 2, [B, Hq]; -inf for a row with no valid key
            lse = tl.where(has, m + tl.math.log2(tl.where(has, den, 1.0)), float("-inf"))
            tl.store(LSE + pid.to(tl.int64) * G + offs_g, lse, mask=offs_g < G)

    @triton.jit
    def _head_mean_kernel(LG, LSE, OUT, Hq, N, BLOCK_N: tl.constexpr):
        """OUT [B, N] = the probabilities of the Hq heads averaged: exp2(logit - LSE) from the logits LG [B, Hq, N]
        and the LSEs [B, Hq] the first pass wrote (base 2)."""
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = cols < N
        total = tl.zeros([BLOCK_N], tl.float32)
        for h in range(0, Hq):
            lse = tl.load(LSE + b * Hq + h)
            logits = tl.load(LG + (b * Hq + h) * N + cols, mask=ok, other=float("-inf"))
            total += tl.where(lse == float("-inf"), 0.0, tl.math.exp2(logits - lse))
        tl.store(OUT + b * N + cols, total / Hq, mask=ok)

    @triton.jit
    def _masked_decode_kernel(
        Q, K, V, VALID, O, PO, PL, LG,
        sqb, sqh, skb, skh, skn, svb, svh, svn, sab, sob, soh,
        Hkv, G, N, qk_scale, n_split, split_len,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_VALID: tl.constexpr, DIRECT: tl.constexpr, KEEP_LOGITS: tl.constexpr,
    ):
        pid, sp, b, h, q = split_program(Q, sqb, sqh, Hkv, G, HEAD_D, BLOCK_D, BLOCK_G)
        b64 = b.to(tl.int64)
        start = sp * split_len
        end = tl.minimum(start + split_len, N)
        acc, m_i, l_i = split_attend(q, K + b64 * skb + h.to(tl.int64) * skh, V + b64 * svb + h.to(tl.int64) * svh,
                                     skn, svn, start, end, VALID + b64 * sab, qk_scale, LG + pid.to(tl.int64) * G * N,
                                     N, G, HEAD_D, BLOCK_D, BLOCK_G, BLOCK_N, HAS_VALID, KEEP_LOGITS)
        split_finish(acc, m_i, l_i, O, b, h, G, sob, soh, PO, PL, pid.to(tl.int64) * n_split + sp,
                     HEAD_D, BLOCK_D, BLOCK_G, DIRECT)


def decode_config(programs: int) -> tuple[int, int, int, int, int]:
    """The DECODE_CONFIGS row for this many (sample, KV head) programs."""
    return next(config for limit, config in DECODE_CONFIGS if limit is None or programs <= limit)


def decode_tiles(block_n: int, stages: int, min_split: int, block_d_: int, element_size: int, device):
    """(BLOCK_N, num_stages, min_split) a split-KV decoding kernel launches with on `device`: off a GPU the
    interpreter's (16-key tiles, one stage, splits of one tile: many blocks and splits on tiny shapes); on a GPU the
    configured ones, the tile halved while the K and V tiles over the pipeline stages would pass SHARED_BUDGET (an
    H100 SM has 227 KB; Triton 3.6 asked 283 KB for kernel 3's decoding form at head_dim 256 in fp32 with 64-key
    tiles over 3 stages and failed to launch)."""
    if device.type != "cuda":
        return 16, 1, 16
    while block_n > 16 and 2 * stages * block_n * block_d_ * element_size > SHARED_BUDGET:
        block_n //= 2
    return block_n, stages, min_split


def split_geometry(length: int, programs: int, *, target_programs: int, min_split: int, split_multiple: int):
    """(split_len, n_split) for `programs` (batch x KV heads) walking `length` keys: enough splits to fill about
    `target_programs` programs, each at least `min_split` keys, a multiple of `split_multiple`."""
    want = max(1, cdiv(target_programs, max(programs, 1)))
    split = max(min_split, cdiv(cdiv(max(length, 1), want), split_multiple) * split_multiple)
    return split, max(1, cdiv(max(length, 1), split))


def decode_blocks(head_dim: int, query_heads: int, kv_heads: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_G): the padded head dim and the query-head tile (at least 16 rows for the tensor cores)."""
    return block_d(head_dim), max(16, next_pow2(query_heads // kv_heads))


def split_workspace(programs: int, n_split: int, block_g: int, block_d_: int, device):
    """The partial outputs and LSEs of n_split > 1 splits (fp32)."""
    return (torch.empty(programs * n_split * block_g * block_d_, dtype=torch.float32, device=device),
            torch.empty(programs * n_split * block_g, dtype=torch.float32, device=device))


def split_combine(po, pl, out, kv_heads: int, group: int, n_split: int, head_dim: int, block_g: int,
                  lse: torch.Tensor | None = None) -> None:
    """Merge the splits' partials into `out`; and, given `lse` [B, Hq] fp32, each row's base-2 LSE into it."""
    launch(_split_combine_kernel, (out.shape[0] * kv_heads,),
           po, pl, out, out if lse is None else lse, out.stride(0), out.stride(2), kv_heads, group, n_split,
           HEAD_D=head_dim, BLOCK_D=block_d(head_dim), BLOCK_G=block_g, WRITE_LSE=lse is not None,
           num_warps=4)  # fmt: skip


def masked_decode_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                         key_valid: torch.Tensor | None, scaling: float, head_mean: bool = False):
    """query [B, Hq, 1, d]; key / value [B, Hkv, N, d] (any strides with a unit last one); key_valid [B, >= N] bool
    (the first N entries are read; None: every key) -> [B, 1, Hq, d]; with `head_mean` also [B, N] fp32, the
    attention probabilities averaged over the Hq heads (a second pass over the logits the first one stores)."""
    batch, hq, hkv, nq, n, d = check_qkv(query, key, value)
    if nq != 1:
        raise ValueError(f"masked decode takes one query row per sample, got {nq}")
    query, key, value = last_dim_contiguous(query), last_dim_contiguous(key), last_dim_contiguous(value)
    valid = None if key_valid is None else byte_flags(key_valid)
    if valid is not None and (valid.shape[0] != batch or valid.shape[1] < n):
        raise ValueError(f"key_valid {tuple(key_valid.shape)} does not cover {batch} samples x {n} keys")
    bd, bg = decode_blocks(d, hq, hkv)
    block_n, stages, warps, min_split, target = decode_config(batch * hkv)
    block_n, stages, min_split = decode_tiles(block_n, stages, min_split, bd, query.element_size(), query.device)
    split_len, n_split = split_geometry(n, batch * hkv, target_programs=target, min_split=min_split,
                                        split_multiple=block_n)
    out = torch.empty(batch, 1, hq, d, dtype=query.dtype, device=query.device)
    direct = n_split == 1 and not head_mean  # the probabilities need the LSE that split_combine writes
    po, pl = (out, out) if direct else split_workspace(batch * hkv, n_split, bg, bd, query.device)
    logits = torch.empty(batch, hq, n, dtype=torch.float32, device=query.device) if head_mean else out
    launch(_masked_decode_kernel, (batch * hkv, n_split),
        query, key, value, key if valid is None else valid, out, po, pl, logits,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), 0 if valid is None else valid.stride(0),
        out.stride(0), out.stride(2), hkv, hq // hkv, n, float(scaling) * LOG2E, n_split, split_len,
        HEAD_D=d, BLOCK_D=bd, BLOCK_G=bg, BLOCK_N=block_n, HAS_VALID=valid is not None, DIRECT=direct,
        KEEP_LOGITS=head_mean, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if direct:
        return out
    lse = torch.empty(batch, hq, dtype=torch.float32, device=query.device) if head_mean else None
    split_combine(po, pl, out, hkv, hq // hkv, n_split, d, bg, lse)
    if not head_mean:
        return out
    mean = torch.empty(batch, n, dtype=torch.float32, device=query.device)
    block = 16 if query.device.type != "cuda" else 256
    launch(_head_mean_kernel, (batch, cdiv(n, block)), logits, lse, mean, hq, n, BLOCK_N=block, num_warps=4)
    return out, mean


def masked_decode_reference(query, key, value, *, key_valid=None, scaling: float, head_mean: bool = False):
    """fp32 softmax over the valid keys of one row per sample (kernel 1's reference, not causal); with `head_mean`
    also the probabilities averaged over the heads [B, N] (0 where no key is valid)."""
    from .masked_attention import attention_from_mask, dense_mask

    n = key.shape[2]
    valid = None if key_valid is None else key_valid[:, :n].bool()
    allowed = dense_mask(1, n, causal=False, key_valid=valid, device=query.device)
    if not head_mean:
        return attention_from_mask(query, key, value, allowed, scaling)
    out, probs = attention_from_mask(query, key, value, allowed, scaling, return_probs=True)
    return out, probs.mean(1)[:, 0]
