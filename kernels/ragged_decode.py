"""Kernel 4: decode attention over a per-head ragged KV cache (PLPHP: every (layer, KV head) keeps its own tokens).

Storage (`RaggedKVCache`, one per layer): two flat buffers k_buf / v_buf [T, d]; segment (b, h) of the
head-as-batch layout starts at row offsets[b * Hkv + h], holds lengths[...] tokens and has room for capacity[...]
rows (its kept tokens + max_new_tokens). `append()` writes one new token per (b, h) at offset + length and bumps the
device-side lengths: no reallocation, no host sync, so a decode step (append + attention) can be captured in a CUDA
graph. Token order inside a segment is irrelevant to attention (RoPE is already applied to the cached keys).

Kernel: grid (B * Hkv, n_split); each program loads the G = Hq / Hkv query heads of its group as one tile (padded to
16 rows for the tensor cores), walks its slice of the segment in BLOCK_N-token tiles (split-KV, flash-decoding)
and writes a partial (output, LSE); a second small kernel merges the splits (the loop, the stores and the merge are
kernel 5's, split_decode.py). n_split and the slice size are fixed when the cache is built (from the largest
capacity), so the launch grid never changes between steps; programs past a segment's length write an empty partial.
With one split the first kernel writes the output directly.
"""

from __future__ import annotations

import torch

from ._common import repeat_kv, triton_available
from .launch import launch
from .split_decode import LOG2E, decode_blocks, decode_tiles, split_combine, split_geometry, split_workspace

if triton_available():
    import triton
    import triton.language as tl

    from .split_decode import split_attend, split_finish, split_program

    @triton.jit
    def _ragged_split_kernel(
        Q, KB, VB, OFFS, LENS, O, PO, PL,
        sqb, sqh, sob, soh, Hkv, G, qk_scale, n_split, split_len,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr,
    ):
        pid, sp, b, h, q = split_program(Q, sqb, sqh, Hkv, G, HEAD_D, BLOCK_D, BLOCK_G)
        seg = tl.load(OFFS + pid).to(tl.int64)
        start = sp * split_len
        end = tl.minimum(start + split_len, tl.load(LENS + pid))
        acc, m_i, l_i = split_attend(q, KB + seg * HEAD_D, VB + seg * HEAD_D, HEAD_D, HEAD_D, start, end, LENS,
                                     qk_scale, LENS, 0, G, HEAD_D, BLOCK_D, BLOCK_G, BLOCK_N, False, False)
        split_finish(acc, m_i, l_i, O, b, h, G, sob, soh, PO, PL, pid.to(tl.int64) * n_split + sp,
                     HEAD_D, BLOCK_D, BLOCK_G, DIRECT)


