"""One markdown table from several `vlm-efficient bench` runs (evals/gpu_bench.sh): per model and method set, each
method's prefill and per-token decode time with the kernels routed and without, against the unwrapped base of the
same run, and the share of the FLOP-allowed prefill speed-up that the measured one reaches.

    python -m vlm_efficient.evals.bench_summary DIR      # DIR/<model>_<set>_<kernels>/bench.json -> markdown on stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .bench import PROFILE_TOKENS, format_profile


def load_runs(root) -> dict:
    """{(model, set): {kernels: bench result}} from root/<model>_<set>_<kernels>/bench.json."""
    groups: dict = {}
    for path in sorted(Path(root).glob("*/bench.json")):
        model, group, kernels = path.parent.name.rsplit("_", 2)
        groups.setdefault((model, group), {})[kernels] = json.loads(path.read_text())
    return groups


def _cell(result, name, fmt, vision) -> str:
    run = result["runs"].get(name)
    return fmt(run, result["runs"]["base"], vision) if run else "-"


def _ratio(run, key, fmt, scale=1.0) -> str:
    return fmt.format(run[key] * scale) if run.get(key) is not None else "n/a"


def vision_flops_of(result) -> float | None:
    """The run's vision-tower FLOPs: recorded by bench() since run 7, counted on the meta device for older runs of
    the random architectures, None otherwise."""
    from .archs import ARCHS
    from .bench import arch_vision_flops

    if result.get("vision_flops") is not None:
        return result["vision_flops"]
    if result["model"] in ARCHS:
        return arch_vision_flops(result["model"], result["batch_size"], result["image_size"])
    return None


def summary(root) -> str:
    def ms_per_token(run):
        return 1e3 / run["decode_tokens_per_s"]

    def prefill_ratio(run, base, vision):  # FLOPs of the whole prefill: vision tower + projector + decoder layers
        return (run["prefill_flops"] + vision) / (base["prefill_flops"] + vision)

    columns = {
        "prefill ms": lambda r, b, v: f"{r['prefill_ms']:.1f}",
        "prefill speed-up": lambda r, b, v: f"{r['prefill_speedup']:.2f}x",
        "of FLOP-allowed": lambda r, b, v: f"{r['prefill_speedup'] * prefill_ratio(r, b, v):.0%}",
        "of FLOP-allowed, LLM FLOPs only": lambda r, b, v: f"{r['prefill_speedup'] * r['flops_ratio']:.0%}",
        "prefill GPU-time speed-up": lambda r, b, v: _ratio(r, "prefill_gpu_speedup", "{:.2f}x"),
        "of FLOP-allowed (GPU time)":
            lambda r, b, v: _ratio(r, "prefill_gpu_speedup", "{:.0%}", prefill_ratio(r, b, v)),
        "ms / token": lambda r, b, v: f"{ms_per_token(r):.2f}",
        "x base per token": lambda r, b, v: f"{ms_per_token(r) / ms_per_token(b):.3f}",
    }
    out = []
    for (model, group), by_kernels in load_runs(root).items():
        first = next(iter(by_kernels.values()))
        out += [f"### {model}, {group} ({first['device']}, {first['dtype']}, batch {first['batch_size']}, "
                f"{first['max_new_tokens']} new tokens, best of {first['repeats']} rounds)", ""]  # fmt: skip
        order = [k for k in ("auto", "off") if k in by_kernels]
        vision = vision_flops_of(first) or 0.0
        head = ["method", "visual tokens kept", "FLOPs ratio (LLM)", "FLOPs ratio (prefill)"]
        head += [f"{c} ({k})" for c in columns for k in order]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base = first["runs"]["base"]
        for name, run in first["runs"].items():
            row = [name, f"{run['visual_tokens_kept']:.0f} / {run['visual_tokens']:.0f}", f"{run['flops_ratio']:.2f}",
                   f"{prefill_ratio(run, base, vision):.2f}"]  # fmt: skip
            row += [_cell(by_kernels[k], name, fmt, vision) for fmt in columns.values() for k in order]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
        for kernels, result in by_kernels.items():
            if result.get("profiles"):
                out += [f"Profile ({kernels}): one prefill forward and one generate() of {PROFILE_TOKENS} tokens per "
                        "method under torch.profiler", "", format_profile(result["profiles"]), ""]
    out.append("auto = Triton kernels routed by the engine (vlm_efficient/kernel_plan.py); off = SDPA plus the "
               "engine's torch paths. 'of FLOP-allowed' = measured prefill speed-up x FLOPs ratio of the whole "
               "prefill (1 = all of it): the decoder layers (vlm_efficient.stats) plus the vision tower and "
               "projector (torch's FlopCounterMode), which the timed forward also runs; 'LLM FLOPs only' leaves the "
               "vision tower out of both, which overstates the allowed speed-up (the share reported up to run 6). "
               "GPU time: the prefill's summed GPU kernel time (torch.profiler), what the method saves on the GPU "
               "whether or not the host keeps the GPU busy (a batch-1 LLaVA-1.5-7B prefill is host-bound).")
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(sys.argv[1]))
