"""The host time a wrapped model adds: LLaVA-1.5-7B's depth (32 decoder and 24 vision layers, every hook and kernel
launch of the real model) at tiny widths and a 56 px image, on CPU, where the compute is then negligible and a
forward's time is Python and op dispatch. That is what bounds a batch-1 prefill and every decoding step of a 7B VLM
on a GPU (evals/results/gpu_bench_run6: the base prefill's kernels take 20.6 ms of a 35 ms forward on an H100), so a
method's ratio here is the floor of its batch-1 wall-clock ratio there, measurable without a GPU.

    python -m vlm_efficient.evals.host_overhead --methods "fastv:layer=2,ratio=0.5;pdrop" [--output DIR]

Per method: prefill ms (best of `--repeats` forwards) and decoding ms per token (generate() of n + 1 tokens minus
one of 1, best of rounds), and their ratios to the unwrapped model. Run with one thread (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vlm_efficient

from .archs import build_arch
from .bench import _inputs

SIDE = 56  # px: a 4 x 4 patch grid, 16 image tokens


def _narrow(config, processor) -> None:
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 64, 128, 4, 4
    text.head_dim = 16
    vision.hidden_size, vision.intermediate_size, vision.num_attention_heads = 64, 128, 4
    vision.projection_dim, vision.image_size = 64, SIDE
    processor.image_processor.size = {"shortest_edge": SIDE}
    processor.image_processor.crop_size = {"height": SIDE, "width": SIDE}


def _best_ms(call, repeats: int) -> float:
    with torch.inference_mode():
        call()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - start))
    return min(times)


def measure(model, inputs, repeats: int, new_tokens: int) -> dict:
    generate = dict(do_sample=False, min_new_tokens=new_tokens + 1, max_new_tokens=new_tokens + 1)
    one = dict(do_sample=False, min_new_tokens=1, max_new_tokens=1)
    prefill = _best_ms(lambda: model(**inputs, logits_to_keep=1), repeats)
    full = _best_ms(lambda: model.generate(**inputs, **generate), repeats)
    first = _best_ms(lambda: model.generate(**inputs, **one), repeats)
    return {"prefill_ms": prefill, "decode_ms_per_token": (full - first) / new_tokens}


def host_overhead(specs: list[str], repeats: int = 15, new_tokens: int = 16, output=None) -> dict:
    torch.manual_seed(0)
    model, processor = build_arch("llava-1.5-7b", "cpu", torch.float32, configure=_narrow)
    inputs = _inputs(processor, SIDE, 1, model)
    runs = {}
    for spec in tqdm([""] + specs, desc="methods", leave=False):
        if spec:
            vlm_efficient.wrap(model, spec)
        try:
            runs[spec or "base"] = measure(model, inputs, repeats, new_tokens)
        finally:
            if vlm_efficient.is_wrapped(model):
                vlm_efficient.unwrap(model)
    base = runs["base"]
    for run in runs.values():
        run["prefill_ratio"] = run["prefill_ms"] / base["prefill_ms"]
        run["decode_ratio"] = run["decode_ms_per_token"] / base["decode_ms_per_token"]
    result = {"threads": torch.get_num_threads(), "repeats": repeats, "new_tokens": new_tokens, "runs": runs}
    if output:
        Path(output).mkdir(parents=True, exist_ok=True)
        Path(output, "host_overhead.json").write_text(json.dumps(result, indent=1))
        Path(output, "host_overhead.md").write_text(format_table(result) + "\n")
    return result


def format_table(result: dict) -> str:
    lines = ["| method | prefill ms (x base) | decoding ms / token (x base) |", "|---|---|---|"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['prefill_ms']:.2f} ({r['prefill_ratio']:.2f}) | "
                     f"{r['decode_ms_per_token']:.2f} ({r['decode_ratio']:.2f}) |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", required=True, help="method specs separated by ';'")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    specs = [m.strip() for m in args.methods.split(";") if m.strip()]
    for spec in specs:
        vlm_efficient.parse_methods(spec)  # a bad spec fails before the model is built
    print(format_table(host_overhead(specs, args.repeats, args.new_tokens, args.output)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
