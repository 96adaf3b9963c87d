"""The library's surface under bad input and small samples (issue 19): strict spec parsing with hints that hold,
clear one-line CLI errors, a Qwen directory without torchvision, `eval` refusing without leaving a config behind,
bootstrap standard errors on tiny splits, speed with its spread over repeats, `bench` on CPU."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import vlm_efficient as ve
from vlm_efficient.cli import main
from vlm_efficient.registry import split_specs
from vlm_efficient.testing import save_tiny, tiny_model

# ----------------------------------------------------------------------------------------------------------------
# Spec parsing


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fastv:layer=2,layer=3", "parameter 'layer' is given twice"),
        ("fastv:ratio=0.5,layer=2,ratio=0.5", "parameter 'ratio' is given twice"),
        ("fastv++dart", "has an empty method"),
        ("fastv+", "has an empty method"),
        ("+fastv", "has an empty method"),
        ("fastv+ +dart", "has an empty method"),
    ],
)
def test_duplicate_parameters_and_empty_methods_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        ve.parse_methods(spec)


def test_spec_lists_refuse_empty_segments():
    assert split_specs("fastv; dart:layer=2") == ["fastv", "dart:layer=2"]
    assert split_specs("") == split_specs("  ") == []
    for text in ("fastv;;dart", "fastv;", ";fastv"):
        with pytest.raises(ValueError, match="has an empty spec"):
            split_specs(text)
    with pytest.raises(ValueError, match="has an empty method"):
        split_specs("fastv;dart+")


# The hint's value: "e.g. key=value", "e.g. value" or "like value"
HINT = re.compile(r"(?:e\.g\. |like )(?:(\w+)=)?([^\s);,]+)")


@pytest.mark.parametrize(
    "spec, key",
    [
        ("pdrop:layers=8/16/24", "layers"),
        ("pdrop:layers=3/2", "layers"),
        ("sparsevlm:layers=2/6/15", "layers"),
        ("sparsevlm:keep=0.5", "keep"),
        ("pai:layers=two", "layers"),
        ("act:heads=x", "heads"),
        ("act:heads=9.0", "heads"),
        ("ocr_sink", "heads"),
        ("var:sink_dims=a", "sink_dims"),
        ("knockout:edges=image", "edges"),
        ("knockout:edges=/", "edges"),
    ],
)
def test_every_hint_shows_a_value_the_model_takes(spec, key):
    """The value a refusal suggests, put in place of the refused one, is accepted by the same (4-layer) model."""
    model, _ = tiny_model("llava")
    with pytest.raises(ValueError) as refused:
        ve.wrap(model, spec)
    match = HINT.search(str(refused.value))
    assert match, f"no example value in: {refused.value}"
    assert match.group(1) in (None, key), str(refused.value)
    name, _, params = spec.partition(":")
    others = [p for p in params.split(",") if p and not p.startswith(f"{key}=")]
    fixed = f"{name}:" + ",".join([*others, f"{key}={match.group(2)}"])
    ve.wrap(model, fixed)  # accepted
    ve.unwrap(model)


# ----------------------------------------------------------------------------------------------------------------
# Command-line errors: one line, exit code 2, no traceback


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent"], "no model directory at /nonexistent"),
        (["--model", "tiny:llava", "--image", "{tmp}/notes.txt"], "not an image file PIL can read"),
        (["--model", "tiny:llava", "--image", "{tmp}/missing.png"], "missing.png: no such file"),
        (["--model", "tiny:llava", "--methods", "fastv;;dart"], "has an empty spec"),
        (["--model", "tiny:llava", "--methods", "fastv:layer=2,layer=3"], "given twice"),
    ],
)
def test_cli_bad_model_image_and_specs_get_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["compare", *argv, "--repeats", "1", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_unknown_hub_id_offline_gets_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["compare", "--model", "nobody-here/no-such-model", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot load model 'nobody-here/no-such-model'" in err and err.count("\n") == 1, err


def _stock_qwen_directory(family: str, path) -> None:
    """A Qwen directory laid out as the released checkpoints are: the image processor's settings in
    preprocessor_config.json naming the stock processor class (which loads a video processor, needing torchvision)."""
    save_tiny(family, path)
    saved = json.loads((path / "processor_config.json").read_text())
    stock = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[family]
    (path / "preprocessor_config.json").write_text(json.dumps({**saved["image_processor"], "processor_class": stock}))
    (path / "processor_config.json").unlink()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_directory_loads_without_torchvision(family, tmp_path):
    """Without torchvision (this project's environment) the stock processor fails to import its video processor; the
    model still loads, with the same image processing as the tiny model's own processor."""
    import torch

    from vlm_efficient.models import build_inputs, load_model
    from vlm_efficient.testing import tiny_image

    _stock_qwen_directory(family, tmp_path)
    model, processor = load_model(str(tmp_path))
    reference, reference_processor = tiny_model(family)
    inputs = build_inputs(processor, tiny_image(0), "What is this?", "cpu", torch.float32)
    expected = build_inputs(reference_processor, tiny_image(0), "What is this?", "cpu", torch.float32)
    assert all(torch.equal(inputs[k], expected[k]) for k in expected) and inputs.keys() == expected.keys()
    generate = dict(max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(**inputs, **generate), reference.generate(**expected, **generate))


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap standard errors on tiny splits


def test_bootstrap_leaves_out_resamples_without_a_denominator():
    """Precision tp / (tp + fp) over 4 documents with one predicted yes, a true positive: every resample that holds
    it has precision 1, so the error is 0; resamples without a predicted yes have no precision and are left out
    (counted as precision 0, they gave 0.228)."""
    from vlm_efficient.evals.metrics import ratio_of_sums, ratio_stderr

    samples = [{"tp": 1.0, "fp": 0.0}] + [{"tp": 0.0, "fp": 0.0}] * 3
    assert ratio_of_sums(samples, "tp", ("tp", "fp")) == 1.0
    assert ratio_stderr(samples, "tp", ("tp", "fp")) == 0.0
    # no predicted yes at all: no resample has a precision, the error is undefined
    assert ratio_stderr([{"tp": 0.0, "fp": 0.0}] * 4, "tp", ("tp", "fp")) is None


def test_bootstrap_error_is_that_of_the_defined_resamples():
    """Three documents (x, d) = (1, 1), (0.5, 1), (0, 0): the exact bootstrap distribution of sum(x) / sum(d) over
    the 27 equally likely resamples, leaving out the one of only (0, 0)s (d = 0), written out by enumeration: std
    0.188 (counting that resample as 0 gives 0.232)."""
    import itertools

    from vlm_efficient.evals.metrics import ratio_stderr

    docs = [(1.0, 1.0), (0.5, 1.0), (0.0, 0.0)]
    ratios = []
    for pick in itertools.product(docs, repeat=3):
        den = sum(d for _, d in pick)
        if den > 0:
            ratios.append(sum(x for x, _ in pick) / den)
    assert len(ratios) == 26
    exact = float(np.std(ratios))
    samples = [{"x": x, "d": d} for x, d in docs]
    assert ratio_stderr(samples, "x", "d", iters=20000) == pytest.approx(exact, rel=0.03)


# ----------------------------------------------------------------------------------------------------------------
# bench: CPU defaults, memory, the image as the model sees it, speed with its spread


def test_bench_on_cpu_defaults_to_a_depth_that_fits(monkeypatch):
    """A random 7B architecture on CPU gets CPU_LAYERS layers (its full depth took 23.5 GB and was killed)."""
    import torch

    from vlm_efficient.evals import archs, bench

    built = []

    def build(name, device, dtype, layers):
        built.append(layers)
        raise InterruptedError  # stop before materialising anything

    monkeypatch.setattr(archs, "build_arch", build)
    for layers in (None, 1):
        with pytest.raises(InterruptedError):
            bench.bench("llava-1.5-7b", [""], device="cpu", dtype=torch.bfloat16, layers=layers)
    assert built == [bench.CPU_LAYERS, 1]


def test_bench_refuses_an_architecture_that_does_not_fit_and_names_layers_that_do():
    import torch

    from vlm_efficient.evals.archs import arch_on_meta
    from vlm_efficient.evals.bench import check_arch_fits

    gib = 2**30
    with pytest.raises(ValueError, match=r"needs 13\.\d GiB .* has 4\.0 GiB available: pass --layers (\d+)") as refused:
        check_arch_fits("llava-1.5-7b", None, "cpu", torch.bfloat16, 4 * gib)
    layers = int(re.search(r"--layers (\d+)", str(refused.value)).group(1))
    check_arch_fits("llava-1.5-7b", layers, "cpu", torch.bfloat16, 4 * gib)  # the advice fits
    one_more = sum(p.numel() for p in arch_on_meta("llava-1.5-7b", layers + 1)[0].parameters()) * 2
    assert one_more > 0.8 * 4 * gib  # and is the largest that does
    with pytest.raises(ValueError, match="does not fit even with --layers 1"):
        check_arch_fits("qwen2-vl-7b", None, "cpu", torch.bfloat16, gib)


def test_bench_reports_the_image_the_model_sees_and_the_spread_of_its_rounds(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--model", "tiny:llava", "--methods", "fastv:ratio=0", "--image-size", "200", "--repeats", "3",
            "--max-new-tokens", "3", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "bench.json").read_text())
    crop = tiny_model("llava")[1].image_processor.crop_size  # the tiny CLIP resizes and crops every image to this
    seen = f"{crop['height']}x{crop['width']} px"
    assert result["image_size"] == 200 and result["model_image"] == seen
    assert f"image 200 px, {seen} as the model sees it" in printed
    assert "best of 3 interleaved rounds" in printed
    noop = result["runs"]["fastv:ratio=0"]
    for key in ("prefill_ms", "ttft_ms", "decode_tokens_per_s", "prefill_speedup", "decode_speedup"):
        assert len(noop["rounds"][key]) == 3, key
    base_prefill, prefill = result["runs"]["base"]["rounds"]["prefill_ms"], noop["rounds"]["prefill_ms"]
    assert noop["rounds"]["prefill_speedup"] == [b / m for b, m in zip(base_prefill, prefill)]
    low, high = min(noop["rounds"]["prefill_speedup"]), max(noop["rounds"]["prefill_speedup"])
    assert low <= noop["prefill_speedup"] <= high  # the ratio of the best rounds lies in the rounds' range
    row = next(line for line in printed.splitlines() if line.startswith("| fastv:ratio=0 |"))
    assert f"{noop['prefill_speedup']:.2f}x [{low:.2f}-{high:.2f}x]" in row
    print(f"no-op fastv:ratio=0 prefill speed-up {noop['prefill_speedup']:.2f}x [{low:.2f}x-{high:.2f}x]")


