"""vlm_efficient.kernels.api: the entry points of the Triton attention kernels for visual-token methods, each with a
torch reference. (The folder has no __init__.py: a top-level `kernels/` package would shadow Hugging Face's `kernels`
wherever the checkout's root is on sys.path; import from here or from the kernel modules.)

Every entry point runs the Triton kernel when the tensors are on CUDA (and triton imports) and the torch reference
otherwise. `backend="auto" | "triton" | "reference"` (or `force_reference=True`) overrides that; "triton" on CPU
tensors needs TRITON_INTERPRET=1 set before triton is imported (that is how the CPU tests run the kernels).

Conventions (HF attention-interface layout): query [B, Hq, Nq, d]; key/value [B, Hkv, Nk, d] with keys NOT repeated
for grouped-query attention (query head h reads kv head h // (Hq // Hkv)); RoPE already applied; the queries are the
LAST Nq positions of the Nk keys (causal masks align bottom-right, as HF's). Outputs are [B, Nq, Hq, d] (transposed,
like HF's attention functions return), in the input dtype (bf16 / fp16; fp32 accepted). head_dim 64, 80 (computed in
a 128-wide tile) and 128. `scaling=None` means 1/sqrt(d). Padding: key_valid [B, Nk] bool, False = padding key (left
padding); a query row with no allowed key returns 0, never NaN (as SDPA).

flash_attention(query, key, value, *, scaling=None, causal=True, key_valid=None, return_lse=False)
    Plain causal / full attention with key padding. return_lse adds lse [B, Hq, Nq] fp32 (natural log; -inf for
    rows with no allowed key).

masked_attention(query, key, value, *, mask: StructuredMask, scaling=None, return_lse=False) -> out
    Structured masks from the modality layout. Build the mask once per forward and reuse it in every layer:
        layout = TokenLayout.from_modality_layout(engine_layout)      # or TokenLayout.from_modality(is_image, valid,
                                                                      #    grid_width=24, role=...)
        mask = StructuredMask(layout, MaskSpec.naavit())              # or build_mask(layout, spec)
    MaskSpec presets: plain_causal(), naavit() (no image->image attention except self), modality_mutual(roles)
    (image rows also see later text of those roles; default question + last token), neighbor_window(rows, cols,
    causal_window) (image tokens see image tokens of the same image within the 2-D window), and
    spec.with_knockout((query_role, key_role), ...) (block edges, e.g. (ROLE_QUESTION, ROLE_IMAGE)). Roles:
    ROLE_PREFIX, ROLE_IMAGE, ROLE_QUESTION, ROLE_LAST, ROLE_MIDDLE, ROLE_PAD, or any int 0..14 passed as role=.
    Padding comes from the layout (valid). The kernel skips key blocks that are fully masked (per-query-block lists
    of full / partial key blocks, cached on the StructuredMask per block shape); the exact rule is in layout.py.

attention_with_received_stats(query, key, value, *, key_valid=None, causal=True, scaling=None, stat_queries,
                              per_head=False, mask=None, return_lse=False) -> (out, received[, lse])
    out as flash_attention (or masked_attention when mask= is given). stat_queries: LongTensor [B, S] of query
    indices (into the Nq axis; -1 = unused slot; duplicates count twice). received = mean over the used rows of each
    row's softmax probabilities, float32:
        per_head=True  -> [B, Hq, Nk];  per_head="kv" -> [B, Hkv, Nk] (mean over each GQA group's query heads);
        per_head=False -> [B, Nk] (mean over all heads).
    FastV: stat_queries = index of the last prompt token (S=1), per_head=False. PyramidDrop: last instruction token.
    SparseVLM: the rater text rows. PLPHP: per_head="kv". The N x N matrix is never formed. stats_impl="auto"
    (= "rows"): the output from SDPA's default backend where it computes the same attention (no key padding, no
    mask, no LSE asked, Nq == Nk when causal; else the kernel-1 forward), the statistics from a small separate pass
    over the selected rows; "logits" | "colsum": statistics fused into the forward kernel (attention_stats.py).
    The output may be a non-contiguous [B, Nq, Hq, d] view (SDPA's output transposed, as HF's sdpa path returns
    before its .contiguous()).

received_attention(query, key, *, stat_queries, key_valid=None, causal=True, scaling=None, per_head=False,
                   mask=None) -> received
    The statistics alone (the rows pass above), for callers that already have the attention output (the engine's
    SDPA call with its own attention mask).

group_attention(query, key, value, *, key_group, spec: GroupSpec, key_valid=None, causal=True, scaling=None,
                query_select=None, key_bias=None) -> out
    key_group IntTensor [B, Nk] (values 0..G-1); spec holds per (query head, group) tables: logit_scale, logit_abs,
    logit_bias (pre-softmax: a -> a*scale + abs*|a| + bias, a = q.k*scaling), keep / receive (exact post-softmax
    redistribution: c_g = keep + receive * freed / received-mass), sink_group (few keys, e.g. token 0 or the visual
    sinks), an optional row condition (VAR's image-centric rows). query_select BoolTensor [B, Nq]: rows modified
    (None = all). key_bias FloatTensor [B, Nk]: extra per-key logit bias on selected rows. The methods build their
    own GroupSpecs (e.g. heads/pai.py::pai_groups, heads/var.py::var_groups); the kernels know only the tables.
    Formulas: group_attention.py docstring. Specs the kernel cannot run (more than two distinct keep/receive columns
    besides the sink group) fall back to the reference with a warning under backend="auto". Without key padding the
    unmodified tiles come from SDPA's default backend and the output is a transposed view of SDPA's (as for
    attention_with_received_stats). Per-key inputs are built once per key_group tensor: pass the same tensor to every
    layer of a forward.

group_decode_attention(query [B, Hq, 1, d], key, value, *, key_group, spec: GroupSpec, key_valid=None, scaling=None,
                       key_bias=None) -> [B, 1, Hq, d]
    group_attention for one decoding row per sample (every row selected), up to 4 key groups: split over the keys,
    one launch and a merge (one launch where the keys fit one split).
    key_group [B, >= Nk] int32 and key_bias [B, >= Nk] may be longer than the cache (a buffer for the coming steps:
    the first Nk entries are read). group_decode.py docstring.

masked_decode_attention(query [B, Hq, 1, d], key, value, *, key_valid=None, scaling=None, head_mean=False)
        -> [B, 1, Hq, d] (with head_mean: and [B, N] fp32, the probabilities averaged over the Hq heads)
    One decoding row per sample over a dense cache [B, Hkv, N, d] whose valid keys are key_valid [B, >= N] bool (the
    first N entries are read; a strided view is fine): split-KV with the mask applied to the loads, one launch plus a
    merge, no host work beyond the launches. The fast path's static decoding step runs it in every layer without a
    decoding edit, and with head_mean (one more launch over the stored logits) in the layers whose edits only mask
    keys and read the head-averaged attention (A-VL). split_decode.py docstring.

key_sets_step(attention [B, n], secondary, core, score, evicted, prompt_text, visual, keys, mask, step, *, length,
              interval, text_rate, budgets=None) -> None
    A-VL's update of one layer's key sets after a decoding step, in place, over a static buffer of n slots: the core
    re-picked at an update step, H2O's eviction, the next step's mask. One launch; `budgets` [n + 1] (text_budget of
    every count, made once) spares its making per call. key_sets.py docstring.

ragged_decode_attention(query [B, Hq, 1, d], cache: RaggedKVCache, *, scaling=None, out=None) -> [B, 1, Hq, d]
    Decode over per-(batch, kv head) token subsets (PLPHP). Build once per layer after prefill pruning:
        cache = RaggedKVCache.from_dense(key, value, keep, max_new_tokens=T, key_valid=valid)
    keep: bool [B, Hkv, N] or per-head indices [B, Hkv, K]. Each decode step: cache.append(k_new, v_new)
    ([B, Hkv, 1, d], RoPE applied) then ragged_decode_attention(q, cache). No reallocation per step; append and the
    attention are device-only and can be captured in a CUDA graph (pass a fixed `out=` buffer to reuse it).
"""

