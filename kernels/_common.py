"""Shared helpers: backend selection, small utilities. No Triton import at module level."""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "reference")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Decide whether the Triton kernel runs.

    auto: Triton on CUDA tensors when triton imports, the torch reference elsewhere.
    triton: always the kernel (on CPU tensors this needs TRITON_INTERPRET=1 set before triton is imported).
    reference: always the torch reference.
    The environment variable VLM_EFFICIENT_KERNELS=triton|reference replaces "auto" (debugging, smoke runs); "off"
    (the engine's switch: no kernel routing, vlm_efficient/kernel_plan.py) makes "auto" the reference here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = (os.environ.get("VLM_EFFICIENT_KERNELS", "auto") or "auto").strip().lower()
        backend = "reference" if backend == "off" else backend
        if backend not in BACKENDS:
            raise ValueError(f"VLM_EFFICIENT_KERNELS must be one of {BACKENDS} or off")
    if backend == "reference":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but triton is not importable")
        on_cuda = all(t.is_cuda for t in tensors if t is not None)
        if not on_cuda and not interpret_mode():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
        return True
    return triton_available() and all(t.is_cuda for t in tensors if t is not None)


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def block_d(head_dim: int) -> int:
    """Padded head dim used inside the kernels (power of two, >= 16). 80 -> 128 (masked lanes)."""
    return max(16, next_pow2(head_dim))


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("query/key/value must be [B, H, N, d]")
    batch, hq, nq, d = query.shape
    bk, hkv, nk, dk = key.shape
    if value.shape != key.shape or bk != batch or dk != d:
        raise ValueError(f"shape mismatch: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads is not a multiple of {hkv} key/value heads")
    if query.dtype != key.dtype or key.dtype != value.dtype:
        raise ValueError("query, key and value must share a dtype")
    return batch, hq, hkv, nq, nk, d


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def byte_flags(flags: torch.Tensor) -> torch.Tensor:
    """Per-token flags [B, N] (key padding, selected query rows) as the kernels read them: one byte per token, unit
    stride along the tokens, any batch stride (pass .stride(0)). A bool tensor is reinterpreted in place (no copy, no
    launch), e.g. the last row of the attention mask the engine hands over."""
    if flags.dim() != 2:
        raise ValueError(f"per-token flags must be [B, N], got {tuple(flags.shape)}")
    out = flags.view(torch.int8) if flags.dtype == torch.bool else flags.to(torch.int8)
    return out if out.stride(-1) == 1 else out.contiguous()


def repeat_kv(key: torch.Tensor, groups: int) -> torch.Tensor:
    return key if groups == 1 else key.repeat_interleave(groups, dim=1)
