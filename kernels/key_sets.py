"""Kernel 6: A-VL's decoding-step update of one layer's key sets, in one launch; and the stable top-k selection the
library's methods share (its torch form).

A-VL (token_ops/avl.py) keeps, per layer and sample, sets of key slots over the static decoding buffer: the
secondary and core image keys, the text keys' accumulated attention (H2O's score) and the evicted text keys. After
each step's attention it may re-pick the core (at an update step: the top of the secondary set by the step's
head-averaged attention, as many as the core holds), adds the step's attention to the text scores, evicts the text
keys outside H2O's budget (the most recent half of it, the heaviest accumulated attention for the rest), and writes
the next step's key mask. In torch ops that is some fifty small kernels per layer and step (two stable sorts among
them); here one program per sample does it over the whole buffer in registers.

Top-k in the kernel: the scores' float bits mapped to integers of the same order, the k-th largest found by a
32-round bitwise search on counts (each round one comparison and one sum over the row), then the keys above it and
the first of those equal to it (a cumulative count): the earlier position wins a tie, as the stable sort of
`top_k_mask` does, so both pick the same keys."""

from __future__ import annotations

import torch

from ._common import next_pow2, triton_available
from .launch import launch

MAX_KEYS = 16384  # the longest buffer one program holds in registers (longer: the torch form)


def top_k_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean [B, n]: the k[b] highest-scoring candidates of each row. Ties go to the earlier position (a stable
    sort), so the choice is the same on every device."""
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = masked.sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < k.to(rank.device)[:, None])


def text_budget(count: torch.Tensor, text_rate: float) -> torch.Tensor:
    """H2O's budget: the text keys kept of `count`, all but floor(count x text_rate) (float64, as on the host)."""
    return count - torch.floor(count.double() * text_rate).long()


def allowed_keys(secondary, core, evicted, visual, update) -> torch.Tensor:
    """[B, n] the keys a step attends to: the secondary image keys at an update step, else the core, and the text
    keys not evicted. `update`: a host bool or a device one."""
    if isinstance(update, bool):
        attended = secondary if update else core
    else:
        attended = torch.where(update, secondary, core)
    return torch.where(visual, attended, ~evicted)


