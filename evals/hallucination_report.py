"""Each method's effect on hallucination, read from a sweep: the relative change of CHAIR_S, CHAIR_I and POPE's
adversarial F1 against the sweep's base, beside the effect the method's paper reports (`Method.reported`).

    python -m vlm_efficient.evals.hallucination_report SWEEP_DIR      # writes SWEEP_DIR/hallucination.{md,json}

A change is marked `*` where it exceeds two of the base's standard errors (the sweep's bootstrap / mean errors: a
rough screen, not a paired test). Caption recall is shown beside CHAIR, since a method that breaks the captions
names no object and so hallucinates none. The goal line names the method with the largest CHAIR_S cut that loses
no POPE F1 and no recall beyond that noise, and whether it reaches `--goal` (default: a 30% relative cut) by more
than the noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlm_efficient.registry import parse_methods


def _column(metrics: dict, task_kind: str, metric: str) -> str | None:
    """The sweep column of `metric` for the task whose name contains `task_kind` (its adversarial split for POPE)."""
    for column in metrics:
        task, _, name = column.rpartition(" ")
        if task_kind in task and name == metric:
            return column
    return None


def _reported(spec: str) -> str:
    return "; ".join(f"{m.name}: {m.reported}" for m in parse_methods(spec) if m.reported)


def report(summary: dict, goal: float = 0.3) -> dict:
    """The rows of the report (every non-base run of the sweep that has CHAIR or POPE) and the goal's verdict."""
    base = summary["rows"][0]
    if base["methods"] != "base":
        raise ValueError("the sweep has no base row first: rerun it with the base (every sweep starts with it)")
    columns = {
        "CHAIR_S": _column(base["metrics"], "chair", "chair_s"),
        "CHAIR_I": _column(base["metrics"], "chair", "chair_i"),
        "CHAIR_S, invented partners": _column(base["metrics"], "chair", "chair_s_partner"),  # testbed-lm's prior
        "caption recall": _column(base["metrics"], "chair", "recall"),
        "POPE adversarial F1": _column(base["metrics"], "pope_adversarial", "f1"),
    }
    columns = {k: v for k, v in columns.items() if v}
    if not columns:
        raise ValueError("the sweep has neither a CHAIR nor a POPE task: run it with --tasks ...chair,...pope")
    rows = []
    for row in summary["rows"][1:]:
        cells = {}
        for label, column in columns.items():
            before, after = base["metrics"][column], row["metrics"][column]
            noise = base["stderr"].get(column)
            cells[label] = {
                "base": before, "method": after,
                "relative": (after - before) / before if before else None,
                "beyond_noise": isinstance(noise, float) and abs(after - before) > 2 * noise,
            }  # fmt: skip
        reported = _reported(row["methods"])
        rows.append({"methods": row["methods"], "group": row["group"], "cells": cells, "reported": reported})
    verdict = None
    if "CHAIR_S" in columns:

        def keeps(r, label):
            c = r["cells"].get(label)
            return c is None or c["method"] >= c["base"] or not c["beyond_noise"]

        cuts = [r for r in rows if r["cells"]["CHAIR_S"]["relative"] is not None
                and keeps(r, "POPE adversarial F1") and keeps(r, "caption recall")]  # fmt: skip
        best = min(cuts, key=lambda r: r["cells"]["CHAIR_S"]["relative"], default=None)
        if best:
            cut, measurable = -best["cells"]["CHAIR_S"]["relative"], best["cells"]["CHAIR_S"]["beyond_noise"]
            verdict = {"best": best["methods"], "chair_s_cut": cut, "beyond_noise": measurable, "goal": goal,
                       "met": cut >= goal and measurable}  # fmt: skip
    return {"columns": columns, "rows": rows, "verdict": verdict, "config": summary["config"]}


def format_report(result: dict) -> str:
    config = result["config"]
    labels = list(result["columns"])
    docs = ", ".join(f"{t} {n}" for t, n in config["documents"].items())
    lines = [
        f"Model `{config['model']}` on {config['device_name']} ({config['dtype']}), greedy; documents: {docs}."
        " Relative change against the base of the same sweep; `*`: beyond two of the base's standard errors.", "",
        "| methods | " + " | ".join(f"{label} (base -> method, change)" for label in labels) + " | the paper reports |",
        "|" + "---|" * (len(labels) + 2),
    ]  # fmt: skip
    for r in result["rows"]:
        cells = []
        for label in labels:
            c = r["cells"][label]
            mark = "*" if c["beyond_noise"] else ""
            change = "n/a (base 0)" if c["relative"] is None else f"{c['relative']:+.0%}{mark}"
            cells.append(f"{c['base']:.3f} -> {c['method']:.3f}, {change}")
        lines.append(f"| {r['methods']} | " + " | ".join(cells) + f" | {r['reported'] or '-'} |")
    v = result["verdict"]
    if v:
        noise = "" if v["beyond_noise"] else ", within the base's noise, so not a measured cut"
        verdict = "met" if v["met"] else "missed"
        lines += ["", f"Largest CHAIR_S cut without a POPE or recall loss beyond noise: `{v['best']}`,"
                  f" {v['chair_s_cut']:.0%} relative{noise} (goal {v['goal']:.0%}: {verdict})."]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep's output directory (its sweep.json)")
    parser.add_argument("--goal", type=float, default=0.3, help="the relative CHAIR_S cut to reach (default 0.3)")
    args = parser.parse_args(argv)
    path = args.sweep_dir / "sweep.json"
    if not path.is_file():
        parser.error(f"{path} not found: give the --output directory of a finished `vlm-efficient sweep`")
    result = report(json.loads(path.read_text()), args.goal)
    (args.sweep_dir / "hallucination.json").write_text(json.dumps(result, indent=2))
    text = format_report(result)
    (args.sweep_dir / "hallucination.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
