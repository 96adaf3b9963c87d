"""`vlm-efficient sweep`: `eval` for the base model and every method x ratio, then one table and two plots.

    sweep(model, processor, ["testbed_pope", "testbed_vqa"], "runs/sweep", methods=["fastv:layer=2"],
          ratios=[0.5, 0.75, 0.889])

`methods=["all"]` runs every registered method (ALL). A method with a `ratio` parameter that its spec leaves open runs
at each ratio, any other spec once. Every spec is bound to the model before the first run: a spec it refuses fails
the sweep, except under "all", where it is listed under the table with the model's reason (an input without a
default), as is a run that fails there (its traceback printed; the other runs go on). Each run lives in its own
sub-directory (resumable like `eval`); the documents are prepared once (prompts, image processor) and reused by every
run.

The table has one row per run: each task's main metric overall and per split or group (POPE F1 per negative-sampling
split, VQA accuracy per question type; a task without splits: each of its metrics, e.g. CHAIR_S, CHAIR_I, recall),
visual tokens kept (after pruning, and averaged over layers), the mean time to first token of the eval batches (one
pass: labelled as a single run), and batch-1 speed measured in this process (`bench.measure`: time to first token and
decode tokens/s, best of rounds with the rounds' range; the base unwrapped) with the speed-ups over the base and the
range of their per-round ratios. Writes sweep.md, sweep.json, accuracy_vs_tokens.png and
latency_vs_accuracy.png.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import traceback
from pathlib import Path

from .bench import add_ratios, measure, with_spread
from .runner import _dist, evaluate
from .tasks import get_task

# `methods=["all"]`: every registered method, grouped (a test checks that none is missing). Specs with an open ratio
# run at each ratio R (the share of image tokens pruned: 0.5 / 0.75 / 0.889 -> 288 / 144 / 64 of 576 kept); the
# staged methods prune in three stages that keep the same share q = (1 - R)^(1/3) each, so the last keeps 1 - R.
# Defaults that a model refuses stay listed (the table says why) beside a setting that runs.
ALL = {
    "pruning": ("fastv:layer=2", "dart:layer=2", "pdrop:ratio={q}", "sparsevlm:keep={q}/{q2}/{q3}", "divprune",
                "visionzip", "fastervlm", "vmtc", "random", "pool:size=2", "pool:size=3", "dyvte",
                "dyvte:rule=attention", "yopo", "avl", "plphp", "streaming"),
    "heads": ("pai", "vaf", "var", "act", "ocr_sink", "vhr", "gift", "gift:saliency_layer=1", "paint", "adaptvis",
              "memvr"),
    "masks": ("naavit", "ee_mllm", "window", "cmai", "knockout", "aki", "equal_distance", "frame_causal"),
    "video": ("dycoke", "dual_rope"),  # dycoke acts on video frames only: a no-op on the testbed's images
}  # fmt: skip
SPEED_TOKENS = 16  # new tokens of the batch-1 speed measurement


def _name(spec: str) -> str:
    """The methods of a spec without their parameters: "fastv:layer=2,ratio=0.5+pai" -> "fastv+pai"."""
    return "+".join(part.split(":")[0].strip() for part in spec.split("+"))


def _group(spec: str) -> str:
    """"base", or the ALL group of the spec's first method."""
    first = _name(spec).split("+")[0]
    return "base" if not spec else next((g for g, specs in ALL.items() if first in map(_name, specs)), "")


def all_specs(ratios: list[float]) -> list[str]:
    """ALL with the staged methods' shares filled in for each ratio (open ratios are left to specs_for)."""
    specs = []
    for spec in (s for group in ALL.values() for s in group):
        if "{q}" not in spec:
            specs.append(spec)
            continue
        for ratio in ratios:
            q = (1 - ratio) ** (1 / 3)
            specs.append(spec.format(q=f"{q:.3g}", q2=f"{q**2:.3g}", q3=f"{q**3:.3g}"))
    return specs


def specs_for(methods: list[str], ratios: list[float], model=None) -> tuple[list[str], dict[str, str]]:
    """(specs, refused): "" (the base), then each method spec once per ratio when the method has a `ratio` parameter
    that the spec leaves open, else once as given (e.g. "pool:size=2"). With `model`, each spec is also bound to it
    once: those it refuses (a ratio or layer out of range, a missing input) are left out of `specs` and returned in
    `refused` with the reason, before any run. A spec that does not parse fails at once."""
    import dataclasses

    import vlm_efficient
    from vlm_efficient import parse_methods

    specs = [""]
    for method in (m.strip() for m in methods):
        if not method:
            continue
        parsed = parse_methods(method)
        open_ratio = len(parsed) == 1 and "ratio" in {f.name for f in dataclasses.fields(parsed[0])}
        if open_ratio and not re.search(r"[:,]ratio=", method):
            sep = "," if ":" in method else ":"
            specs += [f"{method}{sep}ratio={ratio:g}" for ratio in ratios]
        else:
            specs.append(method)
    refused = {}
    for spec in specs:
        parse_methods(spec)
        if model is not None:
            try:
                vlm_efficient.unwrap(vlm_efficient.wrap(model, spec))
            except ValueError as error:
                refused[spec] = str(error)
    return [s for s in specs if s not in refused], refused


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec) or "base"


