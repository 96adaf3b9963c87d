"""`vlm-efficient eval`: results layout, samples, resuming after a kill, settings checks, bad input."""

import json

import pytest

from vlm_efficient.cli import main
from vlm_efficient.evals import runner
from vlm_efficient.evals.fixtures import write_fixtures
from vlm_efficient.evals.metrics import pope_scores
from vlm_efficient.evals.runner import evaluate, load_eval_model
from vlm_efficient.evals.tasks import get_task

TOKENS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("evals_runner_data"))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLM_EFFICIENT_CACHE", str(tmp_path_factory.getbasetemp() / "vlm_efficient_cache"))


@pytest.fixture(scope="module")
def tiny():
    return load_eval_model("tiny:llava")


def _samples(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_cli_results_layout(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--model", "tiny:llava", "--methods", "fastv:layer=2,ratio=0.5", "--tasks", "pope,testbed_mme",
            "--limit", "5", "--batch-size", "2", "--max-new-tokens", str(TOKENS), "--data-dir", str(data_dir),
            "--output", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "pope" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    for key in ("results", "configs", "versions", "n-samples", "config", "date", "higher_is_better", "efficiency"):
        assert key in results, key
    pope = results["results"]["pope"]
    assert {"f1,none", "f1_stderr,none", "pred_yes_ratio,none", "accuracy,none", "precision,none"} <= set(pope)
    assert {"pope_adversarial", "pope_popular", "pope_random", "testbed_mme", "testbed_mme_existence"} <= set(
        results["results"])  # fmt: skip
    assert results["n-samples"]["pope"] == {"original": 6, "effective": 5}
    assert results["config"]["model_args"] == "pretrained=tiny:llava,methods=fastv:layer=2,ratio=0.5"
    assert results["results"]["testbed_mme"]["perception_score_stderr,none"] == "N/A"

    samples = _samples(out / "samples_pope.jsonl")
    assert [s["doc_id"] for s in samples] == list(range(5))
    for s in samples:
        assert {"doc_id", "doc", "target", "resps", "filtered_resps", "input", "correct", "tp", "efficiency"} <= set(s)
        assert s["resps"] == [s["filtered_resps"]] and "<image>" in s["input"] and "image" not in s["doc"]
    # the results are the metrics of the saved predictions
    expect = pope_scores([s["filtered_resps"][0] for s in samples], [s["target"] for s in samples])
    assert pope["f1,none"] == expect["f1"] and pope["pred_yes_ratio,none"] == expect["pred_yes_ratio"]
    # efficiency: FastV keeps half of the 16 visual tokens of tiny:llava after layer 2 (of 4)
    eff = results["efficiency"]["pope"]
    assert eff["visual_tokens"] == 16 and eff["visual_tokens_kept"] == 8 and eff["visual_tokens_avg"] == 12
    assert eff["prefill_ms"] > 0 and eff["peak_memory_bytes"] > 0 and eff["batches"] == 3


def _strip(results):
    return {k: v for k, v in results.items() if k not in ("date", "efficiency")}


def test_resume_after_kill_gives_identical_results(tiny, data_dir, tmp_path, monkeypatch):
    model, processor = tiny
    kw = dict(methods="fastv:layer=2,ratio=0.5", limit=6, batch_size=2, max_new_tokens=TOKENS, data_dir=data_dir,
              model_name="tiny:llava", progress=False)  # fmt: skip
    tasks = ["pope", "testbed_vqa"]
    full = evaluate(model, processor, tasks, tmp_path / "full", **kw)

    calls = []
    real = runner.generate_batch

    def dies_after_two(model, processor, inputs, max_new_tokens):
        if max_new_tokens == TOKENS:  # not the warm-up
            calls.append(inputs)
            if len(calls) > 2:
                raise KeyboardInterrupt("killed")
        return real(model, processor, inputs, max_new_tokens)

    monkeypatch.setattr(runner, "generate_batch", dies_after_two)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, processor, tasks, out, **kw)
    assert not runner.vlm_efficient.is_wrapped(model)  # unwrapped on the way out
    assert len(_samples(out / "samples_pope.jsonl")) == 4  # two batches of two were written
    with open(out / "samples_pope.jsonl", "a") as f:
        f.write('{"doc_id": 4, "doc": {"question": "cut sho')  # a line cut short by the kill

    calls.clear()
    def counts(*args):
        if args[-1] == TOKENS:
            calls.append(1)
        return real(*args)

    monkeypatch.setattr(runner, "generate_batch", counts)
    resumed = evaluate(model, processor, tasks, out, **kw)
    assert len(calls) == 1 + 3  # pope's last batch, then all of testbed_vqa
    assert _strip(resumed) == _strip(full)
    for task in tasks:
        a, b = _samples(tmp_path / "full" / f"samples_{task}.jsonl"), _samples(out / f"samples_{task}.jsonl")
        assert [s["doc_id"] for s in b] == list(range(6))
        assert [{k: v for k, v in s.items() if k != "efficiency"} for s in a] == [
            {k: v for k, v in s.items() if k != "efficiency"} for s in b]  # fmt: skip

    calls.clear()
    stored = json.loads((out / "results.json").read_text())
    monkeypatch.setattr(runner.torch, "__version__", "0.0-rescorer")  # a later process, other software
    again = evaluate(model, processor, tasks, out, **kw)  # complete: nothing is generated again, only re-scored
    assert calls == [] and _strip(again) == _strip(full)
    # the software and date are those of the call that generated the samples, not of the re-scoring one
    assert again["versions_software"] == stored["versions_software"] and again["date"] == stored["date"]


def test_other_settings_refused(tiny, data_dir, tmp_path):
    model, processor = tiny
    kw = dict(limit=2, batch_size=2, max_new_tokens=TOKENS, data_dir=data_dir, progress=False)
    evaluate(model, processor, ["pope"], tmp_path, methods="", **kw)
    with pytest.raises(ValueError, match="other settings .*methods: '' -> 'fastv:ratio=0.5'.*another --output"):
        evaluate(model, processor, ["pope"], tmp_path, methods="fastv:ratio=0.5", **kw)


def test_refused_run_leaves_no_config_and_the_corrected_rerun_runs(tiny, data_dir, tmp_path):
    model, processor = tiny
    kw = dict(limit=2, batch_size=2, max_new_tokens=TOKENS, progress=False)
    with pytest.raises(ValueError, match="layer=9 must be in"):  # the spec does not fit the 4-layer model
        evaluate(model, processor, ["pope"], tmp_path, methods="fastv:layer=9", data_dir=data_dir, **kw)
    with pytest.raises(Exception, match="COCO"):  # the data is missing
        evaluate(model, processor, ["chair"], tmp_path, methods="fastv:layer=2", data_dir=tmp_path / "none", **kw)
    assert not (tmp_path / "run_config.json").exists()
    results = evaluate(model, processor, ["pope"], tmp_path, methods="fastv:layer=2", data_dir=data_dir, **kw)
    assert results["n-samples"]["pope"]["effective"] == 2
    assert json.loads((tmp_path / "run_config.json").read_text())["methods"] == "fastv:layer=2"


def test_bad_input(data_dir, tmp_path, capsys):
    assert main(["eval", "--model", "tiny:llava", "--tasks", "pope,nope", "--output", str(tmp_path)]) == 2
    assert "unknown task(s) nope" in capsys.readouterr().err
    # a real benchmark without its data: the message names the dataset and --data-dir
    args = ["eval", "--model", "tiny:llava", "--tasks", "chair", "--output", str(tmp_path / "x"), "--no-progress"]
    assert main(args) == 2
    assert "COCO" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny:nope", "--tasks", "pope", "--output", str(tmp_path / "y")]) == 2
    assert "tiny:llava" in capsys.readouterr().err


def test_model_testbed_needs_its_checkpoint_or_loads_it(monkeypatch, tmp_path):
    from vlm_efficient.evals import testbed

    monkeypatch.setattr(testbed, "TESTBED_DIR", tmp_path)
    with pytest.raises(ValueError, match="testbed checkpoint"):
        load_eval_model("testbed")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_other_families(family, tmp_path):
    model, processor = load_eval_model(f"tiny:{family}")
    results = evaluate(model, processor, ["testbed_pope"], tmp_path, methods="fastv:layer=2,ratio=0.75", limit=3,
                       batch_size=3, max_new_tokens=TOKENS, progress=False)  # fmt: skip
    eff = results["efficiency"]["testbed_pope"]
    assert eff["visual_tokens_kept"] < eff["visual_tokens"]
    assert get_task("testbed_pope").load(limit=3)["question"] == [
        s["doc"]["question"] for s in _samples(tmp_path / "samples_testbed_pope.jsonl")]  # fmt: skip


def test_data_parallel_equals_one_process(data_dir, tmp_path):
    """`accelerate launch` with two CPU processes (gloo): the same samples and results as one process."""
    import os
    import shutil
    import subprocess
    import sys

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not installed")
    args = ["eval", "--model", "tiny:llava", "--methods", "fastv:layer=2,ratio=0.5", "--tasks", "pope,testbed_pope",
            "--limit", "5", "--batch-size", "2", "--max-new-tokens", str(TOKENS), "--data-dir", str(data_dir),
            "--no-progress"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "vlm_efficient.cli", *args, "--output", str(tmp_path / "two")]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    assert one["results"] == two["results"] and one["n-samples"] == two["n-samples"]
    for task in ("pope", "testbed_pope"):
        a, b = (_samples(tmp_path / d / f"samples_{task}.jsonl") for d in ("one", "two"))
        assert [{k: v for k, v in s.items() if k != "efficiency"} for s in a] == [
            {k: v for k, v in s.items() if k != "efficiency"} for s in b]  # fmt: skip
        assert {s["efficiency"]["batch"] for s in b} == {0, 1, 2}
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "results.json", "run_config.json", "samples_pope.jsonl", "samples_testbed_pope.jsonl"]  # rank files merged
