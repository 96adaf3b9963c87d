"""`vlm-efficient bench`: speed and memory of a model with and without methods, in one process, on CPU or GPU.

Per method spec ("" = the base: the unwrapped model, SDPA): prefill ms (one forward over the prompt,
vision tower included), time to first token (generate() until its first logits), decode tokens/s, peak memory,
KV-cache bytes and FLOPs (from vlm_efficient.stats), and their ratios to the base measured in the same run.
After a warm-up round, `repeats` timed rounds each time every spec (interleaved): PREFILL_CALLS forwards and one
generate(); each measure is the spec's best over the rounds (the least prefill and first-token time, the most decode
tokens/s), since a shared host's contention only ever adds time (a batch-1 prefill of a 7B model is host-bound and
swings 2x with it); every round's values are kept under "rounds". On CUDA the warm-up round also profiles one
prefill forward: `prefill_gpu_ms`, the summed GPU kernel time, is what the method saves on the GPU whatever the host
does. The model is a real checkpoint (a directory, a hub id, `testbed`, `tiny:<family>`) or a random-weight
architecture of archs.ARCHS. Peak memory is CUDA's maximum allocated per method on GPU; on CPU it is the process's
peak RSS, which never goes down (compare on GPU).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vlm_efficient
from vlm_efficient.compare import FirstTokenClock

from .runner import _peak_memory, _sync, describe_inputs


PREFILL_CALLS = 5  # prefill forwards per spec per round


def _time_once(model, inputs, max_new_tokens: int) -> tuple[float, float, float]:
    """(best prefill ms of PREFILL_CALLS forwards, time to first token ms, decode tokens/s) of one round."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    batch, n_in = inputs["input_ids"].shape
    generate = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    prefill = []
    with torch.inference_mode():
        for _ in range(PREFILL_CALLS):
            _sync(device)
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            _sync(device)
            prefill.append(1e3 * (time.perf_counter() - start))
        clock = FirstTokenClock(device)
        start = time.perf_counter()
        out = model.generate(**inputs, **generate, logits_processor=LogitsProcessorList([clock]))
        _sync(device)
        end = time.perf_counter()
    steps = out.shape[1] - n_in
    decode = batch * (steps - 1) / (end - clock.at) if steps > 1 else float("nan")
    return min(prefill), 1e3 * (clock.at - start), decode


def vision_flops(model, inputs) -> float:
    """FLOPs of the vision tower and projector on these inputs (torch's FlopCounterMode over the model's
    get_image_features): the part of a prefill that no method acting inside the LLM reduces."""
    from torch.utils.flop_counter import FlopCounterMode

    images = {key: inputs[key] for key in ("pixel_values", "image_sizes", "image_grid_thw") if key in inputs}
    videos = {key: inputs[key] for key in ("pixel_values_videos", "video_grid_thw") if key in inputs}
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        if images:
            model.model.get_image_features(**images)
        if videos:
            model.model.get_video_features(**videos)
    return float(counter.get_total_flops())


def arch_vision_flops(name: str, batch_size: int, image_size: int) -> float:
    """vision_flops of a random-weight architecture (archs.ARCHS) on the bench's inputs, counted on the meta device
    (shapes only: no memory, no compute)."""
    from .archs import arch_on_meta

    model, processor = arch_on_meta(name)
    inputs = describe_inputs(processor, image_size, batch_size)
    inputs["pixel_values"] = inputs["pixel_values"].to("meta", torch.bfloat16)
    return vision_flops(model, inputs)