def task_columns(results: dict, task: str, main: str) -> dict[str, tuple[str, str]]:
    """The table's columns of one task, as column name -> (result name, metric): its main metric overall and in
    each split or group that has it; for a task without such splits, each of its metrics."""
    subs = [n for n in results["group_subtasks"][task] if f"{main},none" in results["results"][n]]
    if subs:
        return {f"{n} {main}": (n, main) for n in [task, *subs]}
    metrics = [k.split(",")[0] for k in results["results"][task] if k.endswith(",none") and "_stderr," not in k]
    return {f"{task} {m}": (task, m) for m in metrics}


def _row(spec: str, results: dict, tasks: list[str], main: dict[str, str]) -> dict:
    """One table row from a run's results."""
    eff = [results["efficiency"][t] for t in tasks]
    columns = {k: v for t in tasks for k, v in task_columns(results, t, main[t]).items()}
    return {
        "methods": spec or "base",
        "group": _group(spec),
        "metrics": {c: results["results"][n][f"{m},none"] for c, (n, m) in columns.items()},
        "stderr": {c: results["results"][n][f"{m}_stderr,none"] for c, (n, m) in columns.items()},
        "visual_tokens": statistics.fmean(e["visual_tokens"] for e in eff),
        "visual_tokens_kept": statistics.fmean(e["visual_tokens_kept"] for e in eff),
        "visual_tokens_avg": statistics.fmean(e["visual_tokens_avg"] for e in eff),
        "prefill_ms": statistics.fmean(e["prefill_ms"] for e in eff),
    }


def sweep(model, processor, tasks: list[str], output, *, methods: list[str], ratios: list[float],
          speed_repeats: int = 3, **eval_kwargs):  # fmt: skip
    """Run the sweep (eval_kwargs go to `evaluate`); write the table, JSON and plots to `output` and return the
    markdown (None on processes other than the main one)."""
    from tqdm.auto import tqdm

    if speed_repeats < 0:
        raise ValueError("--speed-repeats must be >= 0 (0: no batch-1 speed measurement)")
    everything = [m.strip() for m in methods] == ["all"]
    specs, not_run = specs_for(all_specs(ratios) if everything else methods, ratios, model)
    if not_run and not everything:
        raise ValueError("; ".join(f"{spec}: {why}" for spec, why in not_run.items()))
    main = {t: get_task(t).main_metric for t in tasks}
    batches: dict = {}  # each task's prepared documents, shared by all runs
    rows, speed_inputs, base_results = [], None, None
    bar = tqdm(specs, desc="sweep", unit="run", disable=not eval_kwargs.get("progress", True) or _dist()[0] != 0)
    for spec in bar:
        bar.set_postfix_str(spec or "base")
        try:
            results = evaluate(model, processor, tasks, Path(output) / _slug(spec), methods=spec, batches=batches,
                               **eval_kwargs)  # fmt: skip
            if results is None:  # not the main process
                continue
            row = _row(spec, results, tasks, main)
            if speed_repeats:
                if speed_inputs is None:  # the first document of the first task, alone
                    first = batches[tasks[0]]
                    speed_inputs = first.prepare([first.docs[0]])[1]
                row["batch1"] = measure(model, speed_inputs, spec, SPEED_TOKENS, speed_repeats)
        except Exception as error:  # under "all", a run that fails is listed with its error and the others go on
            if not everything or not spec:
                raise
            traceback.print_exc()
            not_run[spec] = f"failed: {type(error).__name__}: {error}"
            continue
        base_results = results if not spec else base_results
        rows.append(row)
    if not rows:
        return None
    base = rows[0]
    for row in rows:
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        if speed_repeats:
            add_ratios(row["batch1"], base["batch1"])
    config = {**{k: v for k, v in base_results["config"].items() if k not in ("methods", "model_args")},
              "device_name": base_results["config"]["device"], "kernels": os.environ.get("VLM_EFFICIENT_KERNELS", "auto"),
              "documents": {t: base_results["n-samples"][t]["effective"] for t in tasks},
              "max_new_tokens": {t: base_results["config"]["max_new_tokens"] or get_task(t).max_new_tokens
                                 for t in tasks},
              "speed": {"batch_size": 1, "new_tokens": SPEED_TOKENS, "repeats": speed_repeats, "input": tasks[0]},
              "versions": base_results["versions_software"]}  # fmt: skip
    table = format_table(rows, config, not_run)
    out = Path(output)
    summary = {"tasks": tasks, "main_metric": main, "config": config, "rows": rows, "not_run": not_run}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    (out / "sweep.md").write_text(table + "\n")
    plot_sweep(rows, tasks, main, out)
    return table


