"""A wrapped model on Hugging Face's own static cache, generate(..., cache_implementation="static"): the same greedy
tokens and logits as the dynamic cache on every family, the pruned layers holding only their kept keys in the
static buffers, generate()'s other modes, compiled decoding (dynamo tracing the engine's hooks), and the refusal."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CompileConfig

import vlm_efficient as ve
from test_engine import two_samples
from vlm_efficient.testing import FAMILIES, tiny_model

NEW_TOKENS = 6
# no-op wrap, pruning inside the LLM (one and two stages), before it, head reweighting, post-softmax redistribution,
# a mask
SPECS = ["", "fastv:layer=2,ratio=0.5", "pdrop:layers=1/3,ratio=0.5", "visionzip:ratio=0.75", "pai:alpha=0.5",
         "var:tau=2", "knockout:edges=question-image/image-last"]  # fmt: skip


def generate(model, batch, **kw):
    kw = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "output_logits": True, "return_dict_in_generate": True,
          **kw}  # fmt: skip
    with torch.no_grad():
        return model.generate(**batch, **kw)


def dynamic_and_static(model, batch, **kw):
    if kw.get("do_sample"):
        torch.manual_seed(0)
    dynamic = generate(model, batch, **kw)
    if kw.get("do_sample"):
        torch.manual_seed(0)
    static = generate(model, batch, cache_implementation="static", **kw)
    return dynamic, static


def returned_cache(output):
    return output.get("cache", output.get("past_key_values"))


def assert_same(dynamic, static):
    assert torch.equal(static.sequences, dynamic.sequences)
    assert len(static.logits) == len(dynamic.logits)
    # the same keys in the same order: only SDPA's kv length (whole buffer or written slots) may change the sums
    torch.testing.assert_close(torch.stack(static.logits, 1), torch.stack(dynamic.logits, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_static_cache_equals_dynamic_cache(family, spec):
    """Left-padded ragged batch, one image in one sample and two in the other (samples keep different numbers of
    keys: slot padding behind the masks). Each layer of the static cache has written exactly the keys the engine
    says it holds: its kept prompt keys, then the generated ones."""
    model, processor = tiny_model(family)
    ve.wrap(model, spec)
    dynamic, static = dynamic_and_static(model, two_samples(processor))
    assert_same(dynamic, static)
    cache = returned_cache(static)
    assert type(cache).__name__ == "StaticCache"
    run = ve.engine_of(model).run
    assert run.static_cache and run.decode_steps == NEW_TOKENS - 1
    # the last generated token is not fed: NEW_TOKENS - 1 decoding calls wrote one key each
    held = [run.prompt_length if p is None else p.shape[1] for p in (run.layer_positions[i] for i in range(len(cache)))]
    assert [int(layer.cumulative_length) for layer in cache.layers] == [n + NEW_TOKENS - 1 for n in held]
    if spec and spec.split(":")[0] in ("fastv", "pdrop", "visionzip"):
        assert min(held) < run.prompt_length  # pruned layers write fewer slots than the prompt
    # stats: the buffers as allocated (max_cache_len slots per layer, whatever a layer holds)
    allocated = [k.numel() * k.element_size() + v.numel() * v.element_size()
                 for k, v in ((layer.keys, layer.values) for layer in cache.layers)]  # fmt: skip
    assert ve.stats(model).kv_cache_bytes_per_layer == allocated
    ve.unwrap(model)


OTHER_SPECS = ["vhr", "adaptvis", "aki", "equal_distance", "vaf", "act", "fastv:layer=2,ratio=0.5+pai",
               "plphp:layer=1,alpha=0.05,beta=0.02,cache=mask"]  # fmt: skip


@pytest.mark.parametrize("spec", OTHER_SPECS)
def test_side_passes_and_other_methods_on_static_cache(spec):
    """Methods with a side pass before the prefill (VHR, AdaptVis: it gets the 2-D padding mask, not generate()'s
    4-D one), pre-rotary logits (AKI, equal_distance), decode masks and compositions."""
    model, processor = tiny_model("qwen2_vl" if spec != "adaptvis" else "llava")
    ve.wrap(model, spec)
    assert_same(*dynamic_and_static(model, two_samples(processor)))
    ve.unwrap(model)


@pytest.mark.parametrize("mode", [{"num_beams": 2}, {"do_sample": True, "top_k": 0, "num_return_sequences": 2},
                                  {"output_attentions": True}])  # fmt: skip
def test_generate_modes_on_static_cache(mode):
    model, processor = tiny_model("llava_next")
    ve.wrap(model, "fastv:layer=2,ratio=0.5+pai:alpha=0.5")
    assert_same(*dynamic_and_static(model, two_samples(processor), **mode))
    ve.unwrap(model)


def compile_everywhere(backend) -> CompileConfig:
    """generate() compiles the decoding forward on a static cache where the device is a GPU; _compile_all_devices
    does it on CPU too."""
    config = CompileConfig(backend=backend)
    config._compile_all_devices = True
    return config


def test_wrapped_model_is_not_compiled_on_static_cache():
    """wrap() sets generation_config.disable_compile (hooks.STATIC_UNCOMPILED): generate() compiles nothing for the
    wrapped model, which gives the dynamic cache's tokens; unwrap() and a deep copy give the setting back, and
    generate() compiles the unwrapped model's decoding again."""
    model, processor = tiny_model("llava")
    batch = two_samples(processor)
    graphs = []

    def counting(graph, example_inputs, **options):
        graphs.append(graph)
        return graph.forward

    ve.wrap(model, "fastv:layer=2,ratio=0.5")
    assert model.generation_config.disable_compile
    copied = copy.deepcopy(model)  # wrapped again: the copy's own engine sets it, and its unwrap gives it back
    assert copied.generation_config.disable_compile
    assert not ve.unwrap(copied).generation_config.disable_compile
    torch._dynamo.reset()
    dynamic = generate(model, batch, max_new_tokens=3)
    static = generate(model, batch, max_new_tokens=3, cache_implementation="static",
                      compile_config=compile_everywhere(counting))  # fmt: skip
    assert graphs == []
    assert_same(dynamic, static)
    ve.unwrap(model)
    assert not model.generation_config.disable_compile
    generate(model, batch, max_new_tokens=3, cache_implementation="static", compile_config=compile_everywhere(counting))
    torch._dynamo.reset()
    assert graphs