def test_single_runs_are_labelled():
    from vlm_efficient.evals.bench import with_spread

    assert with_spread(1.2345, [1.2345], ".2f", "x") == "1.23x (1 run)"
    assert with_spread(10.0, [10.0, 12.5, 11.0]) == "10.0 [10.0-12.5]"


@pytest.mark.parametrize("repeats", [1, 2])
def test_sweep_speed_columns_show_their_spread_or_say_single_run(repeats, tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_EFFICIENT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    args = ["sweep", "--model", "tiny:llava", "--methods", "fastv:ratio=0", "--tasks", "testbed_pope", "--limit", "2",
            "--batch-size", "2", "--max-new-tokens", "2", "--repeats", str(repeats), "--output", str(out),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    table = json.loads((out / "sweep.json").read_text())
    noop = table["rows"][1]["batch1"]
    assert len(noop["rounds"]["ttft_speedup"]) == repeats
    markdown = (out / "sweep.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| pruning | fastv:ratio=0 |"))
    assert "prefill ms (eval, 1 pass)" in markdown
    if repeats == 1:
        assert row.count("(1 run)") == 4 and "one timed round after a warm-up (1 run" in markdown
    else:
        low, high = min(noop["rounds"]["ttft_speedup"]), max(noop["rounds"]["ttft_speedup"])
        assert f"{noop['ttft_speedup']:.2f}x [{low:.2f}-{high:.2f}x]" in row and "best of 2 rounds" in markdown
