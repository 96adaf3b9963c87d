"""`vlm-efficient bench`: speed and memory of a model with and without methods, in one process, on CPU or GPU.

Per method spec ("" = the base: the unwrapped model, SDPA): prefill ms (one forward over the prompt,
vision tower included), time to first token (generate() until its first logits), decode tokens/s, peak memory,
KV-cache bytes and FLOPs (from vlm_efficient.stats), and their ratios to the base measured in the same run.
Medians over `repeats` timed runs after a warm-up. The model is a real checkpoint (a directory, a hub id,
`testbed`, `tiny:<family>`) or a random-weight architecture of archs.ARCHS. Peak memory is CUDA's maximum
allocated per method on GPU; on CPU it is the process's peak RSS, which never goes down (compare on GPU).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

import vlm_efficient

from .runner import _FirstTokenClock, _peak_memory, _sync, batch_inputs


def _inputs(processor, image_size: int, batch_size: int, model):
    from vlm_efficient.models import build_prompt
    from vlm_efficient.testing import tiny_image

    prompt = build_prompt(processor, "Please describe this image in detail.")
    images = [[tiny_image(i, size=(image_size, image_size))] for i in range(batch_size)]
    return batch_inputs(processor, [prompt] * batch_size, images, model)


def _measure(model, inputs, max_new_tokens: int, repeats: int) -> dict:
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    batch, n_in = inputs["input_ids"].shape
    generate = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    prefill, first, decode = [], [], []
    with torch.inference_mode():
        model(**inputs, logits_to_keep=1)  # warm-up (allocator, kernel choice, first-call work)
        model.generate(**inputs, **{**generate, "max_new_tokens": 2, "min_new_tokens": 2})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            _sync(device)
            prefill.append(1e3 * (time.perf_counter() - start))
            clock = _FirstTokenClock(device)
            start = time.perf_counter()
            out = model.generate(**inputs, **generate, logits_processor=LogitsProcessorList([clock]))
            _sync(device)
            end = time.perf_counter()
            steps = out.shape[1] - n_in
            first.append(1e3 * (clock.at - start))
            decode.append(batch * (steps - 1) / (end - clock.at) if steps > 1 else float("nan"))
    return {
        "prefill_ms": statistics.median(prefill),
        "ttft_ms": statistics.median(first),
        "decode_tokens_per_s": statistics.median(decode),
        "peak_memory_bytes": _peak_memory(device),
    }


def _stats(model) -> dict:
    s = vlm_efficient.stats(model)
    return {
        "kv_cache_bytes": s.kv_cache_bytes,
        "prefill_flops": s.prefill_flops["total"],
        "decode_flops": s.decode_flops["total"],
        "visual_tokens": statistics.fmean(s.visual_tokens),
        "visual_tokens_kept": s.visual_tokens_per_layer[-1],
        "tokens_avg": s.average_tokens,
        "prompt_tokens": statistics.fmean(s.prompt_tokens),
    }


def measure(model, inputs, spec: str, max_new_tokens: int, repeats: int) -> dict:
    """Timings (medians) and engine statistics of `model` wrapped in `spec` on `inputs`. The base ("") is timed
    unwrapped (plain SDPA); its token counts, KV bytes and FLOPs come from one more generate() under a no-op wrap,
    which changes nothing in the computation."""
    timed = _measure(model, inputs, max_new_tokens, repeats) if not spec else None
    vlm_efficient.wrap(model, spec)
    try:
        timed = timed or _measure(model, inputs, max_new_tokens, repeats)
        if not spec:
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                               do_sample=False)  # fmt: skip
        return {**timed, **_stats(model)}
    finally:
        vlm_efficient.unwrap(model)


RATIOS = {  # name -> (measure, base / method when True: a speed-up; method / base otherwise)
    "prefill_speedup": ("prefill_ms", True),
    "ttft_speedup": ("ttft_ms", True),
    "decode_speedup": ("decode_tokens_per_s", False),
    "kv_ratio": ("kv_cache_bytes", False),
    "flops_ratio": ("prefill_flops", False),
    "memory_ratio": ("peak_memory_bytes", False),
}


def add_ratios(run: dict, base: dict) -> None:
    """Add to `run` its RATIOS to the base's measures."""
    for name, (key, inverse) in RATIOS.items():
        a, b = (base[key], run[key]) if inverse else (run[key], base[key])
        run[name] = a / b if b else float("nan")


