"""The testbed table: `vlm-efficient sweep --methods all` covers every registered method; a small run of the table
on CPU gives the JSON, markdown and plots with every column computed from the saved answers."""

import json
import statistics

import pytest

from vlm_efficient.cli import main
from vlm_efficient.evals import runner
from vlm_efficient.evals.metrics import pope_scores
from vlm_efficient.evals.runner import load_eval_model
from vlm_efficient.evals.sweep import ALL, _name, _slug, all_specs, specs_for
from vlm_efficient.registry import METHODS


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLM_EFFICIENT_CACHE", str(tmp_path_factory.getbasetemp() / "vlm_efficient_cache"))


def test_all_covers_the_registry_and_lists_refusals():
    assert {_name(spec) for specs in ALL.values() for spec in specs} == set(METHODS)
    specs = all_specs([0.5, 0.889])
    # staged methods: three stages keeping q = (1 - R)^(1/3) each, so that the last one keeps 1 - R
    assert "pdrop:ratio=0.794" in specs and "sparsevlm:keep=0.481/0.231/0.111" in specs
    model, _ = load_eval_model("testbed")
    runnable, refused = specs_for(specs, [0.5, 0.889], model)
    assert runnable[:3] == ["", "fastv:layer=2,ratio=0.5", "fastv:layer=2,ratio=0.889"]
    assert {"gift:saliency_layer=1", "paint", "dyvte", "dyvte:rule=attention", "knockout", "pool:size=3"} <= set(runnable)
    assert sorted([*runnable, *refused]) == sorted(specs_for(specs, [0.5, 0.889])[0])  # each spec once, one way
    # refused with the model's reason: no default for an input (OCR heads), engine features missing; dyvte runs on
    # the gates shipped for the testbed
    assert "ocr_sink" in refused and all(refused.values())
    assert "heads=" in refused["ocr_sink"]


def test_table_on_the_testbed(tmp_path, monkeypatch, capsys):
    prepared = []
    prepare = runner.Batches.prepare
    monkeypatch.setattr(runner.Batches, "prepare", lambda self, rows: prepared.append(len(rows)) or prepare(self, rows))
    out = tmp_path / "table"
    tasks = ["testbed_pope", "testbed_chair", "testbed_vqa"]
    args = ["sweep", "--model", "testbed", "--methods", "fastv:layer=2;knockout", "--ratios", "0.889", "--tasks",
            ",".join(tasks), "--limit", "3", "--batch-size", "3", "--max-new-tokens", "8", "--speed-repeats", "1",
            "--output", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert prepared == [3, 3, 3, 1]  # each task's batch once for all three runs, then the batch-1 speed input

    table = json.loads((out / "sweep.json").read_text())
    rows = {r["methods"]: r for r in table["rows"]}
    assert list(rows) == ["base", "fastv:layer=2,ratio=0.889", "knockout"]
    assert [r["group"] for r in rows.values()] == ["base", "pruning", "masks"]
    assert [r["visual_tokens_kept"] for r in rows.values()] == [576, 64, 576]
    assert rows["fastv:layer=2,ratio=0.889"]["visual_tokens_avg"] == pytest.approx((2 * 576 + 4 * 64) / 6)
    assert table["config"]["documents"] == dict.fromkeys(tasks, 3) and table["not_run"] == {}
    columns = set(rows["base"]["metrics"])
    assert {f"testbed_pope{s} f1" for s in ("", "_random", "_popular", "_adversarial")} <= columns
    assert {"testbed_chair chair_s", "testbed_chair chair_i", "testbed_chair recall", "testbed_vqa accuracy"} <= columns
    assert any(c.startswith("testbed_vqa_") for c in columns)

    # every column is the metric of that run's saved answers, and the runs differ
    for spec, row in rows.items():
        samples = {t: [json.loads(line) for line in (out / _slug(spec) / f"samples_{t}.jsonl")
                       .read_text().splitlines()] for t in tasks}  # fmt: skip
        pope = samples["testbed_pope"]
        assert row["metrics"]["testbed_pope f1"] == pope_scores([s["filtered_resps"][0] for s in pope],
                                                                [s["target"] for s in pope])["f1"]  # fmt: skip
        random = [s for s in pope if s["category"] == "random"]
        assert row["metrics"]["testbed_pope_random f1"] == pope_scores(
            [s["filtered_resps"][0] for s in random], [s["target"] for s in random])["f1"]  # fmt: skip
        vqa = statistics.fmean(s["accuracy"] for s in samples["testbed_vqa"])
        assert row["metrics"]["testbed_vqa accuracy"] == pytest.approx(vqa, abs=1e-12)
        chair_s = statistics.fmean(bool(s["hallucinated"]) for s in samples["testbed_chair"])
        assert row["metrics"]["testbed_chair chair_s"] == pytest.approx(chair_s, abs=1e-12)
        assert 0 <= row["metrics"]["testbed_chair recall"] <= 1
        speed = row["batch1"]
        assert speed["ttft_ms"] > 0 and speed["decode_tokens_per_s"] > 0 and speed["ttft_speedup"] > 0
    assert rows["base"]["metrics"]["testbed_pope f1"] > 0.5  # the testbed sees; without question -> image it errs
    assert rows["base"]["metrics"] != rows["knockout"]["metrics"]
    assert rows["base"]["batch1"]["ttft_speedup"] == 1 and rows["base"]["prefill_speedup"] == 1

    markdown = (out / "sweep.md").read_text()
    assert markdown.startswith("Model `testbed` on cpu (float32)") and markdown.strip() in capsys.readouterr().out
    assert "| group | methods | testbed_pope f1 |" in markdown and "| TTFT ms (bs 1) |" in markdown
    assert "| pruning | fastv:layer=2,ratio=0.889 |" in markdown and "| masks | knockout |" in markdown
    for name in ("accuracy_vs_tokens.png", "latency_vs_accuracy.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_refused_spec_fails_outside_all(tmp_path, capsys):
    args = ["sweep", "--model", "testbed", "--methods", "fastv;ocr_sink", "--tasks", "testbed_pope",
            "--output", str(tmp_path / "x")]  # fmt: skip
    assert main(args) == 2
    assert "ocr_sink: give the OCR heads" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_all_lists_refused_and_failed_runs(tmp_path, monkeypatch, capsys):
    from vlm_efficient.evals import sweep

    monkeypatch.setattr(sweep, "ALL", {"pruning": ("fastv:layer=2",), "heads": ("ocr_sink",)})
    real = sweep.evaluate

    def fails_at_89(*args, methods, **kwargs):
        if methods.endswith("0.889"):
            raise RuntimeError("boom")
        return real(*args, methods=methods, **kwargs)

    monkeypatch.setattr(sweep, "evaluate", fails_at_89)
    out = tmp_path / "all"
    args = ["sweep", "--model", "tiny:llava", "--methods", "all", "--ratios", "0.5,0.889", "--tasks", "testbed_pope",
            "--limit", "2", "--batch-size", "2", "--max-new-tokens", "2", "--speed-repeats", "0", "--output", str(out),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    table = json.loads((out / "sweep.json").read_text())
    assert [r["methods"] for r in table["rows"]] == ["base", "fastv:layer=2,ratio=0.5"]
    assert list(table["not_run"]) == ["ocr_sink", "fastv:layer=2,ratio=0.889"]
    assert table["not_run"]["fastv:layer=2,ratio=0.889"] == "failed: RuntimeError: boom"
    captured = capsys.readouterr()
    assert "- `ocr_sink`: ocr_sink: give the OCR heads" in captured.out and "RuntimeError: boom" in captured.err