def format_table(rows: list[dict], config: dict, not_run: dict[str, str]) -> str:
    """Markdown: what was run where, one row per run, then the specs not run and why."""
    columns = list(rows[0]["metrics"])
    speed = "batch1" in rows[0]
    docs = ", ".join(f"{t} {n}" for t, n in config["documents"].items())
    errors = ", ".join(f"{c} {e:.3f}" for c, e in rows[0]["stderr"].items() if isinstance(e, float))
    notes = [
        (f"Model `{config['model']}` on {config['device_name']} ({config['dtype']}), greedy; documents: {docs}; eval"
         f" batches of {config['batch_size']}; VLM_EFFICIENT_KERNELS={config['kernels']}. Every column was measured on"
         " this device."),
        f"Standard errors of the base (bootstrap for ratios, else of the mean): {errors}.",
        ("`prefill ms`: mean time to first token of the eval batches (vision tower + prefill; the base under a no-op"
         " wrap), one pass over them (1 run: no spread, a shared host's noise included); its speed-up is base /"
         " method."),
    ]  # fmt: skip
    if speed:
        s = config["speed"]
        rounds = (f"best of {s['repeats']} rounds after a warm-up [the range over the rounds; speed-ups: the range of"
                  " the per-round ratios: one that holds 1.00x is no measurable change]" if s["repeats"] > 1 else
                  "one timed round after a warm-up (1 run: no spread; --repeats 3 or more shows it)")  # fmt: skip
        notes.append(f"TTFT / decode: batch 1 (the first {s['input']} document), {s['new_tokens']} new tokens, {rounds},"
                     " all in the same process; the base unwrapped (plain SDPA). Speed-ups: base / method TTFT,"
                     " method / base decode tokens/s.")  # fmt: skip
    head = ["group", "methods", *columns, "visual tokens kept", "avg over layers", "prefill ms (eval, 1 pass)",
            "prefill speed-up (1 pass)"]
    head += ["TTFT ms (bs 1)", "TTFT speed-up", "decode tok/s (bs 1)", "decode speed-up"] if speed else []
    lines = [" ".join(notes), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["group"], r["methods"], *(f"{r['metrics'][c]:.3f}" for c in columns),
                 f"{r['visual_tokens_kept']:.1f} / {r['visual_tokens']:.0f}", f"{r['visual_tokens_avg']:.1f}",
                 f"{r['prefill_ms']:.1f}", f"{r['prefill_speedup']:.2f}x"]  # fmt: skip
        if speed:
            b = r["batch1"]
            cells += [with_spread(b["ttft_ms"], b["rounds"]["ttft_ms"]),
                      with_spread(b["ttft_speedup"], b["rounds"]["ttft_speedup"], ".2f", "x"),
                      with_spread(b["decode_tokens_per_s"], b["rounds"]["decode_tokens_per_s"], ".0f"),
                      with_spread(b["decode_speedup"], b["rounds"]["decode_speedup"], ".2f", "x")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if not_run:
        lines += ["", "Not run (refused by the model when wrapped, or failed):", ""]
        lines += [f"- `{spec}`: {why}" for spec, why in not_run.items()]
    return "\n".join(lines)


def plot_sweep(rows, tasks, main, out: Path) -> None:
    """Each task's main metric against visual tokens kept (the runs that keep fewer than the base) and against latency
    (batch-1 TTFT when measured, else the eval batches' prefill ms); a line joins a method's ratios in the first,
    one marker shape per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = "batch1" in rows[0]
    markers = {"base": "*", "pruning": "o", "heads": "^", "masks": "s"}
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(_name(r["methods"]), []).append(r)
    groups = {label: points[0]["group"] for label, points in series.items()}
    order = list(groups.values())  # colours count within a group: (colour, marker) tells methods apart
    style = {label: {"color": plt.get_cmap("tab20")(order[:i].count(g) % 20), "marker": markers.get(g, "D")}
             for i, (label, g) in enumerate(groups.items())}  # fmt: skip
    base = rows[0]
    for name, xlabel, x_of, shown, line in (
        ("accuracy_vs_tokens", "visual tokens kept", lambda r: r["visual_tokens_kept"],
         lambda r: r is base or r["visual_tokens_kept"] < base["visual_tokens_kept"], "-"),
        ("latency_vs_accuracy", "TTFT ms (batch 1)" if speed else "prefill ms per batch",
         (lambda r: r["batch1"]["ttft_ms"]) if speed else (lambda r: r["prefill_ms"]), lambda r: True, "none"),
    ):  # fmt: skip
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks) + 2, 4), squeeze=False, layout="constrained")
        for ax, task in zip(axes[0], tasks):
            column = f"{task} {main[task]}"
            for label, points in series.items():
                points = sorted(filter(shown, points), key=x_of)
                if points:
                    ax.plot([x_of(p) for p in points], [p["metrics"][column] for p in points], label=label, ls=line,
                            lw=0.8, ms=9 if label == "base" else 4, **style[label])  # fmt: skip
            ax.set_xlabel(xlabel)
            ax.set_ylabel(column)
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=6)
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
