"""Sink-aware KV eviction (StreamingLLM-style) on every family: generate() with the evicting cache on a left-padded
batch against a dense cache-free reference whose decoding rows cannot see the evicted prompt keys (the kept set
written out from input_ids here), and the memory the cache holds."""

from __future__ import annotations

import pytest
import torch

import vlm_efficient as ve
from reference import kept_key_masks
from test_engine import greedy, two_samples
from test_heads_dense import Prompt, assert_matches, dense, reference_logits
from vlm_efficient.ragged_cache import GENERATED_SLACK
from vlm_efficient.testing import FAMILIES, tiny_model

LAYERS = 4


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def kept_prompt_keys(p, sinks, window, keep_visual):
    """[B, N] the rule from the prompt alone: first `sinks` real tokens, last `window` positions, visual tokens."""
    real = p.valid[:, : p.length]
    first = (real.long().cumsum(1) <= sinks) & real
    recent = torch.arange(p.length)[None] >= p.length - window
    kept = first | (recent & real)
    return kept | (p.visual[:, : p.length] & keep_visual)


def check(family, sinks, window, keep_visual, detect=None, pruning=""):
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    plain = greedy(model, batch)
    spec = f"streaming:sinks={sinks},window={window},visual={'keep' if keep_visual else 'evict'}"
    ve.wrap(model, pruning + spec + (f",detect={detect}" if detect else ""))
    out = greedy(model, batch)
    stats = ve.stats(model)
    run = ve.engine_of(model).run
    ragged = dict(run.ragged)
    ve.unwrap(model)
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    kept = {layer: kept_prompt_keys(p, sinks, window, keep_visual) for layer in range(LAYERS)}
    if detect:
        with dense(model) as recorded, torch.no_grad():
            model(**batch, use_cache=False)
        for layer, probs in recorded["probs"].items():
            rows = p.valid[:, : p.length, None].double()
            received = (probs.double().mean(1) * rows).sum(1) / rows.sum(1)  # mean over the sample's real rows
            assert not bool(((received - detect).abs() < 1e-5).any()), "a key at the threshold: pick another"
            kept[layer] = kept[layer] | (received >= detect)
        rule = kept_prompt_keys(p, sinks, window, keep_visual)
        assert any(bool((keep & ~rule).any()) for keep in kept.values()), "no sink detected beyond the rule"
    for layer in range(LAYERS):
        evicted = p.valid[:, : p.length] & ~kept[layer]
        assert bool(evicted.any()), "nothing evicted: the test cannot fail"
    pruned = kept_key_masks(run, p.total, LAYERS) if pruning else {}
    for layer, cached in pruned.items():  # keys a pruning layer never cached are neither kept nor seen
        kept[layer] = kept[layer] & cached[:, : p.length]
    masks = {}
    for layer, keep in kept.items():
        mask = pruned[layer][:, None, :].expand(-1, p.total, -1) if layer in pruned else torch.ones(
            p.batch, p.total, p.total, dtype=torch.bool)
        blocked = p.generated[:, :, None] & ~torch.cat([keep, torch.ones(p.batch, p.total - p.length,
                                                                        dtype=torch.bool)], 1)[:, None, :]
        masks[layer] = mask & ~blocked
    reference, _ = reference_logits(model, batch, out, masks=masks)
    assert_matches(out, reference)
    assert (torch.stack(out.logits, 1)[:, 1:] - torch.stack(plain.logits, 1)[:, 1:]).abs().max() > 1e-3
    # memory: each (sample, KV head) holds exactly its kept prompt keys (+ room for generated tokens)
    kv_heads = model.config.get_text_config().num_key_value_heads
    for layer, stored in ragged.items():
        capacity = stored.ragged._capacity_host.view(p.batch, kv_heads)
        expected = kept[layer].sum(1)[:, None].expand(-1, kv_heads) + GENERATED_SLACK
        assert torch.equal(capacity.cpu(), expected)
        assert stats.kv_cache_bytes_per_layer[layer] == stored.allocated_bytes()
    return stats


@pytest.mark.parametrize("keep_visual", [False, True])
def test_streaming_matches_masked_reference(family, keep_visual):
    check(family, sinks=2, window=4, keep_visual=keep_visual)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_streaming_after_pruning(family):
    check(family, sinks=2, window=4, keep_visual=False, pruning="fastv:layer=2,ratio=0.5+")


def test_streaming_detected_sinks(family):
    check(family, sinks=1, window=3, keep_visual=False, detect=0.08)


def test_streaming_frees_memory():
    model, processor = tiny_model("llava")
    batch = two_samples(processor)
    sizes = {}
    for spec in ("streaming:window=100000", "streaming:sinks=4,window=8"):
        ve.wrap(model, spec)
        greedy(model, batch, max_new_tokens=4)
        sizes[spec] = ve.stats(model).kv_cache_bytes
        ve.unwrap(model)
    assert sizes["streaming:sinks=4,window=8"] < sizes["streaming:window=100000"]


@pytest.mark.parametrize("spec, message", [
    ("streaming:window=0", "window"),
    ("streaming:sinks=-1", "sinks"),
    ("streaming:visual=some", "evict or keep"),
    ("streaming:detect=2", "detect"),
])
def test_streaming_bad_parameters(spec, message):
    model, _ = tiny_model("llava")
    with pytest.raises(ValueError, match=message):
        ve.wrap(model, spec)