def test_compiled_decoding_on_static_cache():
    """Asked for (disable_compile=False), generate() compiles a wrapped model's decoding forward: dynamo's eager
    backend runs over the engine's hooks (graph breaks, recompiles as the trimmed lengths change) without a C++
    compiler; the tokens stay the dynamic cache's."""
    model, processor = tiny_model("llava")
    batch = two_samples(processor)
    ve.wrap(model, "fastv:layer=2,ratio=0.5")
    torch._dynamo.reset()
    dynamic = generate(model, batch, max_new_tokens=3)
    compiled = generate(model, batch, max_new_tokens=3, cache_implementation="static", disable_compile=False,
                        compile_config=compile_everywhere("eager"))  # fmt: skip
    torch._dynamo.reset()
    assert torch.equal(compiled.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits, 1), torch.stack(dynamic.logits, 1), atol=1e-4, rtol=1e-4)
    ve.unwrap(model)


def test_per_head_cache_is_refused_on_static_cache():
    model, processor = tiny_model("llava")
    ve.wrap(model, "plphp:layer=1,alpha=0.05,beta=0.02")
    with pytest.raises(ValueError, match=r"no cache_implementation='static'.*plphp:cache=mask"):
        generate(model, two_samples(processor), cache_implementation="static")
    ve.unwrap(model)


def test_fast_path_refuses_static_cache_and_names_the_dynamic_path():
    """fast=True keeps its own static buffers; HF's static route is the dynamic path's."""
    model, processor = tiny_model("llava")
    ve.wrap(model, "fastv:layer=2,ratio=0.5", fast=True)
    with pytest.raises(ValueError, match="cache_implementation='static'.*dynamic path"):
        generate(model, two_samples(processor), cache_implementation="static")
    ve.unwrap(model)
