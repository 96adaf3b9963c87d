"""token_ops on every model family: generate() with the pruned cache against a cache-free dense reference, batching,
and each method's kept set against a direct implementation of its paper's formula."""

from __future__ import annotations

import pytest
import torch

import vlm_efficient as ve
from vlm_efficient import shrinking
from vlm_efficient.shrinking import causal_mask_at_positions
from reference import extend_inputs, kept_key_masks, masked_reference
from test_engine import greedy, two_samples
from test_token_ops_helpers import checking_host_counts
from vlm_efficient.token_ops.divprune import max_min_diverse
from vlm_efficient.testing import FAMILIES, image_placeholder, tiny_batch, tiny_image, tiny_model

PRUNING_SPECS = [
    "pdrop:layers=1/2/3,ratio=0.5",
    "dart:layer=2,ratio=0.5,image_pivots=2,text_pivots=2",
    "divprune:ratio=0.6",
    "random:ratio=0.5",
    "random:ratio=0.25+fastv:layer=2,ratio=0.5",
]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def layers(model):
    return len(model.model.language_model.layers)


@pytest.mark.parametrize("spec", PRUNING_SPECS)
def test_generate_matches_cache_free_reference(family, spec):
    """Whatever a pruning method keeps, decoding with its shrunk cache equals a dense cache-free forward over prompt
    + generated tokens in which every layer sees only the keys that layer kept."""
    model, processor = tiny_model(family)
    _assert_matches_cache_free_reference(model, two_samples(processor), spec)


@pytest.mark.parametrize("spec", ["fastv:layer=2,ratio=0.5", "pdrop:layers=1/2/3,ratio=0.5"])
def test_unpadded_pruned_layers_run_without_a_mask(family, spec, monkeypatch):
    """Without padding (one sample), the pruned layers take SDPA's unmasked path at prefill and at every decoding
    step (the engine builds no mask: it knows on the host there is nothing to mask), and the logits still equal the
    cache-free reference."""
    model, processor = tiny_model(family)
    batch = tiny_batch(processor, [(f"what is {image_placeholder(processor)} this", [tiny_image(0)])])
    built = []
    monkeypatch.setattr(shrinking, "causal_mask_at_positions",
                        lambda *args: built.append(args) or causal_mask_at_positions(*args))
    _assert_matches_cache_free_reference(model, batch, spec)
    assert not built


@pytest.mark.parametrize("spec, known", [
    ("fastv:layer=2,ratio=0.5", [True]), ("pdrop:layers=1/2/3,ratio=0.5", [True] * 3),
    ("dart:layer=2,ratio=0.5,image_pivots=2,text_pivots=2", [True]), ("dart:layer=2,ratio=0.9", [True]),
    ("dart:layer=2,count=code,truncation=24", [True]),
    ("random:ratio=0.25+fastv:layer=2,ratio=0.5", [True, True]), ("divprune:ratio=0.5+fastv:layer=2,ratio=0.5", [True, True]),
    ("sparsevlm:layers=2,recycle=0", [False]),
])  # fmt: skip
def test_host_known_kept_counts_equal_the_keeps(family, spec, known, monkeypatch):
    """FastV, PyramidDrop and DART give each sample's kept count from the host (the layout's image and question token
    counts), and so do the per-image choosers (random, DivPrune: each image's size and ratio), so no host read sizes
    the shrunk rows: on a padded batch of one and two images those counts equal the keeps' own (DART's also where one
    sample's candidates run out: count=code, truncation=24), and the output the cache-free reference. A selection
    whose counts the host does not know (SparseVLM's, set by a matrix rank) has them read. (VisionZip and FasterVLM on
    untiled images: tests/test_token_ops_vision.py; DyCoke and the per-frame choosers on videos: test_video.py.)"""
    given = checking_host_counts(monkeypatch)
    model, processor = tiny_model(family)
    _assert_matches_cache_free_reference(model, two_samples(processor), spec)
    assert given == known


