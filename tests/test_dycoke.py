"""DyCoke's temporal token merging on videos: the kept tokens against the authors' loop written out directly, decoding
against the dense reference, batching, images untouched."""

from __future__ import annotations

import pytest
import torch

import vlm_efficient as ve
from test_engine import greedy
from test_token_ops_helpers import ATOL, assert_close_logits, generate_and_reference
from vlm_efficient.layout import VIDEO
from vlm_efficient.testing import image_placeholder, tiny_batch, tiny_image, tiny_model, tiny_video, \
    video_placeholder  # fmt: skip

# LLM frames per clip: Qwen pairs frames into temporal patches (10 frames -> 5), LLaVA-OneVision keeps each
FRAMES = {"qwen2_vl": 10, "qwen3_vl": 10, "llava_onevision": 6}


def clip_samples(family, processor):
    ph, vp = image_placeholder(processor), video_placeholder(processor)
    samples = [(f"what is {vp} this", []), (f"a much longer prompt with {ph} and then {vp} compare", [tiny_image(1)])]
    frames = FRAMES[family]
    return samples, [[tiny_video(0, frames=frames)], [tiny_video(1, frames=frames, step=2)]]


def reference_kept(frames: list[torch.Tensor], ratio: float, variant: str) -> dict[int, set[int]]:
    """The public code's dycole_ttm as plain loops: {frame: kept cells} of the frames it prunes (`variant` paper:
    each pair ranked by its own similarities; code: by similarities[(i - 2) // 2])."""
    n, count = frames[0].shape[0], int((1 - ratio) * frames[0].shape[0])

    def cos(a, b):
        return [float(torch.nn.functional.cosine_similarity(a[t].double(), b[t].double(), dim=0)) for t in range(n)]

    def lowest(similarity):
        return set(sorted(range(n), key=lambda t: (similarity[t], t))[:count])

    pairs = list(range(0, len(frames) - 1, 2))
    similarities = [cos(frames[i], frames[i + 1]) for i in pairs]
    kept = {}
    for p, i in enumerate(pairs):
        kept[i + 1] = lowest(similarities[p] if variant == "paper" else similarities[(i - 2) // 2])
    for i in range(0, len(frames) - 4, 4):
        kept[i + 2] = lowest(cos(frames[i], frames[i + 2]))
    return kept


@pytest.mark.parametrize("family", list(FRAMES))
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_kept_tokens_follow_the_authors_loop(family, variant):
    model, processor = tiny_model(family)
    samples, videos = clip_samples(family, processor)
    batch = tiny_batch(processor, samples, videos=videos)
    embeds = {}  # the text model's input without the method: the projected visual features

    def record(module, args, kwargs):
        embeds["x"] = kwargs["inputs_embeds"].clone()

    handle = ve.get_adapter(model).text_model(model).register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    ve.wrap(model, f"dycoke:ratio=0.5,variant={variant}")
    with torch.no_grad():
        model(**batch)
    run = ve.engine_of(model).run
    ve.unwrap(model)
    positions = run.input_positions
    layout = run.layout
    for b in range(2):
        kept = set(positions[b][positions[b] >= 0].tolist())
        video = (layout.kind[b] == VIDEO).nonzero().flatten()
        frame_ids = layout.frame[b, video]
        frames = [video[frame_ids == f] for f in range(FRAMES[family] // (2 if family.startswith("qwen") else 1))]
        pruned = reference_kept([embeds["x"][b, rows] for rows in frames], 0.5, variant)
        assert len(frames) < 5 or 2 in pruned  # the window step ran
        for f, rows in enumerate(frames):
            want = set(range(rows.numel())) if f not in pruned else pruned[f]
            assert {t for t, p in enumerate(rows.tolist()) if p in kept} == want, (b, f)
        others = set(range(layout.length)) - set(video.tolist())
        assert {p for p in others if layout.valid[b, p]} <= kept  # text, the image and the newline stay


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_generate_matches_cache_free_reference(family):
    model, processor = tiny_model(family)
    samples, videos = clip_samples(family, processor)
    logits, reference, run, _ = generate_and_reference(model, tiny_batch(processor, samples, videos=videos),
                                                       "dycoke:ratio=0.5")  # fmt: skip
    assert_close_logits(logits, reference)
    assert (run.visual_per_layer[0] < run.layout.num_visual).all()


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_batched_equals_alone_and_images_untouched(family):
    model, processor = tiny_model(family)
    samples, videos = clip_samples(family, processor)
    ve.wrap(model, "dycoke")
    together = greedy(model, tiny_batch(processor, samples, videos=videos))
    for b, sample in enumerate(samples):
        alone = greedy(model, tiny_batch(processor, [sample], videos=[videos[b]]))
        steps = len(alone.logits)
        torch.testing.assert_close(torch.stack(together.logits, 1)[b, :steps], torch.stack(alone.logits, 1)[0],
                                   atol=ATOL, rtol=ATOL)  # fmt: skip
    images = tiny_batch(processor, [(f"what is {image_placeholder(processor)} this", [tiny_image(0)])])
    wrapped = greedy(model, images).sequences
    ve.unwrap(model)
    assert torch.equal(wrapped, greedy(model, images).sequences)


def test_bad_parameters_are_refused():
    model, _ = tiny_model("qwen2_vl")
    for spec, words in [("dycoke:ratio=1", "ratio"), ("dycoke:variant=fast", "paper, code")]:
        with pytest.raises(ValueError, match=words):
            ve.wrap(model, spec)


def frames_as_images(processor):
    """Two samples of a clip's frames given as images (six and four frames), the second with text between frames."""
    ph = image_placeholder(processor)
    clips = [tiny_video(0, frames=6), tiny_video(1, frames=4, step=2)]
    samples = [(f"what happens {ph * 6} here", clips[0]), (f"a longer prompt {ph}{ph} then {ph}{ph} compare", clips[1])]
    return samples


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_frames_as_images_follow_the_authors_loop(family):
    model, processor = tiny_model(family)
    batch = tiny_batch(processor, frames_as_images(processor))
    embeds = {}

    def record(module, args, kwargs):
        embeds["x"] = kwargs["inputs_embeds"].clone()

    handle = ve.get_adapter(model).text_model(model).register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    ve.wrap(model, "dycoke:ratio=0.5,frames=images")
    with torch.no_grad():
        model(**batch)
    run = ve.engine_of(model).run
    ve.unwrap(model)
    positions, layout = run.input_positions, run.layout
    for b, count in enumerate((6, 4)):
        kept = set(positions[b][positions[b] >= 0].tolist())
        frames = [(layout.image_index[b] == k).nonzero().flatten() for k in range(count)]
        pruned = reference_kept([embeds["x"][b, rows] for rows in frames], 0.5, "paper")
        assert set(pruned) == ({1, 2, 3, 5} if count == 6 else {1, 3})
        for f, rows in enumerate(frames):
            want = set(range(rows.numel())) if f not in pruned else pruned[f]
            assert {t for t, p in enumerate(rows.tolist()) if p in kept} == want, (b, f)
        assert {p for p in range(layout.length) if layout.valid[b, p] and layout.image_index[b, p] < 0} <= kept


def test_frames_as_images_generate_and_refusals():
    model, processor = tiny_model("llava")
    logits, reference, run, _ = generate_and_reference(model, tiny_batch(processor, frames_as_images(processor)),
                                                       "dycoke:ratio=0.5,frames=images")  # fmt: skip
    assert_close_logits(logits, reference)
    assert (run.visual_per_layer[0] < run.layout.num_visual).all()
    with pytest.raises(ValueError, match="video.*images"):
        ve.wrap(model, "dycoke:frames=clip")
    model, processor = tiny_model("llava_next")  # anyres tiles: an image is several grids, no frame
    ph = image_placeholder(processor)
    ve.wrap(model, "dycoke:frames=images")
    with pytest.raises(ValueError, match="one grid"):
        model(**tiny_batch(processor, [(f"two {ph}{ph}", [tiny_image(0), tiny_image(1)])]))
