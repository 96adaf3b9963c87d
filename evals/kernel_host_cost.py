"""The host side of the kernel entry points without a GPU: the Triton launches replaced by stubs that record them.

Two uses:
  * `wrapper_report()` (the benchmark's "wrapper" section, runs on CPU): microseconds of Python per call of each
    entry point, i.e. everything a call costs on the host except Triton's own launch and SDPA's dispatch (those two are
    in the GPU benchmark's host column). Tensors live on the meta device: allocations cost what the caching allocator's
    bookkeeping costs, nothing is computed.
  * `forbid_host_sync()` (tests): any .item() / .tolist() / bool() / int() / float() of a tensor raises, so a test can
    show that a call, once its per-layout caches are built, never waits for the device.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from ..kernels import attention_stats, group_attention, group_decode, key_sets, masked_attention, split_decode
from ..kernels.api import GroupSpec, MaskSpec, StructuredMask, TokenLayout

KERNEL_MODULES = (masked_attention, attention_stats, group_attention, group_decode, split_decode, key_sets)


class _StubKernel:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **meta) records (name, grid, args, meta) and computes
    nothing."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append((self.name, tuple(grid), args, meta))
        return launch


@contextlib.contextmanager
def stubbed_launches(stub_sdpa: bool = False):
    """Every Triton kernel of kernels 1-3, 5 and 6 (and kernel 3's decoding form) replaced by a stub; yields the launch
    log. stub_sdpa: SDPA returns an empty
    tensor of its output's shape (meta tensors, or when only the host side is of interest)."""
    log: list = []
    saved = []
    for module in KERNEL_MODULES:
        for name, value in vars(module).items():
            # a JITFunction, or the interpreter's stand-in for one under TRITON_INTERPRET=1
            if name.endswith("_kernel") and type(value).__module__.startswith("triton."):
                saved.append((module, name, value))
                setattr(module, name, _StubKernel(name, log))
    sdpa = F.scaled_dot_product_attention
    if stub_sdpa:
        F.scaled_dot_product_attention = lambda query, key, value, **kw: torch.empty(  # noqa: E731
            (*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device)
    try:
        yield log
    finally:
        F.scaled_dot_product_attention = sdpa
        for module, name, value in saved:
            setattr(module, name, value)


SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def forbid_host_sync():
    """Reading a tensor's value on the host (what waits for a CUDA stream) raises inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name}() called in a kernel entry point")
        return method

    for name in SYNCING:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _layout(n_text_before: int, n_image: int, n_text_after: int, grid_width: int) -> TokenLayout:
    n = n_text_before + n_image + n_text_after
    is_image = torch.zeros(1, n, dtype=torch.bool)
    is_image[0, n_text_before:n_text_before + n_image] = True
    return TokenLayout.from_modality(is_image, grid_width=grid_width)


def entry_point_calls(n: int, *, device="cpu", heads: int = 32, head_dim: int = 128, dtype=torch.bfloat16,
                      naavit: StructuredMask | None = None) -> dict:
    """{name: zero-argument call} of each kernel entry point on one prompt of n tokens (35 text, image, 40 text), the
    way a model's layer calls it (per-layout inputs built before: masks, key groups, selected rows)."""
    from ..kernels.attention_stats import attention_with_received_stats_triton, received_attention_triton
    from ..kernels.group_attention import group_attention_triton
    from ..kernels.group_decode import group_decode_triton
    from ..kernels.masked_attention import flash_attention_triton, masked_attention_triton
    from ..kernels.split_decode import masked_decode_triton

    naavit = naavit or prompt_mask(n)
    layout = naavit.layout
    q, k, v = (torch.empty(1, heads, n, head_dim, dtype=dtype, device=device) for _ in range(3))
    scaling = head_dim ** -0.5
    last = torch.tensor([[n - 1]], device=device)
    groups = layout.is_image.long().to(device)
    layout_visual = layout.is_image.to(device)  # meta: the group kernel's per-key tables are shapes only
    last_row = torch.zeros(1, n, dtype=torch.bool, device=device)
    last_row[0, -1] = True
    if str(device) == "meta":  # meta tensors hold no values to list the selected rows from: file the list (row n-1)
        import weakref
        rows = group_attention._ROW_LISTS
        rows[id(last_row)] = (weakref.ref(last_row), last_row._version,
                              torch.empty(1, 1, dtype=torch.int32, device=device))
    key_valid = torch.ones(1, n, dtype=torch.bool, device=device)
    groups32 = groups.to(torch.int32)  # the step keeps its key groups as int32 buffers
    secondary, core, evicted, prompt_text, avl_mask = (torch.zeros(1, n, dtype=torch.bool, device=device)
                                                       for _ in range(5))  # fmt: skip
    attention, score = torch.zeros(1, n, device=device), torch.zeros(1, n, device=device)
    positions, step = torch.zeros(1, n, dtype=torch.long, device=device), torch.ones(1, dtype=torch.long, device=device)
    budgets = torch.zeros(n + 1, dtype=torch.long, device=device)
    pai = GroupSpec(heads, 2, logit_abs=[0.0, 0.5])  # PAI's tables (heads/pai.py): image keys a + 0.5|a|
    vaf = GroupSpec(heads, 2, logit_scale=[0.95, 1.15])  # VAF's (heads/vaf.py): text x0.95, image x1.15
    return {
        "K1 causal": lambda: flash_attention_triton(q, k, v, scaling=scaling),
        "K1 NAAViT": lambda: masked_attention_triton(q, k, v, mask=naavit, scaling=scaling),
        "K2 FastV (SDPA + rows pass)": lambda: attention_with_received_stats_triton(
            q, k, v, scaling=scaling, stat_queries=last),
        "K2 rows pass alone": lambda: received_attention_triton(q, k, stat_queries=last, scaling=scaling),
        "K3 PAI last row (SDPA + rows pass)": lambda: group_attention_triton(
            q, k, v, key_group=groups, spec=pai, scaling=scaling, query_select=last_row),
        "K3 VAF all rows": lambda: group_attention_triton(q, k, v, key_group=groups, spec=vaf, scaling=scaling),
        # a decoding step's calls: one row per sample over a static buffer of n slots and its key mask
        "K5 masked decode": lambda: masked_decode_triton(q[:, :, -1:], k, v, key_valid=key_valid, scaling=scaling),
        "K3 decoding form (PAI)": lambda: group_decode_triton(q[:, :, -1:], k, v, key_group=groups32, spec=pai,
                                                              key_valid=key_valid, scaling=scaling),
        # A-VL's decoding step: kernel 5 with the head-averaged probabilities, then its key-set update
        "K5 masked decode, head mean": lambda: masked_decode_triton(q[:, :, -1:], k, v, key_valid=key_valid,
                                                                    scaling=scaling, head_mean=True),
        "K6 A-VL key sets": lambda: key_sets.step_triton(attention, secondary, core, score, evicted, prompt_text,
                                                         layout_visual, positions, avl_mask, step, length=n,
                                                         interval=3, budgets=budgets),
    }


def prompt_mask(n: int, spec: MaskSpec | None = None) -> StructuredMask:
    """A one-sample prompt of n tokens: 35 text, n - 75 image (grid 24 wide up to 2,880 image tokens, else 64), 40
    text."""
    n_image = n - 75
    return StructuredMask(_layout(35, n_image, 40, 24 if n_image <= 2880 else 64), spec or MaskSpec.naavit())


def _meta_ready(n: int, heads: int, head_dim: int):
    """entry_point_calls on meta tensors, the mask's per-layout caches (block lists, packed tokens) built on the CPU
    and filed under the meta device, whose tensors hold no values to build them from."""
    from ..kernels.masked_attention import _pick_config, mask_args

    mask = prompt_mask(n)
    bm, bn, _, _ = _pick_config(head_dim, n, torch.device("meta"), "lists")
    mask._lists[(bm, bn, n, "meta")] = mask.block_lists(bm, bn, n, "cpu")
    mask._packed["meta"] = mask.packed("cpu")
    mask_args(mask, "meta")
    return entry_point_calls(n, device="meta", heads=heads, head_dim=head_dim, naavit=mask)


def wrapper_report(sizes=(651, 2955, 8267), heads: int = 32, head_dim: int = 128, calls: int = 200) -> list[dict]:
    """[{kernel, n, wrapper_us, launches}]: the best of 5 rounds of the mean Python time per call (the best: the CPU is
    shared, and interference only adds), every Triton launch and SDPA stubbed (meta tensors). The GPU benchmark's
    host column adds Triton's launch and SDPA's dispatch."""
    rows = []
    with stubbed_launches(stub_sdpa=True) as log:
        for n in sizes:
            for name, call in _meta_ready(n, heads, head_dim).items():
                call()  # per-layout caches (key tables, plans)
                log.clear()
                call()
                launches = [entry[0] for entry in log]
                rows.append(dict(kernel=name, n=n, wrapper_us=best_us_per_call(call, calls), launches=launches))
    return rows


def best_us_per_call(call, calls: int, rounds: int = 5, sync=lambda: None) -> float:
    """Host microseconds per call of `call`: the best of `rounds` rounds of `calls` back-to-back calls (the best: the
    CPU is shared, and interference only adds); `sync()` after each round (a GPU's queue drained outside the timing)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        sync()
    return best
