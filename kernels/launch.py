"""Bound launches: `launch(kernel, grid, *args, **meta)` is `kernel[grid](*args, **meta)` without Triton's per-call
argument binding once a specialization has launched.

Triton's `JITFunction.run` binds every argument, builds a string cache key from all of them and looks the compiled
kernel up on each call: tens of microseconds for our kernels' 40-60 arguments, more than the GPU time of an attention
call at LLaVA-1.5's 651 tokens. Here the first call of each specialization goes through Triton, which compiles and
launches; its compiled kernel is then kept under a key that determines Triton's specialization (each tensor's dtype
and 16-byte alignment, each integer's divisibility by 16, equality to 1 and width, every constexpr and launch option,
the current device), and later calls with that key hand their arguments straight to the compiled kernel's launcher.

The key is at least as fine as Triton's own, so a bound call runs the kernel Triton would have picked; a kernel whose
positional arguments include a constexpr is never bound. Skipped on a bound call: Triton's check that the globals a
kernel reads have not changed since it was compiled (ours read none). Where Triton's launch hooks are set (a profiler
such as proton; Triton 3.6 always keeps a hook chain there, which counts when it is not empty), and under the
interpreter (TRITON_INTERPRET=1), every call goes through Triton."""

from __future__ import annotations

import contextlib

import torch

_INT32 = 2**31
_INT64 = 2**63
_TENSOR = torch.Tensor


def _arg_key(arg):
    """What Triton specializes a runtime argument on."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return bool, arg
    if isinstance(arg, int):  # (as the inlined key in launch()) one, multiple of 16, 32-bit, below unsigned 64-bit
        return arg == 1, arg % 16 == 0, -_INT32 <= arg < _INT32, arg < _INT64
    if arg is None or isinstance(arg, (float, str)):
        return type(arg)
    raise TypeError(f"launch: no specialization key for an argument of type {type(arg).__name__}")


class _Bound:
    """One specialization's compiled kernel and the arguments that follow the positional ones (constexprs, defaults:
    fixed by the key)."""

    __slots__ = ("compiled", "tail")

    def __init__(self, compiled, tail: tuple):
        self.compiled, self.tail = compiled, tail


_BOUND: dict = {}
_ENABLED = [True]  # binding(False) sends every call through Triton (benchmarks compare the two)
_HOOKS = None  # triton.knobs.runtime, once triton is imported by a launch
_DEVICE_AND_STREAM = None


def _runtime():
    global _HOOKS, _DEVICE_AND_STREAM
    from triton import knobs
    from triton.runtime.driver import driver

    _HOOKS = knobs.runtime
    active = driver.active
    _DEVICE_AND_STREAM = (active.get_current_device, active.get_current_stream)


def _hooked(hook) -> bool:
    """A launch hook is set: a function, or (Triton >= 3.6) a non-empty HookChain (an empty one is always there)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _tail(kernel, n_positional: int, meta: dict) -> tuple:
    """The kernel's arguments after the positional ones, in signature order, as Triton's binder fills them in (the
    launcher takes every argument, constexprs included)."""
    bound = kernel.signature.bind_partial(**{k: v for k, v in meta.items() if k in kernel.signature.parameters})
    bound.apply_defaults()
    names = list(kernel.signature.parameters)[n_positional:]
    return tuple(bound.arguments[name] for name in names)


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta): runtime arguments positional, constexprs and launch options (num_warps,
    num_stages) by keyword."""
    if not _ENABLED[0] or not hasattr(kernel, "device_caches"):  # the interpreter's kernels have no device caches
        return kernel[grid](*args, **meta)
    if _HOOKS is None:
        _runtime()
    if _hooked(_HOOKS.launch_enter_hook) or _hooked(_HOOKS.launch_exit_hook):
        return kernel[grid](*args, **meta)
    current_device, current_stream = _DEVICE_AND_STREAM
    device = current_device()
    # _arg_key inlined for the two common types (half the cost of a call per argument)
    key = (id(kernel), device, tuple(meta.items()), tuple([
        (a.dtype, a.data_ptr() % 16 == 0) if type(a) is _TENSOR
        else (a == 1, a % 16 == 0, -_INT32 <= a < _INT32, a < _INT64) if type(a) is int else _arg_key(a) for a in args]))
    bound = _BOUND.get(key)
    if bound is None:
        compiled = kernel[grid](*args, **meta)
        # bound: a launched kernel (not an asynchronous compile's future) none of whose positional arguments is a
        # constexpr (Triton compiles one per value, which the key's integer classes do not tell apart)
        if (getattr(compiled, "run", None) is not None
                and not any(param.is_constexpr for param in getattr(kernel, "params", ())[:len(args)])):
            _BOUND[key] = _Bound(compiled, _tail(kernel, len(args), meta))
        return compiled
    compiled = bound.compiled
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], grid_1, grid_2, current_stream(device), compiled.function, compiled.packed_metadata, None,
                 None, None, *args, *bound.tail)
    return compiled


@contextlib.contextmanager
def binding(enabled: bool):
    """Within the block, launches are bound (the default) or all go through Triton's own launch."""
    saved, _ENABLED[0] = _ENABLED[0], enabled
    try:
        yield
    finally:
        _ENABLED[0] = saved

