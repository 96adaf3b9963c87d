"""Families beyond the five every method is tested on (vlm_efficient.testing.NEW_FAMILIES): their layout and the
engine's exactness contract (no-op bit-exact, unwrap exact, batched equals alone, generate with the pruned cache
against the dense cache-free reference), with single images, several images per prompt and videos."""

from __future__ import annotations

import pytest
import torch

import test_engine
import test_heads_engine
import test_heads_frame_causal
import test_heads_interventions
import test_heads_masks
import vlm_efficient as ve
from test_engine import assert_noop_wrap_is_exact, greedy
from test_token_ops_helpers import ATOL, assert_close_logits, generate_and_reference
from vlm_efficient.layout import VIDEO
from vlm_efficient.testing import NEW_FAMILIES, VIDEO_FAMILIES, image_placeholder, tiny_batch, tiny_image, tiny_model, tiny_video, \
    video_placeholder  # fmt: skip


def batches(family, processor):
    """(name, samples, videos): one image vs two images (LLaVA-OneVision tiles a prompt's single image only), and,
    for families with videos, a clip alone vs an image with a clip."""
    ph = image_placeholder(processor)
    images = [(f"what is {ph} this", [tiny_image(0)]),
              (f"a much longer prompt with {ph} and then {ph} compare them", [tiny_image(1), tiny_image(2)])]
    if family not in VIDEO_FAMILIES:
        return [("images", images, None)]
    vp = video_placeholder(processor)
    videos = [(f"what is {vp} this", []), (f"a much longer prompt with {ph} and then {vp} compare", [tiny_image(1)])]
    return [("images", images, None), ("videos", videos, [[tiny_video(0)], [tiny_video(1)]])]


@pytest.fixture(params=NEW_FAMILIES)
def family(request):
    return request.param


def _layout(model, batch):
    ve.wrap(model, "")
    with torch.no_grad():
        model(**batch)
    layout = ve.engine_of(model).run.layout
    ve.unwrap(model)
    return layout


def test_onevision_layout():
    """Single image: 4x4 base + 8 rows of 8 high-res cells each closed by a newline; two images in a prompt: base +
    one newline each; a 4-frame clip: 2x2 pooled cells per frame, then one newline."""
    model, processor = tiny_model("llava_onevision")
    (_, images, _), (_, clips, videos) = batches("llava_onevision", processor)
    layout = _layout(model, tiny_batch(processor, images))
    single, first, second = layout.images[0][0], *layout.images[1]
    assert single.num_tokens == 16 + 8 * 9 and first.num_tokens == second.num_tokens == 17
    newline = (single.coords[:, 0] == -1)
    assert newline.sum() == 8 and newline[16:].view(8, 9)[:, -1].all()
    assert torch.equal(single.coords[16:][~newline[16:]][:, 1:], torch.cartesian_prod(torch.arange(8), torch.arange(8)))
    assert first.coords[-1].tolist() == [-1, -1, -1] and (first.coords[:16, 0] == 0).all()
    layout = _layout(model, tiny_batch(processor, clips, videos=videos))
    clip = layout.images[0][0]
    assert clip.video and clip.num_tokens == 4 * 4 + 1 and clip.units == [0, 1, 2, 3]
    video = layout.kind[0] == VIDEO
    assert layout.frame[0, video].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [-1]


def test_gemma3_layout_and_mask_groups():
    """Each image is 2x2 pooled tokens between begin- and end-of-image tokens; layers alternate sliding and full."""
    model, processor = tiny_model("gemma3")
    (_, images, _), = batches("gemma3", processor)  # fmt: skip
    layout = _layout(model, tiny_batch(processor, images))
    assert [len(items) for items in layout.images] == [1, 2]
    assert all(torch.equal(item.coords, torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]))
               for items in layout.images for item in items)  # fmt: skip
    adapter = ve.get_adapter(model)
    assert [adapter.mask_group(model, i) for i in range(4)] == ["sliding_attention", "full_attention"] * 2


def test_idefics3_layout():
    """Each image: its 2x2 tiles of 2x2 tokens (part 1, one 4x4 grid) in prompt order, then the global image (part 0),
    read off input_ids; a prompt that breaks the processor's pattern is refused."""
    model, processor = tiny_model("idefics3")
    (_, images, _), = batches("idefics3", processor)  # fmt: skip
    batch = tiny_batch(processor, images)
    layout = _layout(model, batch)
    tile = torch.cartesian_prod(torch.arange(2), torch.arange(2))
    tiles = torch.cat([tile + torch.tensor([r, c]) * 2 for r in range(2) for c in range(2)])
    expected = torch.cat([torch.cat([torch.ones(16, 1, dtype=torch.long), tiles], 1),
                          torch.cat([torch.zeros(4, 1, dtype=torch.long), tile], 1)])  # fmt: skip
    assert [len(items) for items in layout.images] == [1, 2]
    assert all(torch.equal(item.coords, expected) for items in layout.images for item in items)
    broken = dict(batch)
    broken["input_ids"] = batch["input_ids"].clone()
    broken["input_ids"][1, -3] = model.config.image_token_id  # a stray image token in the text
    ve.wrap(model, "")
    with pytest.raises(ValueError, match="processor"), torch.no_grad():
        model(**broken)
    ve.unwrap(model)


