"""The fast path (wrap(..., fast=True)) against the dynamic path and Hugging Face's own routes, on one GPU, in one
process, plus its exactness checks at 7B shapes.

    python -m vlm_efficient.evals.fast_bench --out DIR            # CUDA: random-weight 7B shapes in bf16
    python -m vlm_efficient.evals.fast_bench --out DIR --tiny     # CPU smoke run on the tiny models (tests)

Sections, in order, each started only while the time budget (--budget seconds) lasts: LLaVA-1.5-7B batch 1 (every
path and image method, then the exactness checks, then Hugging Face's static cache), LLaVA-1.5-7B batch 8,
LLaVA-NeXT-7B batch 1, LLaVA-NeXT-7B batch 8, Qwen2-VL-7B batch 1 on a 32-frame clip at 336 px, Gemma3-4B batch 1
(sliding-window layers) (--sections N: the first N; --only 1,4: those). What is measured, per (path, method):
- the copy bandwidth of the device (a 1 GiB device-to-device copy, read + write bytes / time) and the HBM limit of one
  decoding step = the language model's weight bytes / that bandwidth;
- prefill ms = one generate() with max_new_tokens=1 (vision tower, prefill, first token) and decode ms/token =
  (generate() of N tokens - that) / (N - 1); both host time included (synchronize before and after each whole call),
  median of --repeats alternating rounds after the warm-up calls (one generate() of N tokens, then one of 1 token:
  the fast path captures its decoding graph and its prefill segments there, HF's static route compiles there:
  reported as warm-up seconds); min_new_tokens = N so every call decodes N tokens;
- paths: "hf-dynamic" (the unwrapped model, DynamicCache), "hf-static" (cache_implementation="static": the unwrapped
  model, whose decoding generate() compiles, then, where that worked, wrap(spec) on the same route, which decodes
  uncompiled: hooks.STATIC_UNCOMPILED), "fast"
  (wrap(spec, fast=True); spec "" = the unwrapped model on the fast path), with --compiled also "fast-compiled"
  (wrap(spec, fast="compile"): the step compiled before its capture; its compile time is in the warm-up column) and
  "dynamic" (wrap(spec));
- checks: greedy tokens of the fast path against the dynamic path for 8 tokens (mismatches reported, not raised), and
  the CUDA graph's replay against the same step run eagerly (tokens and logits).
Every configuration runs in its own try/except; the JSON and the markdown table are rewritten after each.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch

import vlm_efficient as ve

METHODS = {
    "FastV 50%": "fastv:layer=2,ratio=0.5",
    "FastV 75%": "fastv:layer=2,ratio=0.75",
    "VisionZip 75%": "visionzip:ratio=0.75",
    "DART 75%": "dart:layer=2,ratio=0.75",
    "PyramidDrop": "pdrop:ratio=0.63",  # keeps 144 of 576 image tokens after its last stage
    "PAI": "pai",  # its attention edit only (no contrastive logits processor)
    "VAF": "vaf",
    "VAR": "var:tau=3,sink_dims=0/1/2/3",  # random weights have no massive dims: tau=3 (as evals/gpu_bench.sh)
    "ACT": "act",
    "VHR": "vhr",  # head-output scales; two side prefills (with and without the image) before each prefill
    "DyCoke 75%": "dycoke:ratio=0.75",  # video: temporal merging of each frame pair
    "DivPrune 90%": "divprune:ratio=0.9",  # per frame on a video
    "PLPHP": "plphp",  # per-head pruned KV cache from layer 2 (kernel 4 on the fast path)
    "A-VL": "avl",  # decode masks that change per step: its state on the device, a step captured per call
    # the paper's full PAI: generate() adds PAIContrastive, whose text-only stream decodes on a step of its own
    "PAI+contrastive": "pai:contrastive=1.1",
}
FAMILY_CHECKS = ["FastV 50%", "VisionZip 75%", "ACT"]
PER_HEAD = {"PLPHP"}  # methods on a per-head pruned cache


class Section(NamedTuple):
    arch: str
    batch_size: int
    methods: list[str]
    full: bool  # whether to run the checks and HF's static route
    video_frames: int = 0  # each sample a synthetic clip of this many frames (VIDEO_IMAGE_SIZE px) instead of an image

    @property
    def name(self) -> str:
        return f"{self.arch} batch {self.batch_size}" + (f" video {self.video_frames} frames" if self.video_frames else "")


VIDEO_IMAGE_SIZE = 336  # 32 frames at 336 px: 2,304 video tokens on Qwen2-VL (README, video token reduction)
SECTIONS = [
    Section("llava-1.5-7b", 1, ["FastV 50%", "FastV 75%", "VisionZip 75%", "DART 75%", "PyramidDrop", "PAI", "VAF", "VAR",
                                "ACT", "VHR", "PLPHP", "A-VL", "PAI+contrastive"], True),
    Section("llava-1.5-7b", 8, ["FastV 75%", "VisionZip 75%"], False),
    Section("llava-next-7b", 1, ["FastV 75%", "VisionZip 75%", "DART 75%"], False),
    Section("llava-next-7b", 8, ["FastV 75%", "PLPHP"], False),
    Section("qwen2-vl-7b", 1, ["DyCoke 75%", "FastV 75%", "DivPrune 90%"], False, video_frames=32),
    Section("gemma3-4b", 1, ["FastV 75%", "PAI"], False),  # sliding-window layers: segments of one layer type
]
FAST = {"fast": True, "fast-compiled": "compile"}  # the fast path's bench paths -> wrap(..., fast=)
TINY = {"llava-1.5-7b": "tiny:llava", "llava-next-7b": "tiny:llava_next", "qwen2-vl-7b": "tiny:qwen2_vl",
        "gemma3-4b": "tiny:gemma3"}
CHECK_TOKENS = 8


def log(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, size: int) -> float:
    """Bytes per second of a device-to-device copy of `size` bytes (each byte read once and written once)."""
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    sync(device)
    start, copies = time.perf_counter(), 10
    for _ in range(copies):
        target.copy_(source)
    sync(device)
    return 2 * size * copies / (time.perf_counter() - start)


def lm_weight_bytes(model) -> int:
    """The language model's weight bytes: the text model and the LM head (counted once where tied)."""
    text = ve.get_adapter(model).text_model(model)
    params = {id(p): p for p in text.parameters()}
    params.update({id(p): p for p in model.get_output_embeddings().parameters()})
    return sum(p.numel() * p.element_size() for p in params.values())


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.built = None  # (architecture, model, processor) of the last section
        import transformers

        self.result = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "kernels_env": os.environ.get("VLM_EFFICIENT_KERNELS"), "new_tokens": args.new_tokens,
            "repeats": args.repeats, "budget_s": args.budget, "inductor_config": args.inductor, "sections": [],
            "errors": [],
        }  # fmt: skip

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        kept = {"tokens"}  # tensors kept for comparisons, not written
        result = dict(self.result, sections=[{k: v for k, v in section.items() if k not in kept}
                                             for section in self.result["sections"]])  # fmt: skip
        (self.out / "fast_bench.json").write_text(json.dumps(result, indent=1, default=str))
        (self.out / "fast_bench.md").write_text(format_markdown(self.result))

    def build(self, arch: str, batch_size: int, video_frames: int = 0):
        """The model of `arch` (kept for the next section of the same architecture) and a batch of its inputs (a clip
        of `video_frames` frames per sample where given)."""
        from .archs import DEFAULT_IMAGE_SIZE, build_arch
        from .runner import describe_inputs
        from .runner import load_eval_model

        if self.built is None or self.built[0] != arch:
            self.built = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            torch.manual_seed(0)
            if self.args.tiny:
                self.built = (arch, *load_eval_model(TINY[arch], "cpu", torch.float32))
            else:
                self.built = (arch, *build_arch(arch, "cuda", torch.bfloat16))
        _, model, processor = self.built
        size = 112 if self.args.tiny else VIDEO_IMAGE_SIZE if video_frames else DEFAULT_IMAGE_SIZE[arch]
        return model, describe_inputs(processor, size, batch_size, model, video_frames)

    def generate(self, model, inputs, path: str, new_tokens: int, **kw):
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
        if path == "hf-static":
            kw["cache_implementation"] = "static"
        with torch.no_grad():
            return model.generate(**inputs, **kw)

    def timed(self, model, inputs, path: str, new_tokens: int) -> float:
        device = next(model.parameters()).device
        sync(device)
        start = time.perf_counter()
        self.generate(model, inputs, path, new_tokens)
        sync(device)
        return 1e3 * (time.perf_counter() - start)

    def measure(self, section: dict, model, inputs, path: str, label: str, spec: str) -> None:
        row = {"path": path, "method": label, "spec": spec}
        section["rows"].append(row)
        log(f"  {path:10s} {label or 'base':14s}", end="")
        device = next(model.parameters()).device
        try:
            if path in FAST or path == "dynamic" or spec:  # hf-static with a spec: the wrapped model on HF's route
                ve.wrap(model, spec, fast=FAST.get(path, False))
            n = self.args.new_tokens
            start = time.perf_counter()
            self.timed(model, inputs, path, n)
            if path == "hf-static" or path in FAST:
                # HF's static route compiles the prefill length separately; the fast path captures a prefill segment
                # the second time its shapes are seen (fast_prefill.CAPTURE_AFTER)
                self.timed(model, inputs, path, 1)
            row["warmup_s"] = round(time.perf_counter() - start, 2)
            prefill, total = [], []
            for _ in range(self.args.repeats):
                prefill.append(self.timed(model, inputs, path, 1))
                total.append(self.timed(model, inputs, path, n))
            row["prefill_ms"] = statistics.median(prefill)
            row["total_ms"] = statistics.median(total)
            row["decode_ms_per_token"] = (row["total_ms"] - row["prefill_ms"]) / (n - 1)
            row["rounds"] = {"prefill_ms": prefill, "total_ms": total}
            tokens = self.generate(model, inputs, path, n)
            section.setdefault("tokens", {})[(path, label)] = tokens
            # the same greedy tokens as the same model uncompiled (fast-compiled), on the dynamic cache (hf-static)?
            reference = {"fast-compiled": "fast", "hf-static": "dynamic" if spec else "hf-dynamic"}.get(path)
            if (reference, label) in section["tokens"]:
                differ = (tokens != section["tokens"][(reference, label)]).any(0).nonzero().flatten()
                row["tokens_equal_path"] = reference
                row["tokens_equal"] = differ.numel() == 0
                row["first_mismatch_position"] = int(differ[0]) - inputs["input_ids"].shape[1] if differ.numel() else None
            if ve.is_wrapped(model):
                row["kv_cache_mib"] = ve.stats(model).kv_cache_bytes / 2**20
            fast_path = ve.engine_of(model).fast_path if ve.is_wrapped(model) else None
            if fast_path is not None:
                row["graph"] = fast_path.last_step is not None and fast_path.last_step.graph is not None
                row["compiled"] = fast_path.last_step is not None and fast_path.last_step.compiled
                if fast_path.last_step is not None:  # what each layer's attention runs in the decoding step
                    routes = [type(route).__name__ for route in fast_path.last_step.routes.values()]
                    row["step_routes"] = {name: routes.count(name) for name in sorted(set(routes))}
                    row["step_routes"]["SDPA"] = len(fast_path.last_step.group_of) - len(routes)
                row["capture_error"] = fast_path.capture_error
                prefill = fast_path.prefill
                row["prefill_segments"] = [list(segment) for segment in prefill.last_segments]  # (start, end, graph)
                row["last_row_deferred"] = prefill.deferred_last_row  # run as the first decoding step
                row["last_row_routed"] = prefill.routed_last_row  # kernel 3's decoding form inside the segments
                row["prefill_capture_s"] = prefill.graphs.last_capture_s
                row["prefill_capture_error"] = prefill.graphs.capture_error
                row["encoder_graph"] = fast_path.encoder.last_replayed
                row["encoder_capture_error"] = fast_path.encoder.graphs.capture_error
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            log(f" prefill {row['prefill_ms']:8.1f} ms  decode {row['decode_ms_per_token']:7.2f} ms/token  "
                f"warm-up {row['warmup_s']} s")  # fmt: skip
        except Exception as error:  # noqa: BLE001 - every configuration reports its own failure
            self.record_failure(row, error, f"{section['name']} {path} {label}")
        finally:
            if ve.is_wrapped(model):
                ve.unwrap(model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            self.write()

    def record_failure(self, row: dict, error: Exception, where: str) -> None:
        """A configuration or check that raised: its error in its row, the traceback in the result's errors."""
        row["error"] = f"{type(error).__name__}: {error}"[:500]
        self.result["errors"].append({"where": where, "trace": traceback.format_exc()})
        log(f"  {where} FAILED {row['error'][:200]}")

    def check(self, section: dict, model, inputs, label: str, spec: str) -> None:
        """Fast-path greedy tokens against the dynamic path (the unwrapped model for the base), and on CUDA the graph
        replay against the same step run eagerly."""
        row = {"method": label or "base", "spec": spec}
        section["checks"].append(row)
        kw = dict(output_logits=True, return_dict_in_generate=True)
        try:
            if spec:
                ve.wrap(model, spec)
            dynamic = self.generate(model, inputs, "dynamic", CHECK_TOKENS, **kw)
            if spec:
                ve.unwrap(model)
            ve.wrap(model, spec, fast=True)
            fast = self.generate(model, inputs, "fast", CHECK_TOKENS, **kw)
            prompt = inputs["input_ids"].shape[1]
            differ = (fast.sequences[:, prompt:] != dynamic.sequences[:, prompt:]).any(0).nonzero().flatten()
            row["tokens_equal"] = differ.numel() == 0
            row["first_mismatch_step"] = int(differ[0]) if differ.numel() else None
            row["first_step_max_logit_diff"] = float((fast.logits[1] - dynamic.logits[1]).abs().max())
            if next(model.parameters()).device.type == "cuda":
                fast_path = ve.engine_of(model).fast_path
                fast_path.use_graph = False
                eager = self.generate(model, inputs, "fast", CHECK_TOKENS, **kw)
                fast_path.use_graph = True
                row["graph_equals_eager_tokens"] = bool(torch.equal(eager.sequences, fast.sequences))
                row["graph_vs_eager_max_logit_diff"] = max(
                    float((a - b).abs().max()) for a, b in zip(eager.logits, fast.logits))  # fmt: skip
            log(f"  check {label or 'base':14s} {row}")
        except Exception as error:  # noqa: BLE001 - every check reports its own failure
            self.record_failure(row, error, f"{section['name']} check {label}")
        finally:
            if ve.is_wrapped(model):
                ve.unwrap(model)
            self.write()

    def family_checks(self) -> None:
        """The tiny models of every family on this device (CUDA: through the graphs), a left-padded batch of one and
        two images: fast-path tokens and logits against the dynamic path, and graph replay against eager replay."""
        from vlm_efficient.testing import FAMILIES, image_placeholder, tiny_batch, tiny_image, tiny_model

        device = torch.device("cuda" if torch.cuda.is_available() and not self.args.tiny else "cpu")
        checks = self.result["family_checks"] = []
        kw = dict(max_new_tokens=CHECK_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
        for family in FAMILIES:
            model, processor = tiny_model(family)
            model.to(device)
            ph = image_placeholder(processor)
            batch = tiny_batch(processor, [(f"what is {ph} this", [tiny_image(0)]),
                                           (f"a longer prompt with {ph} and {ph} here", [tiny_image(1), tiny_image(2)])])
            batch = batch.to(device)
            for spec in ("", *(METHODS[label] for label in FAMILY_CHECKS)):
                row = {"family": family, "spec": spec}
                checks.append(row)
                try:
                    with torch.no_grad():
                        if spec:
                            ve.wrap(model, spec)
                        dynamic = model.generate(**batch, **kw)
                        if spec:
                            ve.unwrap(model)
                        ve.wrap(model, spec, fast=True)
                        fast = model.generate(**batch, **kw)
                        ve.engine_of(model).fast_path.use_graph = False
                        eager = model.generate(**batch, **kw)
                    row["tokens_equal"] = bool(torch.equal(fast.sequences, dynamic.sequences))
                    row["max_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(fast.logits, dynamic.logits))
                    graph_logits, eager_logits = torch.stack(fast.logits), torch.stack(eager.logits)
                    row["graph_equals_eager"] = bool(torch.equal(graph_logits, eager_logits))
                    row["graph_vs_eager_max_diff"] = float((graph_logits - eager_logits).abs().max())
                except Exception as error:  # noqa: BLE001
                    row["error"] = f"{type(error).__name__}: {error}"[:500]
                    self.result["errors"].append({"where": f"family check {family} {spec}",
                                                  "trace": traceback.format_exc()})  # fmt: skip
                finally:
                    if ve.is_wrapped(model):
                        ve.unwrap(model)
                log(f"  family check {row}")
        self.write()

    def section(self, chosen: Section, methods: list[str]) -> None:
        arch, batch_size, full = chosen.arch, chosen.batch_size, chosen.full
        section = {"name": chosen.name, "arch": arch, "batch_size": batch_size, "video_frames": chosen.video_frames,
                   "rows": [], "checks": []}  # fmt: skip
        self.result["sections"].append(section)
        log(f"== {chosen.name} ({self.left():.0f} s left)")
        start = time.perf_counter()
        model, inputs = self.build(arch, batch_size, chosen.video_frames)
        device = next(model.parameters()).device
        section["build_s"] = round(time.perf_counter() - start, 1)
        section["prompt_tokens"] = int(inputs["input_ids"].shape[1])
        section["lm_weight_bytes"] = lm_weight_bytes(model)
        if "copy_bandwidth" not in self.result:
            self.result["copy_bandwidth"] = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**24)
        section["hbm_limit_ms"] = 1e3 * section["lm_weight_bytes"] / self.result["copy_bandwidth"]
        self.write()
        configs = [("hf-dynamic", "", ""), ("dynamic", "", ""), ("fast", "", "")]
        configs += [("fast", label, METHODS[label]) for label in methods]
        if self.args.compiled:
            configs += [("fast-compiled", label, METHODS[label] if label else "") for label in ["", *methods]]
        configs += [("dynamic", label, METHODS[label]) for label in methods]
        for path, label, spec in configs:
            if self.left() < 15:
                section["skipped"] = "budget spent"
                break
            self.measure(section, model, inputs, path, label, spec)
        if self.args.profile:
            self.profile(section, model, inputs, methods)
        if full and self.args.checks:
            for label, spec in [("", ""), *[(label, METHODS[label]) for label in methods]]:
                if self.left() > 20:
                    self.check(section, model, inputs, label, spec)
            # HF's static route, the unwrapped model, then the wrapped one for each method where the base worked
            # (not a per-head cache, which replaces layers of a dynamic cache: refused there, ragged_cache.py)
            for label, spec in [("", ""), *[(label, METHODS[label]) for label in methods if label not in PER_HEAD]]:
                if self.left() < (30 if self.args.tiny else 150):
                    section["hf_static"] = "skipped: budget"
                    break
                self.measure(section, model, inputs, "hf-static", label, spec)
                if "error" in section["rows"][-1] and not spec:
                    break
        self.write()

    def profile(self, section: dict, model, inputs, methods: list[str]) -> None:
        """Where the prefill's time goes: one generate() of one token for the unwrapped model, the wrapped one (no
        method), the fast path with no method and the fast path with each of the section's methods. torch.profiler's top
        operators by host and by device time, cProfile's top Python functions by own time over a second call and, on
        CUDA, the synchronizing calls of a third by Python line (host_reads) go to profile_<path>[_<method>].txt; on
        CUDA the fast path's files also get the device-time table of one generate() of --new-tokens tokens (its
        decoding steps' kernels)."""
        import cProfile
        import io
        import pstats

        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        runs = [("hf-dynamic", "", ""), ("dynamic", "", ""), ("fast", "", "")]
        runs += [("fast", label, METHODS[label]) for label in methods]
        for path, label, spec in runs:
            if self.left() < 20:
                break
            name = path + (f"_{re.sub(r'[^A-Za-z0-9]+', '', label)}" if label else "")
            if path != "hf-dynamic":
                ve.wrap(model, spec, fast=path == "fast")
            try:
                for _ in range(2):  # the fast path captures its prefill segments at the second call
                    self.timed(model, inputs, path, 1)
                with profile(activities=activities) as prof:
                    wall = self.timed(model, inputs, path, 1)
                python = cProfile.Profile()
                python.enable()
                python_wall = self.timed(model, inputs, path, 1)
                python.disable()
                stream = io.StringIO()
                pstats.Stats(python, stream=stream).sort_stats("tottime").print_stats(30)
                host_reads = self.host_reads(model, inputs, path)
                table = prof.key_averages()
                text = [f"{path} {label or 'base'}: prefill {wall:.1f} ms wall (profiled)", "",
                        table.table(sort_by="self_cpu_time_total", row_limit=25)]
                if torch.cuda.is_available():
                    text += [table.table(sort_by="self_device_time_total", row_limit=25)]
                text += [f"cProfile, one more call ({python_wall:.1f} ms wall under cProfile), by own time:",
                         stream.getvalue()]
                if path == "fast" and torch.cuda.is_available():  # where a decoding step's GPU time goes
                    tokens = self.args.new_tokens
                    with profile(activities=activities) as decoding:
                        decode_wall = self.timed(model, inputs, path, tokens)
                    text += [f"One generate() of {tokens} tokens ({decode_wall:.1f} ms wall, profiled): a prefill as "
                             f"above and {tokens - 1} replays of the captured decoding step, by device time:",
                             decoding.key_averages().table(sort_by="self_device_time_total", row_limit=30)]
                if host_reads is not None:
                    section.setdefault("prefill_host_reads", {})[name] = sum(host_reads.values())
                    text += [f"Host reads (synchronizing calls) in one more call: {sum(host_reads.values())}, by the "
                             "Python line that made them:"]
                    text += [f"{count:4d}  {where}" for where, count in host_reads.most_common()]
                (self.out / f"profile_{name}.txt").write_text("\n".join(text))
                section.setdefault("profiled_prefill_ms", {})[name] = wall
                log(f"  profiled {name}: {wall:.1f} ms")
            except Exception as error:  # noqa: BLE001
                self.record_failure({}, error, f"{section['name']} profile {name}")
            finally:
                if ve.is_wrapped(model):
                    ve.unwrap(model)
        self.write()

    def host_reads(self, model, inputs, path: str):
        """collections.Counter {Python line: count} of the synchronizing CUDA calls (a tensor read on the host, a
        blocking copy) that one prefill makes, from torch.cuda's sync debug mode; None off CUDA."""
        import collections
        import warnings

        if not torch.cuda.is_available():
            return None
        sites: collections.Counter = collections.Counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.timed(model, inputs, path, 1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for warning in caught:  # a warning from C++ names the Python line that made the call
            if "synchroniz" in str(warning.message):
                sites[f"{warning.filename.split('site-packages/')[-1]}:{warning.lineno}"] += 1
        return sites

    def run(self) -> dict:
        if self.args.checks:
            try:
                self.family_checks()
            except Exception:  # noqa: BLE001
                self.result["errors"].append({"where": "family checks", "trace": traceback.format_exc()})
        needed = 20 if self.args.tiny else 120  # seconds a section needs to be worth starting
        chosen = self.args.only or range(1, self.args.sections + 1)
        for section in [SECTIONS[n - 1] for n in chosen]:
            methods = section.methods
            if self.args.methods:
                methods = [label for label in methods if label in self.args.methods]
            if self.left() < needed and self.result["sections"]:
                self.result.setdefault("skipped_sections", []).append(section.name)
                continue
            try:
                self.section(section, methods)
            except Exception:  # noqa: BLE001 - a section that fails to build leaves the others
                self.result["errors"].append({"where": section.name, "trace": traceback.format_exc()})
                log(traceback.format_exc())
        self.write()
        return self.result


def _fmt(value, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def _tokens_note(row: dict) -> str:
    equal, path = row.get("tokens_equal"), row.get("tokens_equal_path")
    if equal is None:
        return ""
    if equal:
        return f"tokens equal the {path} path's"
    return f"tokens differ from the {path} path's from new token {row['first_mismatch_position']}"


def format_markdown(result: dict) -> str:
    bandwidth = result.get("copy_bandwidth")
    lines = [
        f"# Fast path benchmark ({result['device']}, torch {result['torch']}, transformers {result['transformers']})",
        "",
        f"Copy bandwidth {(bandwidth or 0) / 1e12:.2f} TB/s. Timings: median of {result['repeats']} rounds, host "
        f"time included (synchronize around each generate() call); decode = (generate {result['new_tokens']} tokens "
        "- generate 1 token) / (tokens - 1); prefill = generate 1 token. Ratios against the fast-path base and the "
        "HF dynamic base of the same section.",
    ]
    if result.get("inductor_config"):
        lines += ["", f"torch._inductor.config for the compiled paths: {result['inductor_config']}."]
    for section in result["sections"]:
        rows = section["rows"]
        by = {(r["path"], r["method"]): r for r in rows if "error" not in r}
        fast_base, hf_base = by.get(("fast", "")), by.get(("hf-dynamic", ""))
        limit = section.get("hbm_limit_ms")
        lines += ["", f"## {section['name']} ({section.get('prompt_tokens')} prompt tokens, HBM limit "
                      f"{_fmt(limit, '.2f')} ms/token, LM weights {section.get('lm_weight_bytes', 0) / 1e9:.2f} GB)",
                  "", "| path | method | prefill ms | prefill speed-up vs fast base | decode ms/token | x HBM limit | "
                      "decode vs fast base | decode vs HF dynamic | KV MiB | warm-up s | error, capture error or token check |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            decode, prefill = r.get("decode_ms_per_token"), r.get("prefill_ms")

            def ratio(base, key, inverse=False):
                if base is None or r.get(key) is None or not base.get(key):
                    return ""
                value = base[key] / r[key] if inverse else r[key] / base[key]
                return f"{value:.2f}x"

            lines.append(
                f"| {r['path']} | {r['method'] or 'base'} | {_fmt(prefill)} | {ratio(fast_base, 'prefill_ms', True)} | "
                f"{_fmt(decode, '.2f')} | {_fmt(decode / limit if decode and limit else None, '.2f')} | "
                f"{ratio(fast_base, 'decode_ms_per_token')} | {ratio(hf_base, 'decode_ms_per_token')} | "
                f"{_fmt(r.get('kv_cache_mib'))} | {_fmt(r.get('warmup_s'))} | "
                f"{(r.get('error') or r.get('capture_error') or _tokens_note(r))[:120]} |"
            )
        if section["checks"]:
            lines += ["", "Checks (fast path vs dynamic path, greedy, 8 tokens; graph replay vs the same step eager):", "",
                      "| method | tokens equal | first mismatch step | first decode step max logit diff | "
                      "graph = eager tokens | graph vs eager max logit diff | error |", "|---|---|---|---|---|---|---|"]  # fmt: skip
            for c in section["checks"]:
                lines.append(
                    f"| {c['method']} | {c.get('tokens_equal', '')} | {_fmt(c.get('first_mismatch_step'), 'd')} | "
                    f"{_fmt(c.get('first_step_max_logit_diff'), '.3g')} | {c.get('graph_equals_eager_tokens', '')} | "
                    f"{_fmt(c.get('graph_vs_eager_max_logit_diff'), '.3g')} | {c.get('error', '')[:120]} |"
                )
    if result.get("family_checks"):
        lines += ["", "Tiny models of every family, left-padded batch of one and two images, 8 tokens (fast path vs "
                      "dynamic path; graph replay vs eager replay of the same step):", "",
                  "| family | method | tokens equal | max logit diff | graph = eager (bits) | graph vs eager max diff | error |",
                  "|---|---|---|---|---|---|---|"]
        for c in result["family_checks"]:
            lines.append(f"| {c['family']} | {c['spec'] or 'base'} | {c.get('tokens_equal', '')} | "
                         f"{_fmt(c.get('max_logit_diff'), '.3g')} | {c.get('graph_equals_eager', '')} | "
                         f"{_fmt(c.get('graph_vs_eager_max_diff'), '.3g')} | {c.get('error', '')[:120]} |")  # fmt: skip
    if result.get("skipped_sections"):
        lines += ["", f"Skipped (budget): {', '.join(result['skipped_sections'])}"]
    lines += ["", f"{len(result['errors'])} errors (traces in fast_bench.json); elapsed {result.get('elapsed_s')} s", ""]
    return "\n".join(lines)


def _inductor_settings(parser, text: str) -> dict:
    """--inductor "name=value,...": set on torch._inductor.config (values are Python literals); the settings made."""
    import ast

    import torch._inductor.config as inductor

    settings = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if not hasattr(inductor, name.strip()):
            parser.error(f"--inductor {item}: torch._inductor.config has no setting {name.strip()!r}")
        try:
            settings[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parser.error(f"--inductor {item}: the value must be a Python literal (True, 4, 'name')")
    for name, value in settings.items():
        setattr(inductor, name, value)
    return settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for fast_bench.json and fast_bench.md")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke run)")
    parser.add_argument("--budget", type=float, default=480, help="seconds; sections start only while it lasts")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", type=int, default=len(SECTIONS), help="run only the first N sections")
    numbered = "; ".join(f"{n} {section.name}" for n, section in enumerate(SECTIONS, 1))
    parser.add_argument("--only", help=f"comma-separated section numbers to run instead ({numbered})")
    labels = ", ".join(METHODS).replace("%", "%%")  # argparse formats help with %: "FastV 50%" must be escaped
    parser.add_argument("--methods", help=f"comma-separated labels to run (of {labels}); default all")
    parser.add_argument("--no-checks", dest="checks", action="store_false", help="skip the exactness checks")
    parser.add_argument("--compiled", action="store_true",
                        help='also time wrap(spec, fast="compile") for the base and every method (path fast-compiled)')
    parser.add_argument("--inductor", default="",
                        help="comma-separated torch._inductor.config settings for the compiled paths, e.g. "
                             "coordinate_descent_tuning=True,max_autotune=True (recorded in the results)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one prefill of the unwrapped, wrapped and fast-path model (profile_<path>.txt)")
    args = parser.parse_args(argv)
    if args.methods:
        args.methods = [label.strip() for label in args.methods.split(",")]
        unknown = [label for label in args.methods if label not in METHODS]
        if unknown:
            parser.error(f"unknown method labels {unknown}: choose from {', '.join(METHODS)}")
    if args.only:
        numbers = [n.strip() for n in args.only.split(",")]
        if not all(n.isdigit() and 1 <= int(n) <= len(SECTIONS) for n in numbers):
            parser.error(f"--only {args.only}: comma-separated section numbers from 1 to {len(SECTIONS)}")
        args.only = [int(n) for n in numbers]
    args.inductor = _inductor_settings(parser, args.inductor)
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be >= 2 and --repeats >= 1")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --tiny for the CPU smoke run")
    result = Bench(args).run()
    log((Path(args.out) / "fast_bench.md").read_text())
    return 1 if not result["sections"] else 0


if __name__ == "__main__":
    sys.exit(main())
