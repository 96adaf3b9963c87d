"""wrap()/unwrap()/stats() contracts, spec strings, bad input and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vlm_efficient as ve
from vlm_efficient.cli import main
from vlm_efficient.token_ops.fastv import FastV
from vlm_efficient.testing import image_placeholder, tiny_batch, tiny_image, tiny_model


@pytest.fixture
def llava():
    return tiny_model("llava")


def test_spec_strings_and_objects_build_the_same_methods():
    assert ve.parse_methods("fastv:layer=3,ratio=0.25") == [FastV(layer=3, ratio=0.25)]
    assert ve.parse_methods([FastV(), "fastv:scoring=text"]) == [FastV(), FastV(scoring="text")]
    assert ve.parse_methods("fastv+fastv:layer=1") == [FastV(), FastV(layer=1)]
    assert ve.parse_methods("") == []
    assert ve.to_spec([FastV(layer=3)]) == "fastv:layer=3,ratio=0.5,scoring=last"
    assert ve.parse_methods(ve.to_spec([FastV(layer=3)])) == [FastV(layer=3)]


# the names of the hand-kept table the registry had before each method registered itself: every one still parses
SHIPPED_METHODS = {
    "fastv", "pdrop", "dart", "divprune", "random", "pool", "dyvte", "sparsevlm", "fastervlm", "visionzip", "vmtc",
    "yopo", "avl", "plphp", "pai", "vaf", "var", "act", "ocr_sink", "vhr", "gift", "paint", "adaptvis", "naavit",
    "ee_mllm", "aki", "cmai", "knockout", "equal_distance", "window", "memvr", "frame_causal", "streaming", "dycoke",
    "dual_rope",
}  # fmt: skip


def test_every_registered_method_parses_and_its_spec_round_trips():
    from vlm_efficient.registry import METHODS

    assert set(METHODS) == SHIPPED_METHODS
    for name, cls in METHODS.items():
        (method,) = ve.parse_methods(name)
        assert type(method) is cls and method.name == name
        assert cls.__module__.startswith(("vlm_efficient.token_ops.", "vlm_efficient.heads."))
        assert ve.parse_methods(method.spec()) == [method], name


def test_a_method_file_is_all_a_new_method_needs(tmp_path):
    """shipped_methods imports exactly the modules of a method folder that define a method (an @register_method line at
    the start of a line), whatever else the folder holds."""
    import types

    from vlm_efficient.shipped_methods import method_modules

    (tmp_path / "new_method.py").write_text("@register_method\n@dataclass\nclass New(Method):\n    name = 'new'\n")
    (tmp_path / "helper.py").write_text("def f():\n    return 1  # mentions @register_method only inside a line\n")
    (tmp_path / "command.py").write_text("# @register_method in a comment\n")
    folder = types.SimpleNamespace(__path__=[str(tmp_path)])
    assert method_modules(folder) == ["new_method"]
    # the shipped folders: every defining module is imported and every registered class comes from one of them
    from vlm_efficient import heads, token_ops
    from vlm_efficient.registry import METHODS

    defining = {f"{p.__name__}.{m}" for p in (token_ops, heads) for m in method_modules(p)}
    assert {cls.__module__ for cls in METHODS.values()} == defining
    assert "vlm_efficient.heads.inspect" not in defining and "vlm_efficient.heads.tag" not in defining


def test_register_method_refuses_taken_and_malformed_names():
    from dataclasses import dataclass

    from vlm_efficient.method import Method
    from vlm_efficient.registry import METHODS, register_method

    before = dict(METHODS)
    with pytest.raises(ValueError, match="'fastv' is already registered by vlm_efficient.token_ops.fastv.FastV"):

        @register_method
        @dataclass
        class OtherFastV(Method):
            name = "fastv"

    for bad in ("", "Fast V", "fast-v", "2fast"):
        with pytest.raises(ValueError, match="is not a method name"):
            register_method(dataclass(type("Nameless", (Method,), {"name": bad})))
    with pytest.raises(ValueError, match="is not a method name"):  # a subclass does not inherit its base's name
        register_method(dataclass(type("Sub", (FastV,), {})))
    with pytest.raises(TypeError, match="put it above @dataclass"):
        register_method(type("Plain", (Method,), {"name": "plain"}))
    assert register_method(FastV) is FastV  # the same class again is no duplicate
    reloaded = dataclass(type("FastV", (Method,), {"name": "fastv", "__module__": FastV.__module__}))
    try:  # importlib.reload(fastv) defines FastV again in the same module: it replaces itself
        assert register_method(reloaded) is reloaded and METHODS["fastv"] is reloaded
    finally:
        METHODS["fastv"] = FastV
    assert METHODS == before


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuch", "unknown method 'nosuch'"),
        ("fastv:bogus=1", "unknown parameter 'bogus'"),
        ("fastv:layer=two", "layer='two' is not a valid int"),
        ("fastv:layer", "expected key=value"),
    ],
)
def test_bad_spec_strings_are_explained(spec, message):
    with pytest.raises(ValueError, match=message):
        ve.parse_methods(spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fastv:ratio=1.0", r"ratio=1.0 must be in \[0, 1\)"),
        ("fastv:ratio=-0.1", r"ratio=-0.1 must be in \[0, 1\)"),
        ("fastv:layer=4", r"layer=4 must be in \[1, 3\]"),
        ("fastv:layer=0", r"layer=0 must be in \[1, 3\]"),
        ("fastv:scoring=first", "scoring='first' must be"),
    ],
)
def test_bad_parameters_are_refused_at_wrap(llava, spec, message):
    model, _ = llava
    with pytest.raises(ValueError, match=message):
        ve.wrap(model, spec)
    assert not ve.is_wrapped(model)


def test_unsupported_model_type_names_the_supported_ones():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32))
    with pytest.raises(ValueError, match="model_type 'llama'.*gemma3, idefics3, llava, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl, qwen3_vl"):
        ve.wrap(model, "fastv")


def test_wrapping_twice_is_an_error_and_unwrap_then_rewrap_works(llava):
    model, _ = llava
    ve.wrap(model, "fastv")
    with pytest.raises(RuntimeError, match="already wrapped"):
        ve.wrap(model, "fastv")
    ve.unwrap(model)
    with pytest.raises(RuntimeError, match="not wrapped"):
        ve.unwrap(model)
    ve.wrap(model, "fastv:ratio=0.25")
    assert ve.engine_of(model).methods == [FastV(ratio=0.25)]
    ve.unwrap(model)


def test_stats_before_any_call_is_an_error(llava):
    model, _ = llava
    ve.wrap(model, "fastv")
    with pytest.raises(RuntimeError, match="no forward has run"):
        ve.stats(model)
    ve.unwrap(model)
    with pytest.raises(RuntimeError, match="not wrapped"):
        ve.stats(model)


def test_image_count_mismatch_is_an_error(llava):
    model, processor = llava
    batch = tiny_batch(processor, [(f"two {image_placeholder(processor)} images", [tiny_image(0)])])
    batch["pixel_values"] = torch.cat([batch["pixel_values"]] * 2)  # two images for one placeholder
    ve.wrap(model, "fastv")
    with pytest.raises(ValueError, match="16 image placeholder tokens in input_ids but the image inputs describe 32"):
        model(**batch)
    ve.unwrap(model)


def test_image_straddling_two_samples_is_an_error(llava):
    """The placeholder count matches the images overall, but one sample holds a token of the next one's image."""
    model, processor = llava
    ph = image_placeholder(processor)
    batch = tiny_batch(processor, [(f"one {ph} image here", [tiny_image(0)]), (f"and {ph} another", [tiny_image(1)])])
    ids = batch["input_ids"]
    image_id = model.config.image_token_id
    text_position = int((batch["attention_mask"][0].bool() & (ids[0] != image_id)).nonzero()[-1])
    ids[0, text_position] = image_id  # sample 0: 17 placeholders, sample 1: 15
    ids[1, int((ids[1] == image_id).nonzero()[0])] = ids[0, 0]
    ve.wrap(model, "fastv")
    try:
        with pytest.raises(ValueError, match="16-token image straddles two samples"):
            model(**batch)
    finally:
        ve.unwrap(model)


