"""Two sweep (or eval) folders compared run by run: every metric and every per-sample answer. A change that must not
move results (a refactor, a new backend) is checked with the same `sweep` command before and after:

    python -m vlm_efficient.evals.sweep_diff BEFORE_DIR AFTER_DIR      # exits 1 when any shared run differs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _metrics(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())["results"]
    return {task: {k: v for k, v in m.items() if k.endswith(",none")} for task, m in results.items()}


def _answers(run: Path) -> dict:
    return {f.name: [json.loads(line)["filtered_resps"] for line in f.read_text().splitlines()]
            for f in sorted(run.glob("samples_*.jsonl"))}  # fmt: skip


def run_folders(root: Path) -> list[str]:
    """The runs of a sweep folder (its sub-folders with a results.json), or the folder itself for one eval run."""
    if (root / "results.json").exists():
        return ["."]
    return sorted(d.name for d in root.iterdir() if (d / "results.json").exists())


def diff_sweeps(before: Path, after: Path) -> dict:
    """{"runs": [{"run", "metrics_equal", "answers_equal", "changed_metrics"}], "only_before", "only_after"}."""
    a, b = run_folders(before), run_folders(after)
    rows = []
    for name in sorted(set(a) & set(b)):
        ma, mb = _metrics(before / name), _metrics(after / name)
        changed = sorted(f"{task}/{key}" for task in set(ma) | set(mb)
                         for key in set(ma.get(task, {})) | set(mb.get(task, {}))
                         if ma.get(task, {}).get(key) != mb.get(task, {}).get(key))  # fmt: skip
        rows.append({"run": name, "metrics_equal": not changed, "changed_metrics": changed,
                     "answers_equal": _answers(before / name) == _answers(after / name)})  # fmt: skip
    return {"runs": rows, "only_before": sorted(set(a) - set(b)), "only_after": sorted(set(b) - set(a))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    for folder in (args.before, args.after):
        if not folder.is_dir() or not run_folders(folder):
            ap.error(f"{folder}: no run with a results.json there (give a `sweep --output` or `eval --output` folder)")
    report = diff_sweeps(args.before, args.after)
    for row in report["runs"]:
        print(f"{row['run']:32s} metrics {'equal' if row['metrics_equal'] else 'DIFFER'}, "
              f"answers {'equal' if row['answers_equal'] else 'DIFFER'}"
              + (f"  ({', '.join(row['changed_metrics'])})" if row["changed_metrics"] else ""))
    for side in ("only_before", "only_after"):
        if report[side]:
            print(f"{side.replace('_', ' ')}: {', '.join(report[side])}")
    same = sum(r["metrics_equal"] and r["answers_equal"] for r in report["runs"])
    print(f"{len(report['runs'])} runs in both: {same} with equal metrics and equal answers")
    return 0 if same == len(report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