def test_generate_sees_the_same_layout_as_a_forward(family):
    """generate() hands the prefill pre-encoded features (no image sizes): the layout read from them is the one read
    from the processor's inputs."""
    model, processor = tiny_model(family)
    for _, samples, videos in batches(family, processor):
        batch = tiny_batch(processor, samples, videos=videos)
        forward = _layout(model, batch)
        ve.wrap(model, "")
        greedy(model, batch, max_new_tokens=1)
        generated = ve.engine_of(model).latest_run.layout
        ve.unwrap(model)
        assert torch.equal(forward.coords, generated.coords) and torch.equal(forward.kind, generated.kind)


def test_noop_wrap_and_unwrap_are_exact(family):
    model, processor = tiny_model(family)
    for _, samples, videos in batches(family, processor):
        assert_noop_wrap_is_exact(model, tiny_batch(processor, samples, videos=videos))


SPECS = ["fastv:layer=2,ratio=0.5", "pdrop:layers=1/2/3,ratio=0.5", "dart:layer=2,ratio=0.5", "divprune:ratio=0.5",
         "random:ratio=0.5"]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS)
def test_generate_matches_cache_free_reference(family, spec):
    model, processor = tiny_model(family)
    for _, samples, videos in batches(family, processor):
        batch = tiny_batch(processor, samples, videos=videos)
        logits, reference, run, _ = generate_and_reference(model, batch, spec)
        assert_close_logits(logits, reference)
        assert run.visual_per_layer[-1].tolist() != run.layout.num_visual.tolist()


@pytest.mark.parametrize("spec", SPECS)
def test_batched_equals_alone(family, spec):
    model, processor = tiny_model(family)
    ve.wrap(model, spec)
    for _, samples, videos in batches(family, processor):
        together = greedy(model, tiny_batch(processor, samples, videos=videos))
        for b, sample in enumerate(samples):
            alone = greedy(model, tiny_batch(processor, [sample], videos=None if videos is None else [videos[b]]))
            steps = len(alone.logits)  # alone, a sample may stop early at its end token
            torch.testing.assert_close(torch.stack(together.logits, 1)[b, :steps], torch.stack(alone.logits, 1)[0],
                                       atol=ATOL, rtol=ATOL)  # fmt: skip
            start = together.sequences.shape[1] - len(together.logits)
            assert torch.equal(together.sequences[b, start : start + steps], alone.sequences[0, -steps:])
    ve.unwrap(model)


@pytest.mark.parametrize("spec", ["", "fastv:layer=2,ratio=0.5", "divprune:ratio=0.5", "pai"])
def test_fast_path_equals_dynamic_path(family, spec):
    """wrap(..., fast=True) gives the dynamic path's greedy tokens and logits on every batch (images, several images,
    videos). Gemma3: its prefill runs the text model's own loop (one mask and rotary table per layer type), and the
    decoding step slides each sliding-window layer's mask (the prompts are longer than the tiny model's window of 8,
    so its sliding layers cache 7 keys and drop one more at every step)."""
    from test_fast_path import assert_same, dynamic_then_fast

    model, processor = tiny_model(family)
    for _, samples, videos in batches(family, processor):
        dynamic, fast = dynamic_then_fast(model, tiny_batch(processor, samples, videos=videos), spec)
        fast_path = ve.engine_of(model).fast_path
        assert_same(dynamic, fast, exact_prefill=not fast_path.prefill.routed_last_row)
        if family == "gemma3":
            step = fast_path.last_step
            window = model.config.get_text_config().sliding_window
            assert step.windows and all(w == window for w in step.windows.values())
            assert all(step.keys[idx].shape[2] >= window - 1 for idx in range(len(step.keys)))
        ve.unwrap(model)


def test_gemma3_fast_path_refuses_a_per_head_cache():
    model, processor = tiny_model("gemma3")
    batch = tiny_batch(processor, [(f"what is {image_placeholder(processor)} this", [tiny_image(0)])])
    ve.wrap(model, "plphp", fast=True)
    with pytest.raises(ValueError, match="own mask.*cache=mask"):
        greedy(model, batch)
    ve.unwrap(model)


