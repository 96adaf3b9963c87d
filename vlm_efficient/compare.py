"""`vlm-efficient compare`: one image and question through the model with and without methods."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from . import stats, unwrap, wrap
from .models import build_inputs


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it times that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GenerationTiming:
    prefill_ms: float  # time to first token: vision tower + prefill + first token
    total_ms: float
    new_tokens: int

    @property
    def decode_tokens_per_s(self) -> float:
        decode_s = (self.total_ms - self.prefill_ms) / 1e3
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else float("nan")


def timed_generate(model, inputs, max_new_tokens: int, repeats: int = 3):
    """Greedy generate timed as median time-to-first-token and median total time over `repeats` runs, after one
    untimed warm-up runs (allocator, kernel selection)."""
    device = next(model.parameters()).device
    first, total = [], []
    with torch.inference_mode():
        for _ in range(2):
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            synchronize(device)
            first.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            synchronize(device)
            total.append((time.perf_counter() - start) * 1e3)
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    return output, GenerationTiming(statistics.median(first), statistics.median(total), new_tokens)


def compare(model, processor, image, question: str, methods: list[str], *, max_new_tokens: int = 32,
            repeats: int = 3):
    """Run the base model and the model wrapped with each spec of `methods`; returns a JSON-ready dict whose
    "runs" are the base run first, then one per spec, each with its speed-up and FLOPs against the base."""
    parameter = next(model.parameters())
    inputs = build_inputs(processor, image, question, parameter.device, parameter.dtype)
    runs = []
    for spec in ["", *methods]:
        wrap(model, spec)
        try:
            output, timing = timed_generate(model, inputs, max_new_tokens, repeats)
            run_stats = stats(model)
        finally:
            unwrap(model)
        answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        runs.append({
            "methods": spec or "base",
            "answer": answer.strip(),
            "prefill_ms": timing.prefill_ms,
            "total_ms": timing.total_ms,
            "new_tokens": timing.new_tokens,
            "decode_tokens_per_s": timing.decode_tokens_per_s,
            "stats": run_stats.to_dict(),
        })
    base = runs[0]
    for run in runs:
        run["prefill_speedup"] = base["prefill_ms"] / run["prefill_ms"]
        run["flops_ratio"] = run["stats"]["prefill_flops"]["total"] / base["stats"]["prefill_flops"]["total"]
    return {"question": question, "runs": runs}


def format_compare(results: dict) -> str:
    lines = [f"question: {results['question']!r}"]
    if results.get("expected_answer") is not None:
        lines.append(f"expected answer: {results['expected_answer']!r}")
    for run in results["runs"]:
        s = run["stats"]
        lines += [
            f"[{run['methods']}]",
            f"  answer: {run['answer']!r}",
            f"  tokens per layer: {' '.join(f'{t:g}' for t in s['tokens_per_layer'])} (avg {s['average_tokens']:.1f})",
            f"  visual tokens per layer: {' '.join(f'{t:g}' for t in s['visual_tokens_per_layer'])}",
            f"  KV cache: {s['kv_cache_bytes'] / 2**20:.2f} MiB; prefill FLOPs: {s['prefill_flops']['total'] / 1e9:.3f} G "
            f"({run['flops_ratio']:.0%} of base)",
            f"  time to first token: {run['prefill_ms']:.1f} ms ({run['prefill_speedup']:.2f}x base); total: "
            f"{run['total_ms']:.1f} ms for {run['new_tokens']} tokens; decode: {run['decode_tokens_per_s']:.1f} tokens/s",
        ]
    return "\n".join(lines)
