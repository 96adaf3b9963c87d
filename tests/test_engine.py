"""The engine on every model family: exactness of a no-op wrap, unwrap, FastV against slow references."""

from __future__ import annotations

import pytest
import torch

import vlm_efficient as ve
from reference import extend_inputs, fastv_kept_positions, masked_reference
from vlm_efficient.testing import FAMILIES, image_placeholder, tiny_batch, tiny_image, tiny_model

NEW_TOKENS = 6


def two_samples(processor):
    """A left-padded batch: a short prompt with one image, a longer one with two images."""
    ph = image_placeholder(processor)
    return tiny_batch(
        processor,
        [
            (f"what is {ph} this", [tiny_image(0)]),
            (f"a much longer prompt with {ph} and then {ph} compare them", [tiny_image(1), tiny_image(2)]),
        ],
    )


def greedy(model, batch, **kw):
    kw = {"do_sample": False, "max_new_tokens": NEW_TOKENS, **kw}
    with torch.no_grad():
        return model.generate(**batch, output_logits=True, return_dict_in_generate=True, **kw)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def assert_noop_wrap_is_exact(model, batch) -> None:
    """A wrap that does nothing ("", or FastV dropping 0%) gives the unwrapped model's logits and greedy tokens
    bit for bit, and so does the model after unwrap."""
    with torch.no_grad():
        logits = model(**batch).logits
    tokens = greedy(model, batch).sequences
    for spec in ("", "fastv:layer=2,ratio=0"):
        ve.wrap(model, spec)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, logits), spec
        assert torch.equal(greedy(model, batch).sequences, tokens), spec
        ve.unwrap(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)
    assert torch.equal(greedy(model, batch).sequences, tokens)


def test_noop_wrap_and_unwrap_are_exact(family):
    model, processor = tiny_model(family)
    assert_noop_wrap_is_exact(model, two_samples(processor))
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)


@pytest.mark.parametrize("scoring", ["last", "all", "text"])
def test_fastv_kept_set_equals_formula(family, scoring):
    layer, ratio = 2, 0.5
    model, processor = tiny_model(family, attn_implementation="eager")
    batch = two_samples(processor)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    expected = fastv_kept_positions(
        attentions, batch["input_ids"], batch["attention_mask"], ve.get_adapter(model).image_token_id(model),
        layer, ratio, scoring,
    )
    model.set_attn_implementation({"text_config": "sdpa"})
    ve.wrap(model, f"fastv:layer={layer},ratio={ratio},scoring={scoring}")
    with torch.no_grad():
        model(**batch)
    run = ve.engine_of(model).run
    positions = run.layer_positions[layer]
    visual = run.layout.visual
    for b, want in enumerate(expected):
        got = [p for p in positions[b].tolist() if p >= 0 and bool(visual[b, p])]
        assert got == want
    stats = ve.stats(model)
    assert stats.visual_tokens_per_layer == [24, 24, 12, 12] or family == "llava_next"
    assert stats.tokens_per_layer_per_sample[1][layer] == stats.tokens_per_layer_per_sample[1][0] - len(want)


@pytest.mark.parametrize("sampling, layer", [(False, 2), (True, 2), (False, 1)])
def test_fastv_generate_matches_cache_free_reference(family, sampling, layer):
    """Decoding with the pruned KV cache equals one cache-free forward over prompt + generated tokens in which
    layers >= K cannot see the pruned image tokens. Layer 1 prunes before Qwen3-VL's deepstack injection ends."""
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, f"fastv:layer={layer},ratio=0.5")
    torch.manual_seed(0)
    out = greedy(model, batch) if not sampling else greedy(model, batch, do_sample=True, top_k=0)
    run = ve.engine_of(model).run
    kept = run.layer_positions[layer]
    ve.unwrap(model)

    sequences = out.sequences
    prompt = batch["input_ids"].shape[1]
    full = sequences[:, :-1]
    allowed = torch.zeros(full.shape, dtype=torch.bool)
    allowed[:, prompt:] = True
    for b in range(full.shape[0]):
        allowed[b, kept[b][kept[b] >= 0]] = True
    key_masks = {i: allowed for i in range(layer, len(model.model.language_model.layers))}
    with masked_reference(model, key_masks), torch.no_grad():
        reference = model(**extend_inputs(batch, full), use_cache=False).logits[:, prompt - 1 :]
    logits = torch.stack(out.logits, dim=1)
    valid = torch.isfinite(logits)
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-4, rtol=1e-4)
    if not sampling:
        assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_padded_batch_matches_each_sample_alone(family):
    model, processor = tiny_model(family)
    ph = image_placeholder(processor)
    samples = [
        (f"what is {ph} this", [tiny_image(0)]),
        (f"a much longer prompt with {ph} and then {ph} compare them", [tiny_image(1), tiny_image(2)]),
    ]
    ve.wrap(model, "fastv:layer=1,ratio=0.75")
    together = greedy(model, tiny_batch(processor, samples))
    for b, sample in enumerate(samples):
        alone = greedy(model, tiny_batch(processor, [sample]))
        assert torch.equal(together.sequences[b, -NEW_TOKENS:], alone.sequences[0, -NEW_TOKENS:])
        torch.testing.assert_close(
            torch.stack(together.logits, 1)[b], torch.stack(alone.logits, 1)[0], atol=1e-4, rtol=1e-4
        )


def test_stats_match_the_real_cache(family):
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, "fastv:layer=2,ratio=0.5")
    out = greedy(model, batch)
    stats = ve.stats(model)
    cache = out.past_key_values
    actual = [layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers]
    assert stats.kv_cache_bytes_per_layer == actual
    assert actual[2] < actual[1]
    assert stats.decode_steps == NEW_TOKENS - 1
    assert stats.has_visual
    assert stats.prefill_flops["total"] > 0 and stats.decode_flops["total"] > 0


def test_prompt_without_images_is_a_documented_noop(family):
    model, processor = tiny_model(family)
    batch = tiny_batch(processor, [("no picture here at all", [])])
    reference = greedy(model, batch).sequences
    ve.wrap(model, "fastv:layer=2,ratio=0.5")
    assert torch.equal(greedy(model, batch).sequences, reference)
    stats = ve.stats(model)
    assert not stats.has_visual
    assert stats.tokens_per_layer == [stats.tokens_per_layer[0]] * 4


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("fastv:layer=2,ratio=0.5", {0, 2, 3}),  # layer 1 computes FastV's statistics
        ("pdrop:layers=1/3,ratio=0.5", {0, 2}),  # its boundaries probe their own attention
        ("dart:layer=2", {0, 2, 3}),  # layer 1 hands DART its keys
        ("visionzip", {0, 1, 2, 3}),
        ("pai", set()),  # a method that edits attention is asked in every layer
        ("plphp", set()),  # a per-head cache decodes on its own route
    ],
)
def test_layers_no_method_acts_on_bypass_the_engine(spec, expected, monkeypatch):
    """Their attention calls go to SDPA without the engine's routing; inside plain() every layer does."""
    model, processor = tiny_model("llava")
    ve.wrap(model, spec)
    engine = ve.engine_of(model)
    assert engine.plain_layers == expected
    attended = []
    monkeypatch.setattr(engine, "attend", lambda module, *args: attended.append(module.layer_idx) or (None, None))
    with engine.plain():
        assert engine.plain_layers == set(range(4))
        greedy(model, two_samples(processor), max_new_tokens=2)
    assert attended == [] and engine.plain_layers == expected
    ve.unwrap(model)