def _prefill_gpu_ms(model, inputs) -> float | None:
    """Summed GPU kernel time of one prefill forward (torch.profiler; CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    if next(model.parameters()).device.type != "cuda":
        return None
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(**inputs, logits_to_keep=1)
        torch.cuda.synchronize()
    return _gpu_ms(prof.events())


def _gpu_kernels(events) -> list:
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Mem")]


def _gpu_ms(events) -> float:
    return sum(e.device_time_total for e in _gpu_kernels(events)) / 1e3


def _warm_and_count(model, inputs, spec: str, max_new_tokens: int) -> dict:
    """A warm-up forward and generate() (allocator, kernel choice, Triton compilation), then one generate() under
    the spec (the base under a no-op wrap, which changes nothing in the computation) for the engine's statistics."""
    generate = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    with torch.inference_mode():
        model(**inputs, logits_to_keep=1)
        model.generate(**inputs, **{**generate, "max_new_tokens": 2, "min_new_tokens": 2})
        if not spec:
            vlm_efficient.wrap(model, "")
        model.generate(**inputs, **generate)
    s = vlm_efficient.stats(model)
    return {
        "prefill_gpu_ms": _prefill_gpu_ms(model, inputs),
        "kv_cache_bytes": s.kv_cache_bytes,
        "prefill_flops": s.prefill_flops["total"],
        "decode_flops": s.decode_flops["total"],
        "visual_tokens": statistics.fmean(s.visual_tokens),
        "visual_tokens_kept": s.visual_tokens_per_layer[-1],
        "tokens_avg": s.average_tokens,
        "prompt_tokens": statistics.fmean(s.prompt_tokens),
    }


def interleaved_rounds(model, specs: list[str], rounds: int, call) -> None:
    """call(spec, round) for every spec in each round, the model wrapped in the spec ("" = unwrapped) and unwrapped
    after each call, so a slow phase of the machine reaches every spec alike."""
    for round_ in tqdm(range(rounds), desc="rounds", leave=False):
        for spec in specs:
            if spec:
                vlm_efficient.wrap(model, spec)
            try:
                call(spec, round_)
            finally:
                if vlm_efficient.is_wrapped(model):
                    vlm_efficient.unwrap(model)


def measure_all(model, inputs, specs: list[str], max_new_tokens: int, repeats: int) -> dict:
    """Timings (each spec's best over the rounds) and engine statistics of `model` under each spec ("" = the base:
    unwrapped, plain SDPA). Round 0 warms every spec up and counts its tokens; rounds 1..repeats time every spec once
    each, interleaved, so a drift of the machine during the run (clocks, other tenants) reaches every spec alike.
    Peak memory: the largest over the spec's timed runs (CUDA's maximum allocated; on CPU the process's peak RSS,
    which never goes down)."""
    device = next(model.parameters()).device
    times = {spec: [] for spec in specs}
    peaks = dict.fromkeys(specs, 0)
    counts = {}
    def call(spec, round_):
        if round_ == 0:
            counts[spec] = _warm_and_count(model, inputs, spec, max_new_tokens)
            return
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times[spec].append(_time_once(model, inputs, max_new_tokens))
        peaks[spec] = max(peaks[spec], _peak_memory(device))

    interleaved_rounds(model, specs, repeats + 1, call)
    result = {}
    for spec in specs:
        prefill, first, decode = zip(*times[spec])
        result[spec] = {"prefill_ms": min(prefill), "ttft_ms": min(first), "decode_tokens_per_s": max(decode),
                        "peak_memory_bytes": peaks[spec], **counts[spec],
                        "rounds": {"prefill_ms": prefill, "ttft_ms": first, "decode_tokens_per_s": decode}}  # fmt: skip
    return result


def spread(values) -> tuple[float, float]:
    """(min, max) of a measure's rounds (NaN rounds left out), or (nan, nan) when there is none."""
    values = [v for v in values if v == v]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def with_spread(value: float, rounds, fmt: str = ".1f", suffix: str = "") -> str:
    """A measure with the range of its rounds: "12.3 [12.1-14.0]" (several rounds), "12.3 (1 run)" (one)."""
    if len(rounds) < 2:
        return f"{value:{fmt}}{suffix} (1 run)"
    low, high = spread(rounds)
    return f"{value:{fmt}}{suffix} [{low:{fmt}}-{high:{fmt}}{suffix}]"