def update_reference(attention, secondary, core, score, evicted, text, update, text_rate: float) -> None:
    """After a step's softmax, in place: at an update step (a host or a device bool) the core re-picked as the top of
    the secondary set by `attention` [B, n] (the step's head-averaged probabilities), then, with a text_rate, H2O's
    eviction of the `text` keys."""
    if isinstance(update, bool):
        if update:
            core.copy_(top_k_mask(attention, secondary, core.sum(1)))
    else:
        core.copy_(torch.where(update, top_k_mask(attention, secondary, core.sum(1)), core))
    if not text_rate:
        return
    score.add_(attention * text)
    live = text & ~evicted
    budget = text_budget(text.sum(1), text_rate)
    live_from_here = live.flip(1).cumsum(1).flip(1)  # live keys at or after each column: the last k have <= k
    recent = live & (live_from_here <= (budget // 2)[:, None])
    heavy = top_k_mask(score, live & ~recent, budget - budget // 2)
    evicted |= live & ~recent & ~heavy


def step_reference(attention, secondary, core, score, evicted, prompt_text, visual, keys, mask, step, *,
                   length: int, interval: int, text_rate: float) -> None:
    """One step over a static buffer, in place (what the kernel does): `keys` [B, n] the slots' original positions
    (the generated ones from `length` on, written one per step), `step` [1] the number of this step (from 1): the
    update flag is step % interval == 0, the text keys are `prompt_text` and the generated slots written so far; then
    `mask` [B, n] = the keys the next step attends to. The caller advances `step`."""
    written = (keys >= length) & (keys < length + step)
    update_reference(attention, secondary, core, score, evicted, prompt_text | written, step % interval == 0,
                     text_rate)  # fmt: skip
    mask.copy_(allowed_keys(secondary, core, evicted, visual, (step + 1) % interval == 0))


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _top_k(scores, candidates, k, BLOCK: tl.constexpr):
        """candidates & the k highest scores [BLOCK] (fp32), ties to the earlier position."""
        bits = tl.where(scores == 0.0, 0.0, scores).to(tl.int32, bitcast=True)  # -0.0 counts as 0.0, as in a sort
        order = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # integers in the floats' order (negative floats flipped)
        order = tl.where(candidates, order, -2147483648)  # below every candidate, even -inf
        threshold = tl.full([], -2147483648, tl.int64)  # the k-th largest: the largest t with count(order >= t) >= k
        for bit in tl.static_range(31, -1, -1):
            trial = threshold + (1 << bit)
            enough = tl.sum((order.to(tl.int64) >= trial).to(tl.int32), 0) >= k
            threshold = tl.where(enough, trial, threshold)
        above = candidates & (order.to(tl.int64) > threshold)
        tied = candidates & (order.to(tl.int64) == threshold)
        room = k - tl.sum(above.to(tl.int32), 0)
        return above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= room))

    @triton.jit
    def _avl_step_kernel(ATT, SEC, CORE, SCORE, EVICTED, PTEXT, VISUAL, KEYS, MASK, STEP, BUDGET,
                         s_att, s_flags, s_score, s_keys, s_mask, N, length, interval,
                         EVICT: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        attention = tl.load(ATT + b * s_att + cols, mask=ok, other=0.0)
        secondary = tl.load(SEC + b * s_flags + cols, mask=ok, other=0) != 0
        core = tl.load(CORE + b * s_flags + cols, mask=ok, other=0) != 0
        evicted = tl.load(EVICTED + b * s_flags + cols, mask=ok, other=0) != 0
        visual = tl.load(VISUAL + b * s_flags + cols, mask=ok, other=0) != 0
        step = tl.load(STEP)
        if step % interval == 0:
            core = _top_k(attention, secondary, tl.sum(core.to(tl.int32), 0), BLOCK)
            tl.store(CORE + b * s_flags + cols, core.to(tl.uint8), mask=ok)
        if EVICT:
            keys = tl.load(KEYS + b * s_keys + cols, mask=ok, other=-1)
            text = (tl.load(PTEXT + b * s_flags + cols, mask=ok, other=0) != 0) | (
                (keys >= length) & (keys < length + step))
            text = text & ok
            score = tl.load(SCORE + b * s_score + cols, mask=ok, other=0.0) + attention * text.to(tl.float32)
            tl.store(SCORE + b * s_score + cols, score, mask=ok)
            live = text & ~evicted
            live_count = live.to(tl.int32)
            budget = tl.load(BUDGET + tl.sum(text.to(tl.int32), 0))
            recent_budget = budget // 2
            live_from_here = tl.sum(live_count, 0) - tl.cumsum(live_count, 0) + live_count
            recent = live & (live_from_here <= recent_budget)
            heavy = _top_k(score, live & ~recent, budget - recent_budget, BLOCK)
            evicted = evicted | (live & ~recent & ~heavy)
            tl.store(EVICTED + b * s_flags + cols, evicted.to(tl.uint8), mask=ok)
        attended = tl.where((step + 1) % interval == 0, secondary, core)
        tl.store(MASK + b * s_mask + cols, tl.where(visual, attended, ~evicted).to(tl.uint8), mask=ok)


def step_triton(attention, secondary, core, score, evicted, prompt_text, visual, keys, mask, step, *,
                length: int, interval: int, budgets: torch.Tensor | None) -> None:
    """step_reference in one launch (one program per sample). `budgets` [n + 1] int: text_budget of every count
    (None: no eviction). The flags are bool [B, n] with a unit last stride and one row stride among them."""
    batch, n = attention.shape
    flags = [t.view(torch.uint8) for t in (secondary, core, evicted, prompt_text, visual)]
    if len({t.stride(0) for t in flags}) != 1 or any(t.stride(1) != 1 for t in (*flags, attention, score, keys, mask)):
        raise ValueError("key_sets.step_triton: the flags need one row stride and every tensor a unit last stride")
    launch(_avl_step_kernel, (batch,),
           attention, flags[0], flags[1], score, flags[2], flags[3], flags[4], keys, mask.view(torch.uint8), step,
           keys if budgets is None else budgets,
           attention.stride(0), flags[0].stride(0), score.stride(0), keys.stride(0), mask.stride(0), n, length,
           interval, EVICT=budgets is not None, BLOCK=max(16, next_pow2(n)),
           num_warps=8 if n > 2048 else 4)  # fmt: skip