class RaggedKVCache:
    """Per-head ragged KV storage for one layer (see the module docstring).

    Attributes: k_buf, v_buf [T, d]; offsets, lengths, capacity: int32 [B * Hkv] on the device."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, capacity: torch.Tensor, *,
                 dtype=torch.bfloat16, device=None, split_multiple: int = 128, target_programs: int = 528,
                 min_split: int = 256, rows: int | None = None, longest: int | None = None):
        """`capacity` [B * Hkv]: each segment's rows. `rows` / `longest` (a layout made per call, `refill`): the
        buffers' rows and the longest segment the split geometry must cover, instead of capacity's sum and max."""
        capacity = torch.as_tensor(capacity, dtype=torch.int64).reshape(batch * num_kv_heads).cpu()
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        self.dtype = dtype
        device = torch.device(device) if device is not None else torch.device("cpu")
        total = int(capacity.sum()) if rows is None else rows
        # one row past the segments: where refill() sends the keys a head does not keep (no host read to drop them)
        self.k_buf = torch.zeros(total + 1, head_dim, dtype=dtype, device=device)
        self.v_buf = torch.zeros(total + 1, head_dim, dtype=dtype, device=device)
        offsets = torch.cumsum(capacity, 0) - capacity
        self.offsets = offsets.to(torch.int32).to(device)
        self.capacity = capacity.to(torch.int32).to(device)
        self.lengths = torch.zeros(batch * num_kv_heads, dtype=torch.int32, device=device)
        self._capacity_host = capacity
        self._slack_host = int(capacity.min()) if capacity.numel() else 0  # room left in the fullest segment
        self.max_capacity = (int(capacity.max()) if capacity.numel() else 0) if longest is None else longest
        # fixed split geometry (CUDA-graph friendly)
        self.split_len, self.n_split = split_geometry(self.max_capacity, batch * num_kv_heads,
                                                      target_programs=target_programs, min_split=min_split,
                                                      split_multiple=split_multiple)  # fmt: skip
        self._work: dict = {}

    @property
    def device(self) -> torch.device:
        return self.k_buf.device

    @classmethod
    def from_dense(cls, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, *, max_new_tokens: int = 0,
                   key_valid: torch.Tensor | None = None, **kwargs) -> "RaggedKVCache":
        """key/value [B, Hkv, N, d]; keep: bool [B, Hkv, N] or per-head indices [B, Hkv, K] (-1 = none).
        Padding keys (key_valid False) are dropped. Capacity per head = kept + max_new_tokens."""
        batch, hkv, n, d = key.shape
        if keep.dtype != torch.bool:
            idx = keep.long()
            mask = torch.zeros(batch, hkv, n + 1, dtype=torch.bool, device=key.device)
            mask.scatter_(2, torch.where(idx >= 0, idx, n), True)
            keep = mask[..., :n]
        if key_valid is not None:
            keep = keep & key_valid.bool()[:, None, :]
        lengths = keep.sum(-1).reshape(-1)
        cache = cls(batch, hkv, d, (lengths + max_new_tokens).cpu(), dtype=key.dtype, device=key.device, **kwargs)
        cache._place(key, value, keep, lengths, cache.capacity)
        cache._slack_host = int((cache._capacity_host - lengths.cpu()).min())
        return cache

    def refill(self, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, room: int) -> None:
        """Lay the buffers out anew for keep (bool [B, Hkv, N], padding False) with `room` free rows per segment,
        on the device (no host read): a cache made with `rows` >= kept keys + B * Hkv * room and `longest` >=
        N + room (the caller knows both). The fast path's decoding step reloads its per-head caches so per call."""
        lengths = keep.sum(-1).reshape(-1)
        self._place(key, value, keep, lengths, lengths + room)

    def _place(self, key, value, keep, lengths, capacity) -> None:
        """Segments of `capacity` [B * Hkv] rows from row 0, each (b, h)'s `lengths` kept keys (keep [B, Hkv, N])
        copied to the start of its own (the others to the spare last row)."""
        batch, hkv, n, d = key.shape
        self.capacity.copy_(capacity)
        self.offsets.copy_(torch.cumsum(capacity, 0) - capacity)
        self.lengths.copy_(lengths)
        rank = keep.long().cumsum(-1) - 1
        dest = torch.where(keep, self.offsets.long().view(batch, hkv, 1) + rank, self.k_buf.shape[0] - 1)
        self.k_buf.index_copy_(0, dest.reshape(-1), key.reshape(-1, d).to(self.dtype))
        self.v_buf.index_copy_(0, dest.reshape(-1), value.reshape(-1, d).to(self.dtype))

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value [B, Hkv, 1, d] (or [B, Hkv, d]): one new token for every (b, h). Device-side only."""
        if self._slack_host <= 0:
            raise RuntimeError("RaggedKVCache is full: build it with a larger max_new_tokens")
        self.write(key, value)
        self._slack_host -= 1

    def write(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """append() without its host-side count of the room left (the caller made room for every token it writes):
        device work only, the same in a captured graph at every replay."""
        rows = (self.offsets + self.lengths).long()
        self.k_buf.index_copy_(0, rows, key.reshape(-1, self.head_dim).to(self.dtype))
        self.v_buf.index_copy_(0, rows, value.reshape(-1, self.head_dim).to(self.dtype))
        self.lengths += 1

    def grow(self, extra: int) -> None:
        """Give every segment `extra` more rows: new buffers, each segment's rows (used or not) copied to its new
        offset on the device (the capacities are known on the host: no sync). The split geometry follows."""
        old_capacity = self._capacity_host
        grown = RaggedKVCache(self.batch, self.num_kv_heads, self.head_dim, old_capacity + extra, dtype=self.dtype,
                              device=self.device)  # fmt: skip
        segment = torch.repeat_interleave(torch.arange(old_capacity.numel()), old_capacity).to(self.device)
        rank = torch.arange(segment.numel(), device=self.device) - self.offsets.long()[segment]
        rows = grown.offsets.long()[segment] + rank
        grown.k_buf.index_copy_(0, rows, self.k_buf[: segment.numel()])
        grown.v_buf.index_copy_(0, rows, self.v_buf[: segment.numel()])
        grown.lengths.copy_(self.lengths)
        grown._slack_host = self._slack_host + extra
        self.__dict__.update(grown.__dict__)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values [B * Hkv, max capacity, d], valid [B * Hkv, max capacity]): every segment gathered into one
        padded tensor on the device (no host sync), for the torch path."""
        slots = torch.arange(self.max_capacity, device=self.device)
        rows = (self.offsets.long()[:, None] + slots).clamp(max=self.k_buf.shape[0] - 1)
        return self.k_buf[rows], self.v_buf[rows], slots < self.lengths[:, None]

    def segments(self):
        """Host-side list of (k, v) per (b, h): for references and tests."""
        offs = self.offsets.tolist()
        lens = self.lengths.tolist()
        return [(self.k_buf[o:o + n], self.v_buf[o:o + n]) for o, n in zip(offs, lens)]

    def kv_bytes(self) -> int:
        """Bytes of K and V the attention reads (sum of lengths)."""
        return int(self.lengths.sum()) * self.head_dim * self.k_buf.element_size() * 2

    def _workspace(self, hq: int):
        block_d_, block_g = decode_blocks(self.head_dim, hq, self.num_kv_heads)
        key = (hq, str(self.device))
        if key not in self._work:
            po, pl = split_workspace(self.batch * self.num_kv_heads, self.n_split, block_g, block_d_, self.device)
            self._work[key] = (po, pl, block_g)
        return self._work[key]