from __future__ import annotations

import warnings

import torch

from ._common import triton_available, use_triton
from .attention_stats import attention_with_received_stats_reference, received_attention_reference
from .group_attention import GroupSpec, group_attention_reference
from .group_decode import MAX_GROUPS as MAX_DECODE_GROUPS
from .group_decode import group_decode_reference
from .layout import (
    ROLE_IMAGE,
    ROLE_LAST,
    ROLE_MIDDLE,
    ROLE_PAD,
    ROLE_PREFIX,
    ROLE_QUESTION,
    BlockLists,
    MaskSpec,
    StructuredMask,
    TokenLayout,
    build_block_lists,
    build_mask,
    dense_allowed,
)
from .masked_attention import attention_reference, default_scaling, masked_attention_reference
from .ragged_decode import (RaggedKVCache, dense_masked_decode, ragged_decode_attention_reference,
                            ragged_decode_attention_torch)
from .split_decode import masked_decode_reference

__all__ = [
    "attention_reference", "attention_with_received_stats", "attention_with_received_stats_reference", "BlockLists",
    "build_block_lists", "build_mask", "dense_allowed", "dense_masked_decode", "flash_attention", "group_attention",
    "group_attention_reference", "group_decode_attention", "group_decode_reference", "GroupSpec", "key_sets_step",
    "masked_attention", "masked_attention_reference", "masked_decode_attention", "masked_decode_reference", "MaskSpec",
    "MAX_DECODE_GROUPS", "ragged_decode_attention", "ragged_decode_attention_reference",
    "ragged_decode_attention_torch", "RaggedKVCache", "received_attention", "received_attention_reference",
    "ROLE_IMAGE", "ROLE_LAST", "ROLE_MIDDLE", "ROLE_PAD", "ROLE_PREFIX", "ROLE_QUESTION", "StructuredMask",
    "TokenLayout", "triton_available",
]