def test_inputs_embeds_only_is_an_error(llava):
    model, processor = llava
    batch = tiny_batch(processor, [(f"see {image_placeholder(processor)}", [tiny_image(0)])])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    ve.wrap(model, "fastv")
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    ve.unwrap(model)


def test_cli_compare_prints_both_answers_and_writes_json(tmp_path, capsys):
    out = tmp_path / "compare.json"
    assert main(["compare", "--model", "tiny:qwen2_vl", "--methods", "fastv:layer=2,ratio=0.75",
                 "--max-new-tokens", "4", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[base]" in printed and "[fastv:layer=2,ratio=0.75]" in printed and "x base" in printed
    results = json.loads(out.read_text())
    base, wrapped = results["runs"]
    assert base["stats"]["visual_tokens_per_layer"] == [16, 16, 16, 16]
    assert wrapped["stats"]["visual_tokens_per_layer"] == [16, 16, 4, 4]
    assert wrapped["stats"]["kv_cache_bytes"] < base["stats"]["kv_cache_bytes"]


def test_cli_reports_bad_input_without_a_traceback(capsys):
    assert main(["compare", "--methods", "fastv:ratio=2", "--repeats", "1"]) == 2
    assert "ratio=2.0 must be in [0, 1)" in capsys.readouterr().err


def test_python_m_runs_from_the_checkout_root():
    """From the checkout's root (first on sys.path under `python -m`) its `kernels/` folder must not shadow the
    Hugging Face `kernels` distribution that recent transformers import (tests/test_layering.py says why it cannot)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "vlm_efficient.cli", "methods"], cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fastv" in done.stdout


def test_kv_cache_is_read_under_either_transformers_name():
    cache = object()
    assert ve.adapters.kv_cache({"cache": cache}) is cache
    assert ve.adapters.kv_cache({"past_key_values": cache, "cache": None}) is cache
    assert ve.adapters.kv_cache({"input_ids": 1}) is None


def test_layout_follows_each_call_when_generate_pre_encodes_images():
    """A forward with pixels, then generate() (which encodes images before prefill) on a different-size image:
    each call's layout must come from its own images."""
    model, processor = tiny_model("qwen2_vl")
    ph = image_placeholder(processor)
    ve.wrap(model, "fastv:layer=1,ratio=0.5")
    with torch.no_grad():
        model(**tiny_batch(processor, [(f"see {ph}", [tiny_image(0)])]))
    assert ve.stats(model).visual_tokens == [16]
    model.generate(**tiny_batch(processor, [(f"see {ph}", [tiny_image(1, size=(56, 112))])]), max_new_tokens=2)
    stats = ve.stats(model)
    assert stats.visual_tokens == [8] and stats.visual_tokens_per_layer == [8, 4, 4, 4]
    ve.unwrap(model)


def test_named_models_come_from_the_core_registry():
    """The core's model registry: the tiny models built in, the testbed from the installed package's entry point
    (the core imports no evals code for it), names unique, a registered loader called with device and dtype."""
    from vlm_efficient.models import ENTRY_POINT_GROUP, load_model, named_models, register_model, unregister_model

    models = named_models()
    assert {"testbed", "tiny:llava", "tiny:qwen3_vl"} <= set(models)
    assert models["testbed"].load.point.value == "vlm_efficient.evals.testbed:load_testbed"
    assert models["testbed"].load.point.group == ENTRY_POINT_GROUP
    with pytest.raises(ValueError, match="'tiny:llava' is already registered"):
        register_model("tiny:llava", lambda **kw: None)
    with pytest.raises(ValueError, match="not a path|a path or hub id"):
        register_model("./local", lambda **kw: None)
    register_model("probe-model", lambda **kw: ("loaded", kw))
    try:
        assert load_model("probe-model", device="meta") == ("loaded", {"device": "meta", "dtype": torch.float32})
    finally:
        unregister_model("probe-model")
    assert "probe-model" not in named_models()
    with pytest.raises(ValueError, match="unknown built-in model 'tiny:nope': use one of tiny:llava"):
        load_model("tiny:nope")


def test_load_model_reads_a_saved_directory_through_from_pretrained(tmp_path):
    from vlm_efficient.models import load_model
    from vlm_efficient.testing import save_tiny

    save_tiny("llava_next", tmp_path)
    model, processor = load_model(str(tmp_path))
    reference, _ = tiny_model("llava_next")
    batch = tiny_batch(processor, [(f"see {image_placeholder(processor)}", [tiny_image(0)])])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
