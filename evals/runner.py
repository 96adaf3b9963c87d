"""Evaluate a model, wrapped with methods, on tasks: batched greedy generation, resumable, lmms-eval-style output.

    results = evaluate(model, processor, ["testbed_pope"], "runs/fastv", methods="fastv:layer=2,ratio=0.5")

Output directory:
    run_config.json           the settings, written once the run starts (the model took the spec, the data loaded);
                              a restart must use the same ones (else: another --output)
    samples_<task>.jsonl      one line per finished document (doc_id, doc, target, resps, filtered_resps, input,
                              the per-sample metric fields, efficiency), appended batch by batch as they finish
    results.json              lmms-eval's layout: results{task: {"metric,none": v, "metric_stderr,none": s}},
                              configs, versions, n-samples, config, date; plus efficiency{task: ...}

Resuming: documents are cut into the same batches whatever happened before, and a batch whose documents all have a
line is skipped, so a restarted run generates exactly the batches a run without interruption would have, and the
results (computed from the sorted lines) are identical. Under `accelerate launch`, batch i goes to process
i % world_size: each process writes its own samples file and the main process merges them.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

import vlm_efficient
from vlm_efficient.compare import FirstTokenClock
from vlm_efficient.compare import synchronize as _sync

from .tasks import Task, get_task

SETTINGS = ("model", "methods", "limit", "batch_size", "max_new_tokens", "dtype", "data_dir")


def load_eval_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """'testbed' (the committed checkpoint), 'tiny:<family>', a local directory or a hub id -> (model, processor)."""
    if name == "testbed":
        from .testbed import TESTBED_DIR, load_testbed

        if not (TESTBED_DIR / "config.json").exists():
            raise ValueError(
                f"the testbed checkpoint is not in {TESTBED_DIR} yet: train it with `python -m "
                "vlm_efficient.evals.testbed.train --out DIR` and pass --model DIR, or use --model tiny:llava"
            )
        return load_testbed(device, dtype)
    from vlm_efficient.models import load_model

    return load_model(name, device=device, dtype=dtype)


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (Linux: KiB)


def batch_inputs(processor, prompts: list[str], images: list[list], model, videos: list[list] | None = None):
    """The processor's left-padded batch of `prompts` and their images (and clips: lists of frames), on the model's
    device, pixels in its dtype (model None: as the processor made them, on the CPU)."""
    flat = [im for ims in images for im in ims]
    clips = {"videos": [clip for sample in videos for clip in sample]} if videos else {}  # image-only processors: none
    inputs = processor(images=flat or None, text=prompts, padding=True, padding_side="left", return_tensors="pt",
                       **clips)  # fmt: skip
    if model is None:
        return inputs
    inputs = inputs.to(next(model.parameters()).device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)
    return inputs


def describe_inputs(processor, image_size: int, batch_size: int, model=None, video_frames: int = 0):
    """batch_inputs of `batch_size` synthetic square images and a request to describe each (the benchmarks' input);
    with `video_frames`, one synthetic clip of that many frames per sample instead of the image."""
    from vlm_efficient.models import build_prompt
    from vlm_efficient.testing import tiny_image, tiny_video

    size = (image_size, image_size)
    if video_frames:
        if getattr(processor, "video_token", None) is None:
            raise ValueError(f"--video-frames: {type(processor).__name__} takes no videos; use a Qwen architecture")
        prompt = build_prompt(processor, "Please describe this video in detail.", num_images=0, num_videos=1)
        videos = [[tiny_video(i, frames=video_frames, size=size)] for i in range(batch_size)]
        return batch_inputs(processor, [prompt] * batch_size, [[]] * batch_size, model, videos)
    prompt = build_prompt(processor, "Please describe this image in detail.")
    images = [[tiny_image(i, size=size)] for i in range(batch_size)]
    return batch_inputs(processor, [prompt] * batch_size, images, model)


def generate_batch(model, processor, inputs, max_new_tokens: int):
    """Greedy answers for a batch of `batch_inputs`, with timing and the engine's statistics of the call."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    clock = FirstTokenClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             logits_processor=LogitsProcessorList([clock]))  # fmt: skip
    _sync(device)
    end = time.perf_counter()
    n_in = inputs["input_ids"].shape[1]
    texts = [t.strip() for t in processor.batch_decode(out[:, n_in:], skip_special_tokens=True)]
    s = vlm_efficient.stats(model)
    steps, batch = out.shape[1] - n_in, out.shape[0]
    prefill_s, decode_s = clock.at - start, end - clock.at
    efficiency = {
        "batch_size": batch,
        "prefill_ms": 1e3 * prefill_s,  # time to first token: vision tower + prefill
        "decode_tokens_per_s": batch * (steps - 1) / decode_s if steps > 1 and decode_s > 0 else None,
        "new_tokens": steps,
        "prompt_tokens": statistics.fmean(s.prompt_tokens),
        "visual_tokens": statistics.fmean(s.visual_tokens),
        "visual_tokens_kept": s.visual_tokens_per_layer[-1],  # after every pruning layer
        "visual_tokens_avg": statistics.fmean(s.visual_tokens_per_layer),  # average over layers
        "tokens_avg": s.average_tokens,
        "kv_cache_bytes": s.kv_cache_bytes / batch,
        "prefill_flops": s.prefill_flops["total"] / batch,
        "peak_memory_bytes": _peak_memory(device),
    }
    return texts, efficiency


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _read_samples(paths) -> dict[int, dict]:
    """doc_id -> sample over all files; a line cut short by a kill is ignored."""
    done = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done.setdefault(record["doc_id"], record)
    return done


def _trim_partial_line(path: Path) -> None:
    """Drop a trailing line without its newline (the process was killed mid-write) before appending to the file."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def dist_state():
    """accelerate's PartialState under `accelerate launch` / torchrun (WORLD_SIZE > 1), else None. Without CUDA
    the processes talk through gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState(cpu=not torch.cuda.is_available())
    return None


def _dist():
    state = dist_state()
    return (state.process_index, state.num_processes, state) if state is not None else (0, 1, None)


class Batches:
    """A task's documents (the first `limit`) cut into batches of `batch_size`, each prepared when first asked for:
    prompts built, images through the processor, on the model's device. With keep=True prepared batches are kept, so
    that a sweep runs every method on the same inputs and prepares them once (the image processor costs more than
    the testbed's forward)."""

    def __init__(self, task: Task, processor, model, limit=None, batch_size=8, keep=False):
        self.task, self.processor, self.model, self.keep = task, processor, model, keep
        self.docs = task.load(limit)
        n = len(self.docs)
        self.ids = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        self._kept: dict[int, tuple] = {}

    def __getitem__(self, i: int) -> tuple[list[dict], list[str], dict]:
        """(documents without their images, prompt texts, model inputs) of batch i."""
        if i in self._kept:
            return self._kept[i]
        rows = [self.docs[d] for d in self.ids[i]]
        batch = ([{key: v for key, v in row.items() if _jsonable(v)} for row in rows], *self.prepare(rows))
        if self.keep:
            self._kept[i] = batch
        return batch

    def prepare(self, rows) -> tuple[list[str], dict]:
        """Prompt texts and model inputs of documents `rows`."""
        from vlm_efficient.models import build_prompt

        images = [self.task.images(r) for r in rows]
        texts = [build_prompt(self.processor, self.task.prompt(r), num_images=len(im)) for r, im in zip(rows, images)]
        return texts, batch_inputs(self.processor, texts, images, self.model)


def _device_label(model) -> str:
    """The model's device, with the GPU's name: "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"."""
    device = next(model.parameters()).device
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def run_task(model, processor, batches: Batches, out: Path, *, max_new_tokens=None, progress=True, rank=0, world=1,
             state=None, warm_up=True):  # fmt: skip
    """Generate every missing batch owned by this process (with `warm_up`, the first one also once before, untimed);
    returns (all samples, whether any document of any rank lacked a sample before this call) on the main process,
    else (None, the same flag)."""
    from tqdm.auto import tqdm

    task = batches.task
    n, tokens = len(batches.docs), max_new_tokens or task.max_new_tokens
    final = out / f"samples_{task.name}.jsonl"
    mine = final if world == 1 else out / f"samples_{task.name}.rank{rank}.jsonl"
    _trim_partial_line(mine)
    done = _read_samples(sorted(out.glob(f"samples_{task.name}*.jsonl")))
    fresh = any(d not in done for d in range(n))  # the same on every rank: all ranks' samples were read
    owned = [(i, b) for i, b in enumerate(batches.ids) if i % world == rank]
    todo = [(i, b) for i, b in owned if not all(d in done for d in b)]
    # leave=None: kept on screen unless nested under the bar of a sweep
    bar = tqdm(total=sum(len(b) for _, b in owned), initial=sum(len(b) for _, b in owned) - sum(len(b) for _, b in todo),
               desc=task.name, unit="doc", leave=None, disable=not progress or rank != 0)  # fmt: skip
    with open(mine, "a") as f:
        for k, (i, ids) in enumerate(todo):
            docs, texts, inputs = batches[i]
            if k == 0 and warm_up:  # allocator, kernel choice, first calls; greedy, so the answers do not change
                generate_batch(model, processor, inputs, 2)
            preds, efficiency = generate_batch(model, processor, inputs, tokens)
            lines = []
            for d, doc, text, pred in zip(ids, docs, texts, preds):
                record = {"doc_id": d, "doc": doc, "target": task.target(doc),
                          "arguments": {"max_new_tokens": tokens, "do_sample": False}, "resps": [[pred]],
                          "filtered_resps": [pred], "input": text, **task.score(doc, pred),
                          "efficiency": {"batch": i, "device": _device_label(model), **efficiency}}  # fmt: skip
                lines.append(json.dumps(record) + "\n")
            f.write("".join(lines))  # one write per batch, flushed: a kill loses at most the batch in flight
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(ids))
    bar.close()
    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return None, fresh
    parts = sorted(out.glob(f"samples_{task.name}*.jsonl"))
    done = _read_samples(parts)
    missing = [d for d in range(n) if d not in done]
    if missing:
        raise RuntimeError(f"{task.name}: {len(missing)} documents have no sample (e.g. doc {missing[0]})")
    samples = [done[d] for d in range(n)]
    tmp = final.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(s) + "\n" for s in samples))
    tmp.replace(final)
    for part in parts:
        if part != final:
            part.unlink()
    return samples, fresh