def _assert_matches_cache_free_reference(model, batch, spec):
    ve.wrap(model, spec)
    out = greedy(model, batch)
    run = ve.engine_of(model).run
    ve.unwrap(model)
    full = out.sequences[:, :-1]
    masks = kept_key_masks(run, full.shape[1], layers(model))
    assert masks, "the method pruned nothing"
    prompt = batch["input_ids"].shape[1]
    with masked_reference(model, masks), torch.no_grad():
        reference = model(**extend_inputs(batch, full), use_cache=False).logits[:, prompt - 1 :]
    logits = torch.stack(out.logits, dim=1)
    valid = torch.isfinite(logits)
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-4, rtol=1e-4)
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("spec", PRUNING_SPECS + ["pool"])
def test_batched_equals_alone(family, spec):
    model, processor = tiny_model(family)
    ph = image_placeholder(processor)
    samples = [
        (f"what is {ph} this", [tiny_image(0)]),
        (f"a much longer prompt with {ph} and then {ph} compare them", [tiny_image(1), tiny_image(2)]),
    ]
    ve.wrap(model, spec)
    together = greedy(model, tiny_batch(processor, samples))
    for b, sample in enumerate(samples):
        alone = greedy(model, tiny_batch(processor, [sample]))
        torch.testing.assert_close(
            torch.stack(together.logits, 1)[b], torch.stack(alone.logits, 1)[0], atol=1e-4, rtol=1e-4
        )


def _visual_positions(run, layer, b):
    positions = run.layer_positions[layer][b]
    return sorted(p for p in positions.tolist() if p >= 0 and bool(run.layout.visual[b, p]))


def test_pdrop_keeps_top_last_token_attention_of_each_boundary_layer(family):
    """Stage by stage: rank with the boundary layer's own attention of the last token in a dense model where the
    earlier stages' dropped tokens are masked, keep int(n0 * lambda^s)."""
    boundaries, ratio = (1, 2, 3), 0.5
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, f"pdrop:layers={'/'.join(map(str, boundaries))},ratio={ratio}")
    with torch.no_grad():
        model(**batch)
    run = ve.engine_of(model).run
    ve.unwrap(model)
    visual = run.layout.visual
    kept = {b: visual[b].nonzero().flatten().tolist() for b in range(visual.shape[0])}
    masks = {}
    for stage, layer in enumerate(boundaries, start=1):
        with masked_reference(model, dict(masks)) as recorded, torch.no_grad():
            model(**batch, use_cache=False)
        probs = recorded[layer]["probs"][:, :, -1, :].mean(1)  # last token, head average
        for b in range(visual.shape[0]):
            n0 = int(visual[b].sum())
            count = int(n0 * ratio**stage)
            ranked = sorted(kept[b], key=lambda p: (-float(probs[b, p]), p))
            kept[b] = sorted(ranked[:count])
            assert _visual_positions(run, layer, b) == kept[b]
        allowed = ~visual.clone()
        for b in range(visual.shape[0]):
            allowed[b, kept[b]] = True
        masks.update({i: allowed for i in range(layer, layers(model))})


def test_dart_keeps_the_tokens_least_similar_to_pivots(family):
    layer, ratio, pivots = 2, 0.5, 2
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    with masked_reference(model, {}) as recorded, torch.no_grad():
        hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states[layer]
        keys = recorded[layer - 1]["keys"]  # [B, Hkv, N, d]
    ve.wrap(model, f"dart:layer={layer},ratio={ratio},image_pivots={pivots},text_pivots={pivots}")
    with torch.no_grad():
        model(**batch)
    run = ve.engine_of(model).run
    ve.unwrap(model)
    with torch.no_grad():
        states = model.model.language_model.norm(hidden).double()
    key_l1 = keys.abs().sum(dim=(1, 3))  # concatenated heads
    for b in range(hidden.shape[0]):
        image = run.layout.visual[b].nonzero().flatten().tolist()
        question = run.layout.after_visual_text[b].nonzero().flatten().tolist()
        image_pivots = sorted(image, key=lambda p: -float(key_l1[b, p]))[:pivots]
        text_pivots = sorted(question, key=lambda p: -float(key_l1[b, p]))[:pivots]
        per_pivot = int(len(image) * (1 - ratio) / (2 * pivots))
        kept, candidates = set(image_pivots), [p for p in image if p not in image_pivots]
        for pivot in sorted(image_pivots + text_pivots):
            cos = {p: float(torch.nn.functional.cosine_similarity(states[b, pivot], states[b, p], dim=0))
                   for p in candidates}
            chosen = sorted(candidates, key=lambda p: cos[p])[:per_pivot]
            kept |= set(chosen)
            candidates = [p for p in candidates if p not in chosen]
        assert _visual_positions(run, layer, b) == sorted(kept)