def measure(model, inputs, spec: str, max_new_tokens: int, repeats: int) -> dict:
    """measure_all for one spec."""
    return measure_all(model, inputs, [spec], max_new_tokens, repeats)[spec]


PROFILE_TOKENS = 4  # new tokens of the profiled generate(): the profiler's event processing grows with the steps


def profile_spec(model, inputs, spec: str, max_new_tokens: int = PROFILE_TOKENS) -> dict:
    """Where one prefill forward and one short generate() under `spec` spend their time (torch.profiler, after a
    warm-up): wall ms, host-side aten ops, GPU kernels launched and their summed GPU time, and the syncs of the
    generate() as sync_report counts them (torch's own sync detection on CUDA, host reads of device values on CPU),
    per phase: the prefill row gives the prefill's, the generate row prefill + decoding steps. GPU time well under
    the wall time means the run is host-bound: fewer FLOPs then save nothing, fewer host ops and syncs do."""
    from torch.profiler import ProfilerActivity, profile

    from .sync_report import sync_sites

    device = next(model.parameters()).device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    generate = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    if spec:
        vlm_efficient.wrap(model, spec)
    try:
        result = {}
        for phase, call in (("prefill", lambda: model(**inputs, logits_to_keep=1)),
                            ("generate", lambda: model.generate(**inputs, **generate))):
            with torch.inference_mode():
                call()
                _sync(device)
                start = time.perf_counter()
                with profile(activities=activities) as prof:
                    call()
                    _sync(device)
                wall = 1e3 * (time.perf_counter() - start)
            events = prof.events()
            result[phase] = {
                "wall_ms_profiled": wall,
                "aten_ops": sum(e.name.startswith("aten::") for e in events),
                "gpu_kernels": len(_gpu_kernels(events)),
                "gpu_ms": _gpu_ms(events),
            }
        syncs = {phase: sum(sites.values()) for phase, sites in sync_sites(model, inputs, max_new_tokens).items()}
        result["prefill"]["syncs"] = syncs["prefill"]
        result["generate"]["syncs"] = syncs["prefill"] + syncs["decode"]
        return result
    finally:
        if vlm_efficient.is_wrapped(model):
            vlm_efficient.unwrap(model)


def format_profile(profiles: dict) -> str:
    lines = ["| methods | phase | wall ms (profiled) | aten ops | syncs (sync_report) | GPU kernels | GPU busy ms |",
             "|---|---|---|---|---|---|---|"]
    for name, phases in profiles.items():
        for phase, p in phases.items():
            lines.append(f"| {name} | {phase} | {p['wall_ms_profiled']:.1f} | {p['aten_ops']} | {p.get('syncs', 'n/a')} | "
                         f"{p['gpu_kernels']} | {p['gpu_ms']:.1f} |")
    return "\n".join(lines)


RATIOS = {  # name -> (measure, base / method when True: a speed-up; method / base otherwise)
    "prefill_speedup": ("prefill_ms", True),
    "prefill_gpu_speedup": ("prefill_gpu_ms", True),
    "ttft_speedup": ("ttft_ms", True),
    "decode_speedup": ("decode_tokens_per_s", False),
    "kv_ratio": ("kv_cache_bytes", False),
    "flops_ratio": ("prefill_flops", False),
    "memory_ratio": ("peak_memory_bytes", False),
}


def add_ratios(run: dict, base: dict) -> None:
    """Add to `run` its RATIOS to the base's measures; for the timed measures also the ratio in each round (the
    spec's round i over the base's round i, timed in the same interleaved round), under run["rounds"][name]. The
    ratio of the best rounds always lies within their range."""
    for name, (key, inverse) in RATIOS.items():
        if run.get(key) is None or base.get(key) is None:
            continue  # not measured on this device (GPU time)
        a, b = (base[key], run[key]) if inverse else (run[key], base[key])
        run[name] = a / b if b else float("nan")
        mine, theirs = run.get("rounds", {}).get(key), base.get("rounds", {}).get(key)
        if mine is not None and theirs is not None and len(mine) == len(theirs):
            pairs = zip(theirs, mine) if inverse else zip(mine, theirs)
            run["rounds"][name] = [a / b if b else float("nan") for a, b in pairs]


