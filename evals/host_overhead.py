"""The host time a wrapped model adds: LLaVA-1.5-7B's depth (32 decoder and 24 vision layers, every hook and kernel
launch of the real model) at tiny widths and a 56 px image, on CPU, where the compute is then negligible and a
forward's time is Python and op dispatch. That is what bounds a batch-1 prefill and every decoding step of a 7B VLM
on a GPU (results/gpu_bench_run6: the base prefill's kernels take 20.6 ms of a 35 ms forward on an H100), so a
method's ratio here is the floor of its batch-1 wall-clock ratio there, measurable without a GPU.

    python -m vlm_efficient.evals.host_overhead --methods "fastv:layer=2,ratio=0.5;pdrop" [--output DIR]

Per method: prefill ms and decoding ms per token (a generate() of n + 1 tokens after its first token), each the best
of interleaved rounds, and their ratios to the unwrapped model. Run with one thread (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import vlm_efficient
from vlm_efficient.compare import FirstTokenClock

from .archs import build_arch
from .bench import interleaved_rounds
from .runner import describe_inputs

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
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - start))
    return min(times)


def _decode_ms(model, inputs, new_tokens: int) -> float:
    """ms from the first token to the end of one generate() of new_tokens + 1 tokens (both read in that call)."""
    from transformers import LogitsProcessorList

    clock = FirstTokenClock(torch.device("cpu"))
    with torch.inference_mode():
        model.generate(**inputs, do_sample=False, min_new_tokens=new_tokens + 1, max_new_tokens=new_tokens + 1,
                       logits_processor=LogitsProcessorList([clock]))
    return 1e3 * (time.perf_counter() - clock.at)


def measure(model, inputs, repeats: int, new_tokens: int) -> dict:
    """One round: best prefill of `repeats` forwards, decoding ms per token from the best of repeats // 3
    generate() calls of new_tokens + 1 tokens."""
    prefill = _best_ms(lambda: model(**inputs, logits_to_keep=1), repeats)
    decode = min(_decode_ms(model, inputs, new_tokens) for _ in range(max(repeats // 3, 1)))
    return {"prefill_ms": prefill, "decode_ms_per_token": decode / new_tokens}


def host_overhead(specs: list[str], repeats: int = 10, rounds: int = 4, new_tokens: int = 16, output=None) -> dict:
    """Every spec ("" first: the base) timed in each of `rounds` interleaved rounds after a warm-up one, so that a
    slow phase of the machine reaches every spec alike; each measure is the spec's best round."""
    torch.manual_seed(0)
    model, processor = build_arch("llava-1.5-7b", "cpu", torch.float32, configure=_narrow)
    inputs = describe_inputs(processor, SIDE, 1, model)
    specs = [""] + specs
    timed = {spec: [] for spec in specs}
    def call(spec, round_):  # round 0 warms up
        measured = measure(model, inputs, repeats if round_ else 1, new_tokens)
        if round_:
            timed[spec].append(measured)

    interleaved_rounds(model, specs, rounds + 1, call)
    runs = {spec or "base": {key: min(m[key] for m in timed[spec]) for key in timed[spec][0]} for spec in specs}
    base = runs["base"]
    for run in runs.values():
        run["prefill_ratio"] = run["prefill_ms"] / base["prefill_ms"]
        run["decode_ratio"] = run["decode_ms_per_token"] / base["decode_ms_per_token"]
    result = {"threads": torch.get_num_threads(), "repeats": repeats, "rounds": rounds, "new_tokens": new_tokens,
              "runs": runs}  # fmt: skip
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
    parser.add_argument("--repeats", type=int, default=10, help="prefill forwards per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    specs = [m.strip() for m in args.methods.split(";") if m.strip()]
    for spec in specs:
        vlm_efficient.parse_methods(spec)  # a bad spec fails before the model is built
    print(format_table(host_overhead(specs, args.repeats, args.rounds, args.new_tokens, args.output)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
