"""Where a wrapped model makes the host wait for the device: the synchronizing calls of one generate(), counted per
phase (the prefill forward, the decoding steps) by the package's innermost source line that led to them.

    python -m vlm_efficient.evals.sync_report --methods "pai;var:tau=2" [--model tiny:llava] [--new-tokens 4]

On CUDA the calls are the ones torch reports (torch.cuda.set_sync_debug_mode). On CPU nothing waits, so the report
counts the calls that WOULD wait on a GPU: the reads of a tensor's values by the host (bool(), item(), tolist(),
int(), nonzero, boolean-mask indexing, ...), through a TorchFunctionMode; run it with VLM_EFFICIENT_KERNELS=reference
to take the GPU's kernel routes. A sync drains the GPU queue: in the host-bound regime of batch-1 inference and of
every decoding step each one costs the queued GPU work."""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import traceback
import warnings

import torch
from torch.overrides import TorchFunctionMode

import vlm_efficient

PACKAGE_DIRS = tuple(os.sep + d + os.sep for d in ("vlm_efficient", "kernels", "heads", "token_ops", "evals"))
PHASES = ("prefill", "decode")

# functions that always read device values on the host
_READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
          torch.Tensor.__index__, torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select,
          torch.unique, torch.Tensor.unique, torch.unique_consecutive, torch.argwhere}  # fmt: skip
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _has_bool_tensor(index) -> bool:
    if isinstance(index, (tuple, list)):
        return any(_has_bool_tensor(part) for part in index)
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool and index.dim() > 0


def reads_host(func, args, kwargs) -> bool:
    """Whether this torch call makes the host read device values (on a GPU: waits for the queue)."""
    if func in _READS:
        return True
    if func in _INDEXING:  # a boolean mask index needs the count of its True entries
        return len(args) > 1 and _has_bool_tensor(args[1])
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):  # tensor repeats without output_size
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if func is torch.where:  # the one-argument form is nonzero
        return len(args) + len(kwargs) == 1
    return False


class _HostReads(TorchFunctionMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if reads_host(func, args, kwargs):
            self.record()
        return func(*args, **kwargs)


def _site() -> str:
    frames = [f for f in traceback.extract_stack()[:-2]
              if any(d in f.filename for d in PACKAGE_DIRS) and "site-packages" not in f.filename
              and not f.filename.endswith("sync_report.py")]  # fmt: skip
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[::-1][:2]) or "(outside)"


def sync_sites(model, inputs, new_tokens: int, cuda: bool | None = None) -> dict[str, collections.Counter]:
    """{phase: {"file:line <- caller": count}} of the synchronizing calls (`cuda`, default: on a CUDA model) or host
    reads (else) of one generate() (after a warm-up one); phase "prefill" is the first forward of the generate(),
    "decode" every later one."""
    generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        model.generate(**inputs, **generate)
    sites = {phase: collections.Counter() for phase in PHASES}
    calls = [0]

    def record(*_):
        sites[PHASES[calls[0] > 1]][_site()] += 1

    def count_call(*_):
        calls[0] += 1

    handle = model.register_forward_pre_hook(count_call)
    if cuda is None:
        cuda = next(model.parameters()).device.type == "cuda"
    try:
        with contextlib.ExitStack() as stack:
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
                stack.callback(torch.cuda.set_sync_debug_mode, 0)
                stack.enter_context(warnings.catch_warnings())  # restores showwarning and the filters on exit
                warnings.simplefilter("always")
                warnings.showwarning = record
            else:
                stack.enter_context(_HostReads(record))
            with torch.inference_mode():
                model.generate(**inputs, **generate)
    finally:
        handle.remove()
    return sites


def main(argv=None) -> int:
    from .runner import describe_inputs, load_eval_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny:llava")
    ap.add_argument("--methods", required=True, help="';'-separated specs; the base is always reported first")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    model, processor = load_eval_model(args.model, args.device, torch.bfloat16 if cuda and not args.model.startswith(
        "tiny") else torch.float32)  # fmt: skip
    inputs = describe_inputs(processor, 336, args.batch_size, model)
    what = "synchronizing calls" if cuda else "host reads of device values"
    for spec in [""] + [s for s in args.methods.split(";") if s.strip()]:
        if spec:
            vlm_efficient.wrap(model, spec)
        try:
            sites = sync_sites(model, inputs, args.new_tokens)
        finally:
            if vlm_efficient.is_wrapped(model):
                vlm_efficient.unwrap(model)
        total = {phase: sum(counter.values()) for phase, counter in sites.items()}
        print(f"== {spec or 'base'}: {what} in one generate() of {args.new_tokens} tokens: prefill {total['prefill']}, "
              f"decode {total['decode']} ({args.new_tokens - 1} steps)")  # fmt: skip
        for phase, counter in sites.items():
            for where, count in counter.most_common(25):
                print(f"{count:6d}  {phase:8s} {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