CPU_LAYERS = 3  # layers of a random architecture on CPU unless --layers says otherwise (fastv:layer=2 needs 3)


def _available_memory(device) -> int | None:
    """Bytes the device can still take: free CUDA memory, or the host's MemAvailable (Linux) for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def check_arch_fits(name: str, layers: int | None, device, dtype: torch.dtype, available: int | None) -> None:
    """Refuse, before building it, a random architecture whose weights alone take more than 80% of `available`
    bytes, naming the largest --layers that fits (parameter counts on the meta device: linear in the depth)."""
    from .archs import arch_on_meta

    def weight_bytes(depth):
        model = arch_on_meta(name, depth, dtype)[0]
        return sum(p.numel() for p in model.parameters()) * dtype.itemsize

    needed = weight_bytes(layers)
    if available is None or needed <= 0.8 * available:
        return
    one, two = weight_bytes(1), weight_bytes(2)
    fits = int((0.8 * available - (2 * one - two)) // (two - one))
    advice = f"pass --layers {fits} or fewer" if fits >= 1 else "it does not fit even with --layers 1"
    raise ValueError(
        f"{name} with {layers or 'all its'} layers needs {needed / 2**30:.1f} GiB for its weights in "
        f"{str(dtype).replace('torch.', '')} and {device} has {available / 2**30:.1f} GiB available: {advice}"
    )


def model_image_size(inputs, processor) -> str:
    """The image as the model sees it after its processor: "336x336 px", "5 tiles of 336x336 px" (LLaVA-NeXT), or
    the patch grid's side in pixels (Qwen; a clip: its temporal steps of that grid)."""
    if "video_grid_thw" in inputs:
        steps, rows, cols = inputs["video_grid_thw"][0].tolist()
        patch = processor.image_processor.patch_size
        return f"a clip of {steps} temporal steps of {rows * patch}x{cols * patch} px"
    if "image_grid_thw" in inputs:
        _, rows, cols = inputs["image_grid_thw"][0].tolist()
        patch = processor.image_processor.patch_size
        return f"{rows * patch}x{cols * patch} px"
    pixels = inputs["pixel_values"]
    height, width = pixels.shape[-2:]
    return f"{pixels.shape[1]} tiles of {height}x{width} px" if pixels.dim() == 5 else f"{height}x{width} px"


def bench(model_name: str, specs: list[str], *, device="cpu", dtype=torch.float32, layers=None, batch_size=1,
          image_size=None, max_new_tokens=32, repeats=3, output=None, profile=False, video_frames=0) -> dict:  # fmt: skip
    """Measure each spec (the first should be "", the base) on `model_name`; write bench.json / .md / .png to
    `output` when given. A random architecture on CPU has CPU_LAYERS layers unless `layers` is given, and one
    whose weights do not fit the device's memory is refused with the --layers that would. `video_frames`: each
    sample is a synthetic clip of that many frames of `image_size` instead of an image (Qwen architectures)."""
    from vlm_efficient import parse_methods

    from .archs import ARCHS, DEFAULT_IMAGE_SIZE, build_arch
    from .runner import load_eval_model

    for spec in specs:
        parse_methods(spec)  # a bad spec fails before the model is built
    if repeats < 1 or max_new_tokens < 2 or batch_size < 1 or video_frames < 0:
        raise ValueError("--repeats and --batch-size must be >= 1, --max-new-tokens >= 2, --video-frames >= 0")
    torch.manual_seed(0)
    if model_name in ARCHS:
        if layers is None and torch.device(device).type == "cpu":
            layers = CPU_LAYERS
        check_arch_fits(model_name, layers, device, dtype, _available_memory(device))
        model, processor = build_arch(model_name, device, dtype, layers)
    elif layers is not None:
        raise ValueError(f"--layers applies to the random architectures ({', '.join(ARCHS)}), not to {model_name!r}")
    else:
        model, processor = load_eval_model(model_name, device, dtype)
    size = image_size or DEFAULT_IMAGE_SIZE.get(model_name, 336)
    inputs = describe_inputs(processor, size, batch_size, model, video_frames)
    runs = {spec or "base": run for spec, run in measure_all(model, inputs, specs, max_new_tokens, repeats).items()}
    base = runs[specs[0] or "base"]
    for run in runs.values():
        add_ratios(run, base)
    vision = vision_flops(model, inputs)
    result = {"model": model_name, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "layers": layers,
              "batch_size": batch_size, "image_size": size, "video_frames": video_frames,
              "prompt_tokens": int(inputs["input_ids"].shape[1]), "model_image": model_image_size(inputs, processor),
              "max_new_tokens": max_new_tokens, "repeats": repeats,
              "parameters": sum(p.numel() for p in model.parameters()), "vision_flops": vision,
              "runs": runs}  # fmt: skip
    _write(result, output)
    if profile:  # after the timings are written: profiling a 7B model takes a while
        result["profiles"] = {spec or "base": profile_spec(model, inputs, spec) for spec in specs}
        _write(result, output)
    return result