def bench(model_name: str, specs: list[str], *, device="cpu", dtype=torch.float32, layers=None, batch_size=1,
          image_size=None, max_new_tokens=32, repeats=3, output=None) -> dict:  # fmt: skip
    """Measure each spec (the first should be "", the base) on `model_name`; write bench.json / .md / .png to
    `output` when given."""
    from vlm_efficient import parse_methods

    from .archs import ARCHS, DEFAULT_IMAGE_SIZE, build_arch
    from .runner import load_eval_model

    for spec in specs:
        parse_methods(spec)  # a bad spec fails before the model is built
    if repeats < 1 or max_new_tokens < 2 or batch_size < 1:
        raise ValueError("--repeats and --batch-size must be >= 1 and --max-new-tokens >= 2")
    torch.manual_seed(0)
    if model_name in ARCHS:
        model, processor = build_arch(model_name, device, dtype, layers)
    elif layers is not None:
        raise ValueError(f"--layers applies to the random architectures ({', '.join(ARCHS)}), not to {model_name!r}")
    else:
        model, processor = load_eval_model(model_name, device, dtype)
    size = image_size or DEFAULT_IMAGE_SIZE.get(model_name, 336)
    inputs = _inputs(processor, size, batch_size, model)
    with torch.inference_mode():  # the first spec (the base) would otherwise pay for clocks and allocator warm-up
        model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    runs = {spec or "base": measure(model, inputs, spec, max_new_tokens, repeats) for spec in specs}
    base = runs[specs[0] or "base"]
    for run in runs.values():
        add_ratios(run, base)
    result = {"model": model_name, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "layers": layers,
              "batch_size": batch_size, "image_size": size, "max_new_tokens": max_new_tokens, "repeats": repeats,
              "parameters": sum(p.numel() for p in model.parameters()), "runs": runs}  # fmt: skip
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2))
        (out / "bench.md").write_text(format_bench(result) + "\n")
        plot_bench(result, out / "bench.png")
    return result


def format_bench(result: dict) -> str:
    """A markdown table, one row per method."""
    head = (f"{result['model']} on {result['device']} ({result['dtype']}, batch {result['batch_size']}, "
            f"image {result['image_size']} px, {result['max_new_tokens']} new tokens"
            f"{', ' + str(result['layers']) + ' layers' if result['layers'] else ''})")  # fmt: skip
    lines = [head, "",
             "| methods | visual tokens kept | prefill ms | TTFT ms | decode tok/s | peak MiB | KV MiB | prefill GFLOPs "
             "| prefill speed-up | decode speed-up | KV ratio | FLOPs ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in result["runs"].items():
        lines.append(
            f"| {name} | {r['visual_tokens_kept']:.0f} / {r['visual_tokens']:.0f} | {r['prefill_ms']:.1f} | "
            f"{r['ttft_ms']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['peak_memory_bytes'] / 2**20:.0f} | "
            f"{r['kv_cache_bytes'] / 2**20:.1f} | {r['prefill_flops'] / 1e9:.1f} | {r['prefill_speedup']:.2f}x | "
            f"{r['decode_speedup']:.2f}x | {r['kv_ratio']:.2f} | {r['flops_ratio']:.2f} |"
        )
    return "\n".join(lines)


def plot_bench(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["runs"])
    panels = [("prefill_ms", "prefill (ms)"), ("ttft_ms", "time to first token (ms)"),
              ("decode_tokens_per_s", "decode (tokens/s)"), ("kv_cache_bytes", "KV cache (MiB)"),
              ("prefill_flops", "prefill (GFLOPs)"), ("peak_memory_bytes", "peak memory (MiB)")]  # fmt: skip
    scale = {"kv_cache_bytes": 2**20, "peak_memory_bytes": 2**20, "prefill_flops": 1e9}
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, label) in zip(axes.flat, panels):
        ax.bar(range(len(names)), [result["runs"][n][key] / scale.get(key, 1) for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"{result['model']} on {result['device']}, batch {result['batch_size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