def efficiency_summary(samples: list[dict]) -> dict:
    """Per-task means over documents of the batch-level figures (peak memory: the maximum)."""
    eff = [s["efficiency"] for s in samples]
    out = {}
    for key in ("prefill_ms", "decode_tokens_per_s", "new_tokens", "prompt_tokens", "visual_tokens",
                "visual_tokens_kept", "visual_tokens_avg", "tokens_avg", "kv_cache_bytes", "prefill_flops"):  # fmt: skip
        values = [e[key] for e in eff if e.get(key) is not None]
        out[key] = statistics.fmean(values) if values else None
    out["peak_memory_bytes"] = max(e["peak_memory_bytes"] for e in eff)
    out["batches"] = len({e["batch"] for e in eff})
    return out


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse a run into `out` if it holds one with other settings."""
    path = out / "run_config.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), settings[k]) for k in SETTINGS if old.get(k) != settings[k]}
        if diff:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds a run with other settings ({details}): use another --output or delete it")


def _write_settings(out: Path, settings: dict) -> None:
    """Record the settings once the run starts: a run refused before (a spec the model rejects, missing data) leaves
    no config behind to refuse its corrected rerun."""
    path = out / "run_config.json"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))


def evaluate(model, processor, tasks, output, *, methods: str = "", limit=None, batch_size: int = 8,
             max_new_tokens=None, data_dir=None, model_name: str = "", progress: bool = True,
             batches: dict | None = None) -> dict | None:  # fmt: skip
    """Run `tasks` (names) with `model` wrapped in `methods` ("" = the base model); write and return the results
    (None on processes other than the main one). `batches`: a dict shared by calls with the same model, tasks,
    limit and batch size (a sweep); each task's prepared batches are kept in it and reused."""
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError("--batch-size and --limit must be at least 1")
    task_objs = [get_task(t, data_dir) for t in tasks]  # unknown names fail before any work
    rank, world, state = _dist()
    out = Path(output)
    settings = {"model": model_name, "methods": methods, "limit": limit, "batch_size": batch_size,
                "max_new_tokens": max_new_tokens, "dtype": str(model.dtype).replace("torch.", ""),
                "data_dir": str(data_dir) if data_dir else None}  # fmt: skip
    if rank == 0:
        _check_settings(out, settings)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    devices = set()  # where the samples were generated (a resumed run may have started elsewhere)
    generated = False  # whether this call generated samples (else it only re-scores stored ones)
    for key in ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "efficiency"):  # fmt: skip
        results.setdefault(key, {})
    vlm_efficient.wrap(model, methods)  # a spec the model refuses fails here, before anything is written
    try:
        kept = {} if batches is None else batches
        for task in task_objs:  # every task's documents load (or fail) before anything is written
            if task.name not in kept:
                kept[task.name] = Batches(task, processor, model, limit, batch_size, keep=batches is not None)
        if rank == 0:
            _write_settings(out, settings)
        if state is not None:
            state.wait_for_everyone()
        for index, task in enumerate(task_objs):
            task = kept[task.name].task
            # one warm-up per call: the model is warm for the later tasks
            samples, new = run_task(model, processor, kept[task.name], out, max_new_tokens=max_new_tokens,
                                    progress=progress, rank=rank, world=world, state=state, warm_up=index == 0)  # fmt: skip
            generated |= new
            if samples is None:
                continue
            recorded = results.get("config", {}).get("device", _device_label(model))  # samples older than the field
            devices |= {s.get("efficiency", {}).get("device", recorded) for s in samples}
            aggregated = task.aggregate(samples)
            for name, values in aggregated.items():
                entry = {"alias": name}
                for metric, (value, stderr) in values.items():
                    entry[f"{metric},none"] = value
                    entry[f"{metric}_stderr,none"] = "N/A" if stderr is None else stderr
                results["results"][name] = entry
            results["group_subtasks"][task.name] = [k for k in aggregated if k != task.name]
            results["configs"][task.name] = task.config()
            results["versions"][task.name] = task.version
            results["n-shot"][task.name] = 0
            results["higher_is_better"][task.name] = task.higher_is_better
            results["n-samples"][task.name] = {"original": task.n_total, "effective": len(samples)}
            results["efficiency"][task.name] = efficiency_summary(samples)
    finally:
        vlm_efficient.unwrap(model)
    if rank != 0:
        return None
    results["config"] = {"model": "vlm_efficient", "model_args": f"pretrained={model_name},methods={methods}",
                         **settings, "device": ", ".join(sorted(devices)) or _device_label(model),
                         "world_size": world}  # fmt: skip
    import transformers

    if generated or "versions_software" not in results:  # a call that only re-scores keeps the generating software
        results["versions_software"] = {"vlm_efficient": _version(), "torch": torch.__version__,
                                        "transformers": transformers.__version__}  # fmt: skip
        results["date"] = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(results_path)
    return results


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlm-efficient")
    except PackageNotFoundError:
        return "unknown"


def format_results(results: dict) -> str:
    """A plain table: result name, metric, value +- stderr."""
    lines = [f"{'task':<28} {'metric':<18} {'value':>10} {'stderr':>8}"]
    for name, entry in results["results"].items():
        for key, value in entry.items():
            if key == "alias" or "_stderr," in key:
                continue
            metric = key.split(",")[0]
            stderr = entry.get(f"{metric}_stderr,none", "N/A")
            stderr = f"{stderr:.4f}" if isinstance(stderr, float) else stderr
            lines.append(f"{name:<28} {metric:<18} {value:>10.4f} {stderr:>8}")
    for task, e in results.get("efficiency", {}).items():
        tps = "n/a" if e["decode_tokens_per_s"] is None else f"{e['decode_tokens_per_s']:.1f}"
        lines.append(
            f"{task}: visual tokens {e['visual_tokens']:.1f} -> kept {e['visual_tokens_kept']:.1f} "
            f"(avg over layers {e['visual_tokens_avg']:.1f}); prefill {e['prefill_ms']:.1f} ms/batch; "
            f"decode {tps} tokens/s; peak memory {e['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
    return "\n".join(lines)
