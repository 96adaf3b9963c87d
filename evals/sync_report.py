"""Where a wrapped model makes the host wait for the GPU: every synchronizing CUDA call of one prefill + generate()
(torch.cuda.set_sync_debug_mode), counted by the package's innermost source line that led to it.

    python -m vlm_efficient.evals.sync_report --methods "pai;var:tau=2" [--model tiny:llava] [--new-tokens 4]

A sync drains the GPU queue: in the host-bound regime of batch-1 inference each one costs the queued GPU work."""

from __future__ import annotations

import argparse
import collections
import os
import traceback
import warnings

import torch

import vlm_efficient

PACKAGE_DIRS = tuple(os.sep + d + os.sep for d in ("vlm_efficient", "kernels", "heads", "token_ops", "evals"))


def sync_sites(model, inputs, new_tokens: int) -> collections.Counter:
    """{"file:line <- caller": count} of the synchronizing CUDA calls of one generate() (after a warm-up one)."""
    generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        model.generate(**inputs, **generate)
    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if any(d in f.filename for d in PACKAGE_DIRS) and "site-packages" not in f.filename
                  and not f.filename.endswith("sync_report.py")]  # fmt: skip
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[::-1][:2]) or "(outside)"
        sites[where] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            with torch.inference_mode():
                model.generate(**inputs, **generate)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sites


def main(argv=None) -> int:
    from .bench import _inputs
    from .runner import load_eval_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny:llava")
    ap.add_argument("--methods", required=True, help="';'-separated specs; the base is always reported first")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sync_report needs a CUDA GPU (torch.cuda.set_sync_debug_mode)")
    model, processor = load_eval_model(args.model, "cuda", torch.float32 if args.model.startswith("tiny") else
                                       torch.bfloat16)  # fmt: skip
    inputs = _inputs(processor, 336, args.batch_size, model)
    for spec in [""] + [s for s in args.methods.split(";") if s.strip()]:
        if spec:
            vlm_efficient.wrap(model, spec)
        try:
            sites = sync_sites(model, inputs, args.new_tokens)
        finally:
            if vlm_efficient.is_wrapped(model):
                vlm_efficient.unwrap(model)
        print(f"== {spec or 'base'}: {sum(sites.values())} synchronizing calls in one generate() of "
              f"{args.new_tokens} tokens")  # fmt: skip
        for where, count in sites.most_common(25):
            print(f"{count:6d}  {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