def _inputs_embeds(model, batch, spec=None):
    """The text model's inputs_embeds as the model builds them (and, wrapped with `spec`, as the engine leaves them)."""
    seen = {}
    text_model = model.model.language_model
    if spec:
        ve.wrap(model, spec)
    def capture(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    handle = text_model.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    run = ve.engine_of(model).run if spec else None
    if spec:
        ve.unwrap(model)
    return seen["embeds"], run


def test_divprune_selection_is_the_greedy_max_min_of_the_paper():
    features = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    distance = 1 - torch.nn.functional.cosine_similarity(features[:, None], features[None], dim=-1)
    picks = [int(distance.fill_diagonal_(0).topk(2, dim=0, largest=False).values[1].argmax())]
    while len(picks) < 10:
        score = distance[picks].min(0).values
        score[picks] = -1
        picks.append(int(score.argmax()))
    assert max_min_diverse(features, 10).tolist() == picks
    others = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(1))
    batched = max_min_diverse(torch.cat([features[None], others]), 10)  # images chosen together, as the engine does
    assert batched.tolist() == [picks] + [max_min_diverse(f, 10).tolist() for f in others]


def test_divprune_runs_per_image_on_the_projected_features(family):
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    embeds, _ = _inputs_embeds(model, batch)
    _, run = _inputs_embeds(model, batch, "divprune:ratio=0.6")
    for b in range(embeds.shape[0]):
        expected = []
        for item in range(len(run.layout.images[b])):
            rows = (run.layout.image_index[b] == item).nonzero().flatten()
            count = int(rows.numel() * 0.4 + 0.5)
            expected += rows[max_min_diverse(embeds[b, rows], count)].tolist()
        assert _visual_positions(run, 0, b) == sorted(expected)


def test_pool_averages_each_block_into_its_top_left_token(family):
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    embeds, _ = _inputs_embeds(model, batch)
    pooled, run = _inputs_embeds(model, batch, "pool:size=2")
    positions = run.input_positions
    layout = run.layout
    for b in range(embeds.shape[0]):
        blocks = {}
        for p in layout.visual[b].nonzero().flatten().tolist():
            part, row, col = layout.coords[b, p].tolist()
            key = (int(layout.image_index[b, p]), part, row // 2, col // 2) if part >= 0 else ("off", p)
            blocks.setdefault(key, []).append(p)
        expected = {members[0]: embeds[b, members].mean(0) for members in blocks.values()}
        got = {int(p): pooled[b, i] for i, p in enumerate(positions[b].tolist()) if p >= 0 and layout.visual[b, p]}
        assert sorted(got) == sorted(expected)
        for p, value in expected.items():
            torch.testing.assert_close(got[p], value)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("tower", ["visionzip:ratio=0.75", "fastervlm:ratio=0.5", "vmtc:ratio=0.75"])
def test_vision_tower_methods_keep_their_tokens_beside_side_passes(family, tower):
    """VHR runs two plain side prefills before each prefill (with and without the image), which run the vision tower
    again after generate() encoded the images for the real prefill. The tower method's record of that encoding
    survives them (they erased it: "the vision tower did not run before this prefill"), and it keeps the positions it
    keeps alone; on the fast path too."""
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, tower)
    greedy(model, batch)
    alone = ve.engine_of(model).run.layer_positions[0]
    ve.unwrap(model)
    for fast in (False, True):
        ve.wrap(model, f"{tower}+vhr", fast=fast)
        greedy(model, batch)
        assert torch.equal(ve.engine_of(model).run.layer_positions[0], alone)
        ve.unwrap(model)