def _write(result: dict, output) -> None:
    if not output:
        return
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    profiles = result.get("profiles")
    profile_table = "\n" + format_profile(profiles) + "\n" if profiles else ""
    (out / "bench.md").write_text(format_bench(result) + "\n" + profile_table)
    plot_bench(result, out / "bench.png")


def format_bench(result: dict) -> str:
    """A markdown table, one row per method; each speed with the range of its rounds."""
    seen = result.get("model_image")
    frames = result.get("video_frames")
    image = (f"{frames}-frame clip of {result['image_size']} px" if frames else f"image {result['image_size']} px")
    image += (f", {seen} as the model sees it" if seen else "") + (
        f", {result['prompt_tokens']} prompt tokens" if "prompt_tokens" in result else "")
    head = (f"{result['model']} on {result['device']} ({result['dtype']}, batch {result['batch_size']}, "
            f"{image}, {result['max_new_tokens']} new tokens"
            f"{', ' + str(result['layers']) + ' layers' if result['layers'] else ''})")  # fmt: skip
    rounds = result["repeats"]
    note = (f"Speeds: the best of {rounds} interleaved rounds [the range over the rounds]; speed-ups: best over best "
            "[the range of the per-round ratios, base and method timed in the same round]: a range that holds 1.00x "
            "is no measurable change." if rounds > 1 else
            "Speeds: one timed round (1 run), no spread: pass --repeats 3 or more to see the noise.")  # fmt: skip
    lines = [head, "", note, "",
             "| methods | visual tokens kept | prefill ms | TTFT ms | decode tok/s | peak MiB | KV MiB | prefill GFLOPs "
             "| prefill speed-up | decode speed-up | KV ratio | FLOPs ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in result["runs"].items():
        timed = r.get("rounds", {})

        def cell(key, fmt=".1f", suffix=""):
            if key not in timed:  # a result written before the per-round ratios were kept
                return f"{r[key]:{fmt}}{suffix}"
            return with_spread(r[key], timed[key], fmt, suffix)

        lines.append(
            f"| {name} | {r['visual_tokens_kept']:.0f} / {r['visual_tokens']:.0f} | {cell('prefill_ms')} | "
            f"{cell('ttft_ms')} | {cell('decode_tokens_per_s')} | {r['peak_memory_bytes'] / 2**20:.0f} | "
            f"{r['kv_cache_bytes'] / 2**20:.1f} | {r['prefill_flops'] / 1e9:.1f} | {cell('prefill_speedup', '.2f', 'x')} | "
            f"{cell('decode_speedup', '.2f', 'x')} | {r['kv_ratio']:.2f} | {r['flops_ratio']:.2f} |"
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