def _backend(backend: str, force_reference: bool) -> str:
    return "reference" if force_reference else backend


def flash_attention(query, key, value, *, scaling=None, causal=True, key_valid=None, return_lse=False,
                    backend="auto", force_reference=False):
    scaling = default_scaling(query) if scaling is None else scaling
    if use_triton(_backend(backend, force_reference), query, key, value):
        from .masked_attention import flash_attention_triton
        return flash_attention_triton(query, key, value, scaling=scaling, causal=causal, key_valid=key_valid,
                                      return_lse=return_lse)
    return attention_reference(query, key, value, scaling=scaling, causal=causal, key_valid=key_valid,
                               return_lse=return_lse)


def masked_attention(query, key, value, *, mask: StructuredMask, scaling=None, return_lse=False, backend="auto",
                     force_reference=False):
    scaling = default_scaling(query) if scaling is None else scaling
    if use_triton(_backend(backend, force_reference), query, key, value):
        from .masked_attention import masked_attention_triton
        return masked_attention_triton(query, key, value, mask=mask, scaling=scaling, return_lse=return_lse)
    return masked_attention_reference(query, key, value, mask=mask, scaling=scaling, return_lse=return_lse)


def attention_with_received_stats(query, key, value, *, key_valid=None, causal=True, scaling=None, stat_queries,
                                  per_head=False, mask: StructuredMask | None = None, return_lse=False,
                                  backend="auto", force_reference=False, stats_impl="auto"):
    scaling = default_scaling(query) if scaling is None else scaling
    kw = dict(key_valid=key_valid, causal=causal, scaling=scaling, stat_queries=stat_queries, per_head=per_head,
              mask=mask, return_lse=return_lse)
    if use_triton(_backend(backend, force_reference), query, key, value):
        from .attention_stats import attention_with_received_stats_triton
        return attention_with_received_stats_triton(query, key, value, stats_impl=stats_impl, **kw)
    return attention_with_received_stats_reference(query, key, value, **kw)


