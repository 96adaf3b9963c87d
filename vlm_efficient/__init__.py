"""vlm-efficient: inference-time visual-token and attention-head interventions for Hugging Face VLMs.

    model = vlm_efficient.wrap(model, "fastv:layer=2,ratio=0.5")
    out = model.generate(**inputs)
    vlm_efficient.stats(model)   # tokens per layer, KV bytes, FLOPs of the last call
    vlm_efficient.unwrap(model)  # hooks gone, attention implementation restored
"""

from __future__ import annotations

import dataclasses
import weakref

from torch import nn

from .adapters import ADAPTERS, get_adapter
from .engine import WRAPPED, Engine
from .fast_path import FastPath
from .method import AttentionRequest, Method
from .registry import METHODS, parse_methods, to_spec
from .stats import RunStats, compute_stats

# the shipped methods register themselves on import (registry.register_method); after the core, which they import
from . import shipped_methods  # noqa: F401

__all__ = [
    "ADAPTERS",
    "METHODS",
    "AttentionRequest",
    "Method",
    "RunStats",
    "get_adapter",
    "is_wrapped",
    "logits_processors",
    "parse_methods",
    "stats",
    "to_spec",
    "unwrap",
    "wrap",
]

def wrap(model: nn.Module, methods="", fast: bool | str = False) -> nn.Module:
    """Apply `methods` (a Method, a list of them, or a spec string like "fastv:layer=2,ratio=0.5") to `model` in
    place and return it. Wrapping an already wrapped model is an error: call `unwrap(model)` first.
    `fast=True`: model.generate decodes on static buffers, in a CUDA graph on CUDA (vlm_efficient/fast_path.py);
    with no methods it is the unwrapped model on the same path. `fast="compile"`: the same, with the decoding step
    compiled by torch.compile before its capture (fused kernels; the first call with new buffer sizes compiles).
    Methods that also score tokens (PAI with `contrastive`) get their logits processors added by model.generate."""
    if fast not in (False, True, "compile"):
        raise ValueError(f"wrap(..., fast={fast!r}): fast takes False, True or 'compile'")
    if model in WRAPPED:
        raise RuntimeError(
            f"model is already wrapped with {to_spec(WRAPPED[model].methods)!r}; call vlm_efficient.unwrap(model) "
            "before wrapping it again"
        )
    engine = Engine(model, parse_methods(methods))
    if fast and engine.shards is not None:
        engine.uninstall_handles()  # hooks the methods' bind() added
        raise ValueError("wrap(..., fast=True): the fast path's CUDA graphs do not run under tensor parallelism "
                         "(tp_plan); wrap without fast=True")
    engine.install()
    if fast:
        try:
            engine.fast_path = FastPath(engine, compiled=fast == "compile")
        except Exception:
            engine.uninstall()
            raise
    engine.logits_processors = [p for method in engine.methods for p in method.logits_processors(model)]
    if engine.logits_processors:
        model.generate = _GenerateWithProcessors(model.generate, engine.logits_processors)
    WRAPPED[model] = engine
    model.__deepcopy__ = _CopyWrapped(model)  # copy.deepcopy looks the copier up on the instance
    return model


class _GenerateWithProcessors:
    """model.generate of a model whose methods score tokens too (Method.logits_processors): the methods' processors,
    then the call's own `logits_processor`, on top of the model's generate (the fast path's where it has one)."""

    def __init__(self, generate, processors: list):
        self.generate, self.processors = generate, processors

    def __call__(self, *args, **kwargs):
        from transformers import LogitsProcessorList

        own = kwargs.pop("logits_processor", None) or []
        return self.generate(*args, logits_processor=LogitsProcessorList([*self.processors, *own]), **kwargs)


def logits_processors(model: nn.Module) -> list:
    """The logits processors the wrapped methods add to generate() (PAI's contrastive term with `contrastive` > 0);
    the wrapped model's generate() already applies them: pass them only to a decoding loop of your own."""
    return list(engine_of(model).logits_processors)


class _CopyWrapped:
    """copy.deepcopy of a wrapped model: an independent copy wrapped with new instances of the same methods (its own
    engine, hooks and state)."""

    def __init__(self, model: nn.Module):
        self.model = weakref.ref(model)

    def __call__(self, memo: dict) -> nn.Module:
        model = self.model()
        engine = engine_of(model)
        memo[id(self)] = None  # the copy's own copier is set by wrap()
        fast = engine.fast_path is not None and ("compile" if engine.fast_path.compiled else True)
        if "generate" in vars(model):  # the fast path's (its graphs, buffers) or the methods' processors: the copy
            memo[id(vars(model)["generate"])] = None  # gets its own from wrap()
        copied = engine.copy_unwrapped(memo)
        copied.__dict__.pop("__deepcopy__", None)
        copied.__dict__.pop("generate", None)
        return wrap(copied, [dataclasses.replace(method) for method in engine._methods], fast=fast)


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every hook and restore the original attention implementation."""
    engine = WRAPPED.pop(model, None)
    if engine is None:
        raise RuntimeError("model is not wrapped by vlm_efficient")
    if engine.fast_path is not None:
        engine.fast_path.uninstall()
    engine.uninstall()
    model.__dict__.pop("__deepcopy__", None)
    if isinstance(vars(model).get("generate"), _GenerateWithProcessors):  # (the fast path's went with it)
        del model.generate
    return model


def is_wrapped(model: nn.Module) -> bool:
    return model in WRAPPED


def engine_of(model: nn.Module) -> Engine:
    if model not in WRAPPED:
        raise RuntimeError("model is not wrapped by vlm_efficient: call vlm_efficient.wrap(model, ...) first")
    return WRAPPED[model]


def stats(model: nn.Module) -> RunStats:
    """Tokens per layer, KV-cache bytes and estimated FLOPs of the last forward/generate of a wrapped model made by the
    calling thread (concurrent calls each have their own; a thread that made none gets the latest call of any)."""
    return compute_stats(engine_of(model))
