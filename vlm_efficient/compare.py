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


class FirstTokenClock:
    """A logits processor that only notes when generate() first calls it: right after the prefill forward."""

    def __init__(self, device):
        self.device, self.at = device, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            synchronize(self.device)
            self.at = time.perf_counter()
        return scores


@dataclass
class GenerationTiming:
    prefill_ms: float  # time to first token: vision tower + prefill + first token
    decode_ms: float  # the rest of the same generate() calls
    new_tokens: int

    @property
    def total_ms(self) -> float:
        return self.prefill_ms + self.decode_ms

    @property
    def decode_tokens_per_s(self) -> float:
        if self.new_tokens < 2 or self.decode_ms <= 0:
            return float("nan")
        return (self.new_tokens - 1) / (self.decode_ms / 1e3)


def timed_generate(model, inputs, max_new_tokens: int, repeats: int = 3):
    """Greedy generate timed over `repeats` runs, after two untimed warm-up runs (allocator, kernel selection): the
    median time to the first token and the median time of the rest, both read within each run (two separate calls'
    medians could put the total under the first token's time)."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    first, rest = [], []
    with torch.inference_mode():
        for _ in range(2):
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        for _ in range(repeats):
            clock = FirstTokenClock(device)
            synchronize(device)
            start = time.perf_counter()
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    logits_processor=LogitsProcessorList([clock]))
            synchronize(device)
            end = time.perf_counter()
            first.append((clock.at - start) * 1e3)
            rest.append((end - clock.at) * 1e3)
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    return output, GenerationTiming(statistics.median(first), statistics.median(rest), new_tokens)


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
