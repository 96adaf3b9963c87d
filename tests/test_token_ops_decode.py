"""Attention-shaping methods: YOPO (window, inactive visual heads, skipped layers, FFN share), A-VL (decode-time core
of the visual cache, H2O text) and PLPHP (per-layer rates, per-head decode masks). Each is checked against a dense
float64 reference whose masks and post-softmax edits are computed here from the papers' rules, through decoding."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import vlm_efficient as ve
from reference import attention_implementation, dense_attention, extend_inputs
from test_token_ops_helpers import assert_close_logits, check_batched_equals_alone, num_layers, two_samples
from test_engine import greedy
from vlm_efficient.testing import FAMILIES, tiny_model
from vlm_efficient.token_ops.avl import AVL

NAME = "test_token_ops_post_reference"
PAIRS: dict[int, torch.Tensor] = {}  # layer -> allowed [B, 1 or H, N, N] on top of causal + padding
POST: dict[int, object] = {}  # layer -> fn(probs [B, H, N, N] float64) -> probs
PROBS: dict[int, torch.Tensor] = {}


def _reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = module.layer_idx
    pairs = PAIRS[layer][:, :, -query.shape[2] :, :] if layer in PAIRS else None
    out, _, PROBS[layer] = dense_attention(
        query, key, value, attention_mask, scaling, pairs=pairs, post=POST.get(layer)
    )
    return out, None


AttentionInterface.register(NAME, _reference)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def reference(model, pairs=None, post=None, hooks=()):
    PAIRS.clear(), POST.clear(), PROBS.clear()
    PAIRS.update(pairs or {}), POST.update(post or {})
    handles = [module.register_forward_pre_hook(fn) for module, fn in hooks]
    try:
        with attention_implementation(model, NAME):
            yield PROBS
    finally:
        for handle in handles:
            handle.remove()


def _run(family, spec):
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, spec)
    out = greedy(model, batch)
    engine = ve.engine_of(model)
    run, method = engine.run, engine.methods[0]
    ve.unwrap(model)
    full = out.sequences[:, :-1]
    return model, batch, full, torch.stack(out.logits, 1), run, method


def _reference_logits(model, batch, full, **kw):
    prompt = batch["input_ids"].shape[1]
    with reference(model, **kw) as probs, torch.no_grad():
        logits = model(**extend_inputs(batch, full), use_cache=False).logits[:, prompt - 1 :]
    return logits, dict(probs)


def _full_layout(run, total):
    """Per position of prompt + generated tokens: visual flag and (image, part, row, col)."""
    layout = run.layout
    batch, prompt = layout.kind.shape
    visual = torch.zeros(batch, total, dtype=torch.bool)
    visual[:, :prompt] = layout.visual
    where = torch.full((batch, total, 4), -1, dtype=torch.long)
    where[:, :prompt, 0] = layout.image_index
    where[:, :prompt, 1:] = layout.coords
    return visual, where


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# ---- YOPO -----------------------------------------------------------------------------------------------------------
YOPO = "yopo:window=3,heads=0.5,skip_from=3,mlp=0.5"


def test_yopo_matches_the_papers_rules(family):
    model, batch, full, logits, run, _ = _run(family, YOPO)
    total = full.shape[1]
    visual, where = _full_layout(run, total)
    heads = model.config.get_text_config().num_attention_heads
    window = torch.ones(visual.shape[0], 1, total, total, dtype=torch.bool)
    for b in range(visual.shape[0]):
        for i in visual[b].nonzero().flatten().tolist():
            for j in visual[b].nonzero().flatten().tolist():
                (mi, pi, ri, ci), (mj, pj, rj, cj) = where[b, i].tolist(), where[b, j].tolist()
                near = mi == mj and pi == pj and pi >= 0 and abs(ri - rj) <= 1 and abs(ci - cj) <= 1
                window[b, 0, i, j] = near or i == j
    keys, rows = visual[:, None, None, :], visual[:, None, :, None]

    def post(layer):
        def fn(probs):
            activity = ((probs * keys).sum(-1) * rows[..., 0]).sum(-1) / rows[..., 0].sum(-1)
            inactive = torch.zeros(probs.shape[:2], dtype=torch.bool)
            for b in range(probs.shape[0]):
                inactive[b, sorted(range(heads), key=lambda h: (float(activity[b, h]), h))[: heads // 2]] = True
            probs = probs.masked_fill(inactive[:, :, None, None] & (keys | rows), 0.0)
            return probs.masked_fill(keys, 0.0) if layer >= 3 else probs

        return fn

    def mlp_cut(module, args):
        neurons = args[0].clone()
        cut = neurons.shape[-1] // 2
        neurons[..., cut:] = neurons[..., cut:].masked_fill(visual[:, : neurons.shape[1], None], 0.0)
        return (neurons,)

    layers = ve.get_adapter(model).decoder_layers(model)
    expected, _ = _reference_logits(
        model, batch, full, pairs={l: window for l in range(num_layers(model))},
        post={l: post(l) for l in range(num_layers(model))}, hooks=[(layer.mlp.down_proj, mlp_cut) for layer in layers],
    )  # fmt: skip
    assert_close_logits(logits, expected)


def test_yopo_drop_skip_and_head_mask_file(tmp_path):
    mask = torch.ones(4, 4, dtype=torch.long)
    mask[:, 1] = 0
    torch.save(mask, tmp_path / "heads.pt")
    spec = f"yopo:window=0,mlp=1,head_mask={tmp_path / 'heads.pt'},skip=drop,skip_from=2"
    model, batch, full, logits, run, method = _run("llava", spec)
    assert run.visual_per_layer[2].tolist() == [0, 0]
    visual, _ = _full_layout(run, full.shape[1])
    keys, rows = visual[:, None, None, :], visual[:, None, :, None]
    head = torch.zeros(1, 4, 1, 1, dtype=torch.bool)
    head[0, 1] = True
    expected, _ = _reference_logits(
        model, batch, full, pairs={l: ~visual[:, None, None, :] for l in (2, 3)},
        post={l: (lambda p: p.masked_fill(head & (keys | rows), 0.0)) for l in range(4)},
    )  # fmt: skip
    assert_close_logits(logits, expected)


# ---- PLPHP ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["ragged", "mask"])
def test_plphp_keeps_per_head_top_tokens_at_per_layer_rates(family, cache):
    first, (r, dr, alpha, beta) = 1, (0.4, 0.3, 0.05, 0.02)
    spec = f"plphp:layer={first},retain={r},delta={dr},alpha={alpha},beta={beta},cache={cache}"
    model, batch, full, logits, run, method = _run(family, spec)
    assert set(run.ragged) == (set(range(first, num_layers(model))) if cache == "ragged" else set())
    prompt, total = batch["input_ids"].shape[1], full.shape[1]
    visual, _ = _full_layout(run, total)
    _, probs = _reference_logits(model, batch, full)  # the prefill rows are unchanged by the decode masks
    config = model.config.get_text_config()
    heads, groups = config.num_attention_heads, config.num_attention_heads // config.num_key_value_heads
    pairs = {}
    for layer in range(first, num_layers(model)):
        last = probs[layer][:, :, prompt - 1, :prompt]  # [B, H, N]
        allowed = torch.ones(visual.shape[0], heads, total, total, dtype=torch.bool)
        for b in range(visual.shape[0]):
            image = visual[b, :prompt].nonzero().flatten().tolist()
            gamma = float(last[b].mean(0)[image].sum())
            rate = r + dr if gamma >= alpha else r - dr if gamma <= beta else r
            count = int(len(image) * rate + 0.5)
            for g in range(heads // groups):
                score = last[b, g * groups : (g + 1) * groups].sum(0)
                kept = sorted(image, key=lambda p: (-float(score[p]), p))[:count]
                for h in range(g * groups, (g + 1) * groups):
                    allowed[b, h, prompt:, image] = False
                    allowed[b, h, prompt:, kept] = True
        pairs[layer] = allowed
        if cache == "ragged":  # each KV head's segment holds exactly the keys it may attend to, padding dropped
            lengths = run.ragged[layer].ragged.lengths.view(visual.shape[0], -1)
            for b in range(visual.shape[0]):
                expect = allowed[b, :: groups, -1, :].sum(-1) - (~run.layout.valid[b]).sum()
                assert lengths[b].tolist() == expect.tolist(), (layer, b)
    expected, _ = _reference_logits(model, batch, full, pairs=pairs)
    assert_close_logits(logits, expected)


def test_plphp_ragged_cache_frees_the_dropped_keys_and_refuses_what_it_cannot_do():
    """Layers >= K hold no dense keys any more: one buffer of each head's kept keys plus room for generated tokens
    (the exact kept sets are checked above); beam search and attention-editing partners are refused with the fix."""
    model, processor = tiny_model("llava")
    batch = two_samples(processor)
    sizes = {}
    for cache in ("mask", "ragged"):
        ve.wrap(model, f"plphp:layer=1,cache={cache}")
        greedy(model, batch)
        stats = ve.stats(model)
        layers = ve.engine_of(model).run.ragged
        sizes[cache] = stats.kv_cache_bytes_per_layer
        if cache == "ragged":
            from vlm_efficient.ragged_cache import GENERATED_SLACK

            prompt = batch["input_ids"].shape[1]
            for layer, stored in layers.items():
                ragged = stored.ragged
                # the segments and one spare row (kernels/ragged_decode.py: where the keys a head drops are sent)
                assert stored.keys.numel() == 0 and ragged.k_buf.shape[0] == int(ragged._capacity_host.sum()) + 1
                assert int(ragged._capacity_host.max()) < prompt + GENERATED_SLACK  # some visual keys dropped
                assert sizes[cache][layer] == 2 * ragged.k_buf.numel() * ragged.k_buf.element_size()
            with pytest.raises(NotImplementedError, match="num_beams=1"):
                with torch.inference_mode():
                    model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
        ve.unwrap(model)
    assert sizes["ragged"][0] == sizes["mask"][0]  # layer 0 is before K: dense
    ve.wrap(model, "plphp:layer=1+pai")
    with pytest.raises(ValueError, match="cache=mask"):
        greedy(model, batch)
    ve.unwrap(model)
    ve.wrap(model, "plphp:layer=1,cache=mask+pai")
    greedy(model, batch)
    ve.unwrap(model)


# ---- A-VL -----------------------------------------------------------------------------------------------------------
def test_avl_decode_masks_follow_core_updates_and_h2o(family):
    rate, compute, interval, text_rate = 0.5, 0.75, 2, 0.3
    method = AVL(rate=rate, compute=compute, interval=interval, text_rate=text_rate)
    method.record_masks = True
    model, batch, full, logits, run, method = _run(family, [method])
    prompt, total = batch["input_ids"].shape[1], full.shape[1]
    masks = run.memory(method)["masks"]
    pairs = {}
    for layer, steps in masks.items():
        allowed = torch.ones(full.shape[0], 1, total, total, dtype=torch.bool)
        for step, (keys, mask) in enumerate(steps):
            for b in range(full.shape[0]):
                allowed[b, 0, prompt + step, keys[b]] = mask[b]
        pairs[layer] = allowed
    expected, probs = _reference_logits(model, batch, full, pairs=pairs)
    assert_close_logits(logits, expected)

    visual, _ = _full_layout(run, total)
    text = torch.zeros_like(visual)
    text[:, :prompt] = run.layout.text
    text[:, prompt:] = True
    for layer, steps in masks.items():
        attention = probs[layer].mean(1)  # [B, N, N]
        for b in range(full.shape[0]):
            image = visual[b].nonzero().flatten().tolist()
            last = attention[b, prompt - 1]
            ranked = sorted(image, key=lambda p: (-float(last[p]), p))
            secondary = ranked[: int(len(image) * (1 - rate) + 0.5)]
            core = ranked[: int(len(image) * (1 - compute) + 0.5)]
            score = {p: float(last[p]) for p in text[b, :prompt].nonzero().flatten().tolist()}
            evicted = set()
            for step, (keys, mask) in enumerate(steps):
                position = prompt + step
                update = (step + 1) % interval == 0
                allowed = {p for p, m in zip(keys[b].tolist(), mask[b].tolist()) if m}
                expect = set(secondary if update else core) | {
                    p for p in keys[b].tolist() if not visual[b, p] and p not in evicted
                }
                assert allowed == expect, (layer, b, step)
                row = attention[b, position]
                if update:
                    core = sorted(secondary, key=lambda p: (-float(row[p]), p))[: len(core)]
                score[position] = 0.0
                for p in score:
                    score[p] += float(row[p]) if p not in evicted else 0.0
                live = [p for p in sorted(score) if p not in evicted]
                budget = len(score) - int(len(score) * text_rate)
                recent = live[len(live) - budget // 2 :] if budget // 2 else []
                rest = sorted((p for p in live if p not in recent), key=lambda p: (-score[p], p))
                evicted |= set(rest[budget - budget // 2 :])


@pytest.mark.parametrize("spec", [YOPO, "avl:interval=2", "plphp:layer=1,alpha=0.05,beta=0.02",
                                  "plphp:layer=1,alpha=0.05,beta=0.02,cache=mask"])
def test_batched_equals_alone(family, spec):
    check_batched_equals_alone(family, spec)


def test_bad_parameters_are_refused():
    model, _ = tiny_model("llava")
    for spec, match in [
        ("yopo:window=2", "odd"),
        ("yopo:skip_from=9", "skip_from"),
        ("yopo:head_mask=/nonexistent.pt", "not a file"),
        ("avl:rate=0.8,compute=0.5", "rate <= compute"),
        ("plphp:retain=0.2,delta=0.3", "retain - delta"),
        ("plphp:alpha=0.1,beta=0.2", "beta <= alpha"),
        ("plphp:cache=paged", "ragged, mask"),
    ]:
        with pytest.raises(ValueError, match=match):
            ve.wrap(model, spec)
    assert not ve.is_wrapped(model)