def received_attention(query, key, *, stat_queries, key_valid=None, causal=True, scaling=None, per_head=False,
                       mask: StructuredMask | None = None, backend="auto", force_reference=False):
    scaling = default_scaling(query) if scaling is None else scaling
    kw = dict(stat_queries=stat_queries, key_valid=key_valid, causal=causal, scaling=scaling, per_head=per_head,
              mask=mask)
    if use_triton(_backend(backend, force_reference), query, key):
        from .attention_stats import received_attention_triton
        return received_attention_triton(query, key, **kw)
    return received_attention_reference(query, key, **kw)


def group_attention(query, key, value, *, key_group, spec: GroupSpec, key_valid=None, causal=True, scaling=None,
                    query_select=None, key_bias=None, backend="auto", force_reference=False):
    scaling = default_scaling(query) if scaling is None else scaling
    kw = dict(key_group=key_group, spec=spec, key_valid=key_valid, causal=causal, scaling=scaling,
              query_select=query_select, key_bias=key_bias)
    backend = _backend(backend, force_reference)
    if use_triton(backend, query, key, value):
        from .group_attention import group_attention_triton
        try:
            return group_attention_triton(query, key, value, **kw)
        except NotImplementedError as err:
            if backend == "triton":
                raise
            warnings.warn(f"group_attention: {err}; using the torch reference", stacklevel=2)
    return group_attention_reference(query, key, value, **kw)


def group_decode_attention(query, key, value, *, key_group, spec: GroupSpec, key_valid=None, scaling=None,
                           key_bias=None, backend="auto", force_reference=False):
    scaling = default_scaling(query) if scaling is None else scaling
    kw = dict(key_group=key_group, spec=spec, key_valid=key_valid, scaling=scaling, key_bias=key_bias)
    if use_triton(_backend(backend, force_reference), query, key, value):
        from .group_decode import group_decode_triton
        return group_decode_triton(query, key, value, **kw)
    return group_decode_reference(query, key, value, **kw)


def masked_decode_attention(query, key, value, *, key_valid=None, scaling=None, head_mean=False, backend="auto",
                            force_reference=False):
    scaling = default_scaling(query) if scaling is None else scaling
    kw = dict(key_valid=key_valid, scaling=scaling, head_mean=head_mean)
    if use_triton(_backend(backend, force_reference), query, key, value):
        from .split_decode import masked_decode_triton
        return masked_decode_triton(query, key, value, **kw)
    return masked_decode_reference(query, key, value, **kw)


def key_sets_step(attention, secondary, core, score, evicted, prompt_text, visual, keys, mask, step, *, length: int,
                  interval: int, text_rate: float, budgets=None, backend="auto", force_reference=False) -> None:
    from . import key_sets

    args = (attention, secondary, core, score, evicted, prompt_text, visual, keys, mask, step)
    if attention.shape[1] <= key_sets.MAX_KEYS and use_triton(_backend(backend, force_reference), attention):
        if text_rate and budgets is None:
            budgets = key_sets.text_budget(torch.arange(attention.shape[1] + 1, device=attention.device), text_rate)
        return key_sets.step_triton(*args, length=length, interval=interval, budgets=budgets if text_rate else None)
    return key_sets.step_reference(*args, length=length, interval=interval, text_rate=text_rate)


def ragged_decode_attention(query, cache: RaggedKVCache, *, scaling=None, out=None, backend="auto",
                            force_reference=False):
    scaling = default_scaling(query) if scaling is None else scaling
    if use_triton(_backend(backend, force_reference), query, cache.k_buf):
        from .ragged_decode import ragged_decode_attention_triton
        return ragged_decode_attention_triton(query, cache, scaling=scaling, out=out)
    res = ragged_decode_attention_reference(query, cache, scaling=scaling)
    if out is not None:
        out.copy_(res)
        return out
    return res
