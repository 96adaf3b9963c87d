"""evals/sweep_diff.py: two sweep folders compared run by run (metrics and per-sample answers)."""

import json

import pytest

from vlm_efficient.evals.sweep_diff import diff_sweeps, main


def _run(folder, f1, answers):
    folder.mkdir(parents=True)
    results = {"testbed_pope": {"alias": "testbed_pope", "f1,none": f1, "f1_stderr,none": 0.1}}
    (folder / "results.json").write_text(json.dumps({"results": results}))
    (folder / "samples_testbed_pope.jsonl").write_text(
        "\n".join(json.dumps({"doc_id": i, "filtered_resps": [a]}) for i, a in enumerate(answers)))


def test_equal_runs_pass_and_a_changed_metric_or_answer_fails(tmp_path, capsys):
    before, after = tmp_path / "before", tmp_path / "after"
    _run(before / "base", 0.9, ["Yes", "No"])
    _run(after / "base", 0.9, ["Yes", "No"])
    _run(before / "fastv", 0.8, ["Yes", "No"])
    _run(after / "fastv", 0.8, ["Yes", "Yes"])  # same metric, one answer changed
    _run(before / "pai", 0.8, ["No", "No"])
    _run(after / "pai", 0.7, ["No", "No"])
    _run(after / "var", 0.7, ["No", "No"])
    report = diff_sweeps(before, after)
    by_run = {r["run"]: r for r in report["runs"]}
    assert by_run["base"]["metrics_equal"] and by_run["base"]["answers_equal"]
    assert by_run["fastv"]["metrics_equal"] and not by_run["fastv"]["answers_equal"]
    assert by_run["pai"]["changed_metrics"] == ["testbed_pope/f1,none"] and by_run["pai"]["answers_equal"]
    assert report["only_after"] == ["var"] and report["only_before"] == []
    assert main([str(before), str(after)]) == 1
    assert "3 runs in both: 1 with equal metrics and equal answers" in capsys.readouterr().out
    assert main([str(before / "base"), str(after / "base")]) == 0  # one eval folder against another


def test_a_folder_without_runs_is_refused_with_what_to_give(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path)])
    assert "sweep --output" in capsys.readouterr().err
