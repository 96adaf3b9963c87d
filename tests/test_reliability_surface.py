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