def test_vision_tower_methods_are_refused_with_the_reason():
    model, _ = tiny_model("llava_onevision")
    with pytest.raises(ValueError, match="no vision-tower attention capture"):
        ve.wrap(model, "visionzip")
    assert not ve.get_adapter(model).decoder_layers(model)[0]._forward_pre_hooks


def test_gemma3_refuses_a_per_head_cache_and_keeps_its_mask_off_the_kernels(monkeypatch):
    """A per-head pruned cache decodes without the sliding windows: refused at decoding, the dense cache the way out;
    the kernel router (which knows causality and padding only) is never asked for Gemma3's layers."""
    model, processor = tiny_model("gemma3")
    batch = tiny_batch(processor, [(f"what is {image_placeholder(processor)} this", [tiny_image(0)])])
    ve.wrap(model, "plphp")
    with pytest.raises(ValueError, match="cache=mask"):
        greedy(model, batch)
    ve.unwrap(model)
    ve.wrap(model, "plphp:cache=mask")
    engine = ve.engine_of(model)
    asked = []
    monkeypatch.setattr(engine.router, "backend", lambda run, device: "torch")  # as if VLM_EFFICIENT_KERNELS=torch
    monkeypatch.setattr(engine.router, "attend", lambda *args: asked.append(1))
    greedy(model, batch)
    ve.unwrap(model)
    assert not asked


@pytest.mark.parametrize("spec", ["avl", "streaming", "equal_distance", "equal_distance:layers=1"])
def test_gemma3_refuses_methods_that_assume_a_full_causal_cache(spec):
    """Methods whose decoding state covers every prompt key under the causal mask are refused at wrap, with the
    layer and why; on the other new families they run (tested below or smoke-run here)."""
    model, _ = tiny_model("gemma3")
    with pytest.raises(ValueError, match=rf"{spec.split(':')[0]}: layer \d+ has its own mask \(gemma3: "):
        ve.wrap(model, spec)
    assert not ve.is_wrapped(model)
    for family in ("llava_onevision", "idefics3"):
        model, processor = tiny_model(family)
        ve.wrap(model, spec)
        greedy(model, tiny_batch(processor, [(f"what is {image_placeholder(processor)} this", [tiny_image(0)])]))
        ve.unwrap(model)


# attention edits and masks: the checks the five families run, each against its dense reference (modules imported,
# not their test functions, so that pytest collects them once, here with the new families)
EDIT_CHECKS = [
    (test_heads_engine, "test_empty_edit_matches_sdpa"),
    (test_heads_engine, "test_logit_edit_matches_dense_reference_through_decoding"),
    (test_heads_interventions, "test_pai_attention_term"),
    (test_heads_interventions, "test_vaf"),
    (test_heads_masks, "test_naavit"),
    (test_heads_masks, "test_ee_mllm"),
    (test_heads_masks, "test_window"),
    (test_heads_masks, "test_aki"),
    (test_heads_masks, "test_cmai"),
]


@pytest.mark.parametrize("module, check", EDIT_CHECKS, ids=[name for _, name in EDIT_CHECKS])
def test_attention_edits_and_masks(family, module, check):
    getattr(module, check)(family)


def test_gemma3_static_cache_pruning_is_refused_and_edits_match_the_dynamic_cache():
    model, processor = tiny_model("gemma3")
    batch = tiny_batch(processor, [(f"what is {image_placeholder(processor)} this", [tiny_image(0)])])
    ve.wrap(model, "fastv:layer=2,ratio=0.5")
    with pytest.raises(ValueError, match="dynamic cache"):
        greedy(model, batch, cache_implementation="static")
    ve.unwrap(model)
    ve.wrap(model, "pai")
    dynamic = torch.stack(greedy(model, batch).logits, 1)
    static = torch.stack(greedy(model, batch, cache_implementation="static").logits, 1)
    ve.unwrap(model)
    torch.testing.assert_close(static, dynamic, atol=ATOL, rtol=ATOL)


def test_frame_causal():
    # idefics3 not here: its image's tiles are separated by text tokens, which the check's reference (a frame = a
    # contiguous run of image tokens) would split into frames
    test_heads_frame_causal.test_frame_causal("llava_onevision")


def test_frame_causal_is_gemma3s_own_mask():
    """Gemma3's image tokens already see their whole image (its bidirectional image blocks): frame_causal, whose frames
    are the images, changes nothing there."""
    model, processor = tiny_model("gemma3")
    batch = test_engine.two_samples(processor)
    plain = greedy(model, batch)
    ve.wrap(model, "frame_causal")
    wrapped = greedy(model, batch)
    ve.unwrap(model)
    assert torch.equal(plain.sequences, wrapped.sequences)
    torch.testing.assert_close(torch.stack(wrapped.logits), torch.stack(plain.logits), atol=1e-5, rtol=1e-5)