DECODE_CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 4}  # H100; see NOTES.md


def ragged_decode_attention_triton(query: torch.Tensor, cache: RaggedKVCache, *, scaling: float,
                                   out: torch.Tensor | None = None) -> torch.Tensor:
    batch, hq, nq, d = query.shape
    if nq != 1:
        raise ValueError("ragged decode takes one query token per sample")
    if batch != cache.batch or d != cache.head_dim or hq % cache.num_kv_heads:
        raise ValueError("query does not match the cache")
    if query.stride(-1) != 1:
        query = query.contiguous()
    g = hq // cache.num_kv_heads
    po, pl, bg = cache._workspace(hq)
    if out is None:
        out = torch.empty(batch, 1, hq, d, dtype=query.dtype, device=query.device)
    bd, _ = decode_blocks(d, hq, cache.num_kv_heads)
    bh = batch * cache.num_kv_heads
    direct = cache.n_split == 1
    # the split geometry is the cache's (fixed when it is built): the tiles only
    block_n, stages, _ = decode_tiles(DECODE_CONFIG["block_n"], DECODE_CONFIG["num_stages"], 0, bd,
                                      query.element_size(), query.device)  # fmt: skip
    launch(_ragged_split_kernel, (bh, cache.n_split),
        query, cache.k_buf, cache.v_buf, cache.offsets, cache.lengths, out, po, pl,
        query.stride(0), query.stride(1), out.stride(0), out.stride(2),
        cache.num_kv_heads, g, float(scaling) * LOG2E, cache.n_split, cache.split_len,
        HEAD_D=d, BLOCK_D=bd, BLOCK_G=bg, BLOCK_N=block_n, DIRECT=direct, num_warps=DECODE_CONFIG["num_warps"],
        num_stages=stages,
    )
    if not direct:
        split_combine(po, pl, out, cache.num_kv_heads, g, cache.n_split, d, bg)
    return out


def ragged_decode_attention_reference(query: torch.Tensor, cache: RaggedKVCache, *, scaling: float) -> torch.Tensor:
    """fp32, one (b, kv head) segment at a time."""
    batch, hq, _, d = query.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    out = torch.zeros(batch, 1, hq, d, dtype=torch.float32, device=query.device)
    for i, (k, v) in enumerate(cache.segments()):
        b, h = divmod(i, hkv)
        if k.shape[0] == 0:
            continue
        qh = query[b, h * g:(h + 1) * g, 0].float()  # [G, d]
        p = torch.softmax((qh @ k.float().T) * scaling, -1)
        out[b, 0, h * g:(h + 1) * g] = p @ v.float()
    return out.to(query.dtype)


def ragged_decode_attention_torch(query: torch.Tensor, cache: RaggedKVCache, *, scaling: float) -> torch.Tensor:
    """The kernel's computation in batched torch ops over the padded segments: no host sync, any device."""
    batch, hq, _, d = query.shape
    hkv = cache.num_kv_heads
    keys, values, valid = cache.padded()  # [B * Hkv, S, d]
    q = query[:, :, 0].reshape(batch * hkv, hq // hkv, d).float()
    logits = (q @ keys.float().transpose(1, 2)) * scaling  # [B * Hkv, G, S]
    probs = torch.softmax(logits.masked_fill(~valid[:, None, :], float("-inf")), -1).nan_to_num(0.0)
    return (probs @ values.float()).reshape(batch, 1, hq, d).to(query.dtype)


def dense_masked_decode(query, key, value, keep, scaling):
    """The obvious version: dense [B, Hkv, N, d] cache, bool keep [B, Hkv, N], masked softmax."""
    batch, hq, _, d = query.shape
    hkv = key.shape[1]
    k = repeat_kv(key, hq // hkv).float()
    v = repeat_kv(value, hq // hkv).float()
    keep = repeat_kv(keep[..., None], hq // hkv)[..., 0]  # [B, Hq, N]
    logits = (query.float() @ k.transpose(-1, -2))[:, :, 0] * scaling
    logits = logits.masked_fill(~keep, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    return (p[:, :, None] @ v).transpose(1, 2).to(query.dtype)
