"""Qwen video inputs (pixel_values_videos, video_grid_thw, temporal positions): the tiny video fixture, the video
layout (a frame index and per-frame grid cells per token), the exactness contract with clips in the prompts, and the
methods that choose per image acting per frame."""

from __future__ import annotations

import pytest
import torch

import vlm_efficient as ve
from test_engine import assert_noop_wrap_is_exact, greedy
from test_token_ops_helpers import ATOL, assert_close_logits, generate_and_reference
from test_token_ops_vision import _changed_rows, _expected, _plain_inputs
from vlm_efficient.layout import VIDEO
from vlm_efficient.selection import keep_count
from vlm_efficient.testing import (
    image_placeholder,
    tiny_batch,
    tiny_image,
    tiny_model,
    tiny_video,
    video_placeholder,
)

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FRAME_TOKENS = 16  # 4x4 merged tokens per temporal patch at the default size


def video_samples(processor):
    """(samples, videos): a short prompt with a 4-frame clip; a longer one with an image and a 3-frame clip (padded
    to 4 frames by repeating its last, as Qwen's video processor does)."""
    ph, vp = image_placeholder(processor), video_placeholder(processor)
    samples = [(f"what is {vp} this", []), (f"a much longer prompt with {ph} and then {vp} compare them", [tiny_image(1)])]
    return samples, [[tiny_video(0)], [tiny_video(1, frames=3)]]


def video_batch(processor):
    samples, videos = video_samples(processor)
    return tiny_batch(processor, samples, videos=videos)


@pytest.fixture(params=QWEN)
def family(request):
    return request.param


@torch.no_grad()
def test_a_still_clip_is_the_image_and_frames_pair_into_temporal_patches(family):
    """Two equal frames give the image's pixels (an image is a temporal patch of one repeated frame); a clip of two
    different frames takes slice t of each patch from frame t."""
    model, processor = tiny_model(family)
    vp = video_placeholder(processor)
    still = tiny_video(3, frames=2, step=0)
    image = tiny_batch(processor, [(image_placeholder(processor), [still[0]])])
    video = tiny_batch(processor, [(vp, [])], videos=[[still]])
    assert torch.equal(video["pixel_values_videos"], image["pixel_values"])
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()
    clip = tiny_video(3, frames=2)
    moving = tiny_batch(processor, [(vp, [])], videos=[[clip]])["pixel_values_videos"].view(-1, 3, 2, *[
        model.config.vision_config.patch_size] * 2)
    for t in range(2):
        alone = tiny_batch(processor, [(vp, [])], videos=[[[clip[t]] * 2]])["pixel_values_videos"]
        assert torch.equal(moving[:, :, t], alone.view_as(moving)[:, :, t])
    assert not torch.equal(moving[:, :, 0], moving[:, :, 1])


@torch.no_grad()
def test_video_layout_has_a_frame_index_and_per_frame_grid_cells(family):
    model, processor = tiny_model(family)
    batch = video_batch(processor)
    assert batch["video_grid_thw"].tolist() == [[2, 8, 8], [2, 8, 8]]
    ve.wrap(model, "")
    model(**batch)
    layout = ve.engine_of(model).run.layout
    ve.unwrap(model)
    for b in range(2):
        video = layout.kind[b] == VIDEO
        assert int(video.sum()) == 2 * FRAME_TOKENS
        item = len(layout.images[b]) - 1  # the clip comes after the image in sample 1
        assert layout.images[b][item].video and (layout.image_index[b, video] == item).all()
        frames = layout.frame[b, video]
        assert frames.tolist() == [0] * FRAME_TOKENS + [1] * FRAME_TOKENS  # frames in prompt order
        cells = layout.coords[b, video, 1:]
        grid = torch.cartesian_prod(torch.arange(4), torch.arange(4))
        assert torch.equal(cells, torch.cat([grid, grid]))  # each frame has its own 4x4 grid
        assert (layout.frame[b, ~video] == -1).all()
    if family == "qwen3_vl":  # frames separated by their timestamps in the prompt: the clip is not contiguous
        positions = (layout.kind[0] == VIDEO).nonzero().flatten()
        assert (positions[FRAME_TOKENS] - positions[FRAME_TOKENS - 1]) > 1


def test_noop_wrap_and_unwrap_are_exact_with_videos(family):
    model, processor = tiny_model(family)
    assert_noop_wrap_is_exact(model, video_batch(processor))


VIDEO_SPECS = ["fastv:layer=2,ratio=0.5", "dart:layer=2,ratio=0.5", "visionzip:ratio=0.5,contextual=0.4",
               "divprune:ratio=0.5", "pool:size=2"]  # fmt: skip


@pytest.mark.parametrize("spec", VIDEO_SPECS)
def test_generate_with_videos_matches_cache_free_reference(family, spec):
    model, processor = tiny_model(family)
    batch = video_batch(processor)
    plain, _ = _plain_inputs(model, batch)

    def extra(run, methods, n):  # rows merged before the LLM (visionzip, pool) enter layer 0 with their new features
        run.scratch["test_plain"] = plain
        return _changed_rows(run, methods, n) if run.input_positions is not None else ({}, {}, {})

    logits, reference, run, _ = generate_and_reference(model, batch, spec, extra)
    assert_close_logits(logits, reference)
    last = run.layer_positions[len(run.layer_positions) - 1]  # original positions of the last layer's rows
    for b in range(2):
        video = run.layout.kind[b, last[b][last[b] >= 0]] == VIDEO
        assert 0 < int(video.sum()) < 2 * FRAME_TOKENS  # the clip was reduced, not dropped


@pytest.mark.parametrize("spec", VIDEO_SPECS)
def test_batched_with_videos_equals_each_sample_alone(family, spec):
    model, processor = tiny_model(family)
    samples, videos = video_samples(processor)
    ve.wrap(model, spec)
    together = greedy(model, tiny_batch(processor, samples, videos=videos))
    for b, sample in enumerate(samples):
        alone = greedy(model, tiny_batch(processor, [sample], videos=[videos[b]]))
        torch.testing.assert_close(torch.stack(together.logits, 1)[b], torch.stack(alone.logits, 1)[0], atol=ATOL,
                                   rtol=ATOL)  # fmt: skip
        new = len(alone.logits)
        assert torch.equal(together.sequences[b, -new:], alone.sequences[0, -new:])
    ve.unwrap(model)


@pytest.mark.parametrize("spec, ratio", [("divprune:ratio=0.75", 0.75), ("random:ratio=0.75", 0.75),
                                         ("visionzip:ratio=0.75", 0.75)])  # fmt: skip
def test_per_image_methods_choose_per_frame(family, spec, ratio):
    """Each frame keeps round((1 - R) * 16) tokens, the image in sample 1 as many: frames are images here."""
    model, processor = tiny_model(family)
    batch = video_batch(processor)
    ve.wrap(model, spec)
    with torch.no_grad():
        model(**batch)
    run = ve.engine_of(model).run
    ve.unwrap(model)
    positions = run.input_positions
    per_frame = int(keep_count(torch.tensor([FRAME_TOKENS]), ratio))
    for b in range(2):
        kept = positions[b][positions[b] >= 0]
        frames = run.layout.frame[b, kept]
        video = run.layout.kind[b, kept] == VIDEO
        assert frames[video].bincount().tolist() == [per_frame, per_frame]
        assert int((run.layout.visual[b, kept] & ~video).sum()) == (per_frame if b == 1 else 0)


def test_pool_stays_inside_a_frame(family):
    model, processor = tiny_model(family)
    ve.wrap(model, "pool:size=2")
    with torch.no_grad():
        model(**video_batch(processor))
    run = ve.engine_of(model).run
    ve.unwrap(model)
    for b in range(2):
        kept = run.input_positions[b][run.input_positions[b] >= 0]
        video = run.layout.kind[b, kept] == VIDEO
        assert run.layout.frame[b, kept][video].bincount().tolist() == [4, 4]  # each 4x4 frame pools to 2x2


def test_window_mask_stays_inside_a_frame(family):
    """An image token sees the tokens of its own frame within one cell (and text): the same cell of the next frame is
    blocked. Checked as the decoding logits against a dense reference with the rule written out pair by pair."""
    model, processor = tiny_model(family)
    batch = video_batch(processor)

    def extra(run, methods, total):
        layout, grow = run.layout, total - run.layout.length
        frame = torch.nn.functional.pad(layout.frame, (0, grow), value=-1)
        cells = torch.nn.functional.pad(layout.coords, (0, 0, 0, grow), value=-1)
        image = torch.nn.functional.pad(layout.image_index, (0, grow), value=-1)
        visual = torch.nn.functional.pad(layout.visual, (0, grow), value=False)
        is_video = torch.nn.functional.pad(layout.kind == VIDEO, (0, grow), value=False)
        same_unit = (image[:, :, None] == image[:, None, :]) & (frame[:, :, None] == frame[:, None, :])
        same_grid = (cells[:, :, None, 0] == cells[:, None, :, 0]) & (cells[:, :, None, 0] >= 0)
        near = same_unit & same_grid & ((cells[:, :, None, 1:] - cells[:, None, :, 1:]).abs().amax(-1) <= 1)
        itself = torch.eye(total, dtype=torch.bool)[None]
        blocked = visual[:, :, None] & visual[:, None, :] & ~near & ~itself
        next_frame_same_cell = is_video[:, :, None] & is_video[:, None, :] & (frame[:, :, None] == frame[:, None, :] + 1)
        next_frame_same_cell &= (cells[:, :, None, 1:] == cells[:, None, :, 1:]).all(-1)
        assert next_frame_same_cell.any() and (blocked | ~next_frame_same_cell).all()
        return {layer: ~blocked for layer in range(4)}, {}, {}

    logits, reference, _, _ = generate_and_reference(model, batch, "window:size=1", extra)
    assert_close_logits(logits, reference)


@torch.no_grad()
def test_visionzip_follows_its_formula_in_every_frame(family):
    """VisionZip's dominant and contextual tokens of each frame, recomputed from the tower's attention of that frame
    (the tower attends within a frame), against the wrapped model's kept rows."""
    model, processor = tiny_model(family)
    samples, videos = video_samples(processor)
    batch = tiny_batch(processor, samples[:1], videos=videos[:1])  # one clip: the tower's calls are its frames
    plain, calls = _plain_inputs(model, batch)
    ve.wrap(model, "visionzip:ratio=0.5,contextual=0.4")
    model(**batch)
    run = ve.engine_of(model).run
    ve.unwrap(model)
    visual = model.model.visual
    unit = visual.spatial_merge_size**2
    records = []
    for module, q, k, scaling in calls:
        if module is visual.blocks[-1].attn:
            probs = (q[0] @ k[0].transpose(-1, -2) * scaling).softmax(-1)
            records.append({"score": probs.mean(dim=(0, 1)).view(-1, unit).mean(1),
                            "metric": k[0].mean(0).view(-1, unit, k.shape[-1]).mean(1)})  # fmt: skip
    assert len(records) == 2  # one per frame
    if family == "qwen2_5_vl":  # the tower's rows are in window order: match them to the merger's output rows
        seen = {}
        h1 = visual.merger.register_forward_hook(lambda m, a, o: seen.update(block=o) and None)
        h2 = visual.register_forward_hook(lambda m, a, o: seen.update(out=o.pooler_output) and None)
        model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
        h1.remove(), h2.remove()
        for f, record in enumerate(records):
            block = seen["block"][f * FRAME_TOKENS : (f + 1) * FRAME_TOKENS]
            out = seen["out"][f * FRAME_TOKENS : (f + 1) * FRAME_TOKENS]
            order = [next(i for i in range(FRAME_TOKENS) if torch.equal(block[i], out[j])) for j in range(16)]
            record["score"], record["metric"] = record["score"][order], record["metric"][order]
    video_positions = (run.layout.kind[0] == VIDEO).nonzero().flatten()
    kept_positions = set(run.input_positions[0].tolist())
    for f, record in enumerate(records):
        frame_positions = video_positions[f * FRAME_TOKENS : (f + 1) * FRAME_TOKENS]
        kept, _ = _expected("visionzip", record, plain[0, frame_positions])
        got = {i for i, p in enumerate(frame_positions.tolist()) if p in kept_positions}
        assert got == kept, f


@pytest.mark.parametrize("spec", ["", "fastv:layer=2,ratio=0.5", "dycoke:ratio=0.7", "divprune:ratio=0.5"])
def test_fast_path_with_videos_equals_dynamic_path(family, spec):
    """wrap(..., fast=True) on a padded batch of a clip alone and an image with a clip: the dynamic path's greedy tokens
    and logits (the video methods' selections run in the lean prefill, the static step decodes)."""
    from test_fast_path import assert_same, dynamic_then_fast

    model, processor = tiny_model(family)
    dynamic, fast = dynamic_then_fast(model, video_batch(processor), spec)
    assert_same(dynamic, fast)
    assert ve.engine_of(model).fast_path.last_step is not None  # decoded on the static step
    ve.unwrap(model)


@pytest.mark.parametrize("spec", ["dycoke:ratio=0.7", "divprune:ratio=0.5", "random:ratio=0.5"])
def test_video_kept_counts_are_known_on_the_host(family, spec, monkeypatch):
    """DyCoke and the per-frame choosers give each sample's kept count from the host (frame sizes and the ratio), so
    shrinking reads nothing; the counts equal the keep's own (checked by checking_host_counts)."""
    from test_token_ops_helpers import checking_host_counts

    given = checking_host_counts(monkeypatch)
    model, processor = tiny_model(family)
    ve.wrap(model, spec)
    greedy(model, video_batch(processor))
    ve.unwrap(model)
    assert given == [True]


def test_unit_rows_need_no_host_read(family, monkeypatch):
    """Before anything is pruned, each frame's and image's rows come from one device sort cut at sizes the host knows
    (no nonzero, which waits for the device), and equal the rows a nonzero per unit finds; after pruning they are
    found by nonzero."""
    from vlm_efficient.selection import unit_rows

    model, processor = tiny_model(family)
    ve.wrap(model, "")
    greedy(model, video_batch(processor))
    run = ve.engine_of(model).latest_run
    ve.unwrap(model)
    run.rows = run.input_positions = None
    layout = run.layout
    expected = [(b, item, ((layout.image_index[b] == item) & (layout.frame[b] == unit)).nonzero().flatten())
                for b, items in enumerate(layout.images) for item, tokens in enumerate(items) for unit in tokens.units]
    assert len(expected) > 4  # a 4-frame clip's two temporal patches, a padded 3-frame one's and an image
    with monkeypatch.context() as patched:
        patched.setattr(torch.Tensor, "nonzero", lambda *args, **kwargs: pytest.fail("nonzero read the device"))
        found = unit_rows(run, layout.image_index, layout.frame)
    assert [(b, item) for b, item, _ in found] == [(b, item) for b, item, _ in expected]
    assert all(torch.equal(rows, want) for (_, _, rows), (_, _, want) in zip(found, expected))


def _vision_host_reads(model, batch) -> int:
    """tolist / item calls inside the vision tower during a greedy generate() (the tower's host reads)."""
    reads, inside = [0], [False]
    visual = model.model.visual
    handles = [visual.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
               visual.register_forward_hook(lambda *_: inside.__setitem__(0, False))]  # fmt: skip
    tolist, item = torch.Tensor.tolist, torch.Tensor.item

    def counted(read):
        def call(self, *args, **kwargs):
            reads[0] += inside[0]
            return read(self, *args, **kwargs)
        return call

    try:
        torch.Tensor.tolist, torch.Tensor.item = counted(tolist), counted(item)
        greedy(model, batch)
    finally:
        torch.Tensor.tolist, torch.Tensor.item = tolist, item
        for handle in handles:
            handle.remove()
    return reads[0]


@pytest.mark.parametrize("image_size", [None, (112, 84)])
def test_fast_path_packs_the_vision_tower(family, image_size):
    """On the fast path the packed vision tower (every image and frame of a call in one sequence) runs without
    transformers' host read per layer: frames and images of one size as one batched attention, others cut as
    transformers cuts them; the dynamic path's tokens and logits either way. unwrap gives the tower its own attention
    back, also on a deep copy (which is wrapped again from the unwrapped copy)."""
    import copy

    from test_fast_path import assert_same

    model, processor = tiny_model(family)
    ph, vp = image_placeholder(processor), video_placeholder(processor)
    samples = [(f"what is {ph} and {vp}", [tiny_image(0)]),  # (112, 84): the images of one call of two sizes
               (f"a much longer prompt with {ph} and then {vp} compare them", [tiny_image(1, image_size)])]
    batch = tiny_batch(processor, samples, videos=[[tiny_video(0)], [tiny_video(1, frames=3)]])
    layers = len(model.model.visual.blocks)
    plain_reads = _vision_host_reads(model, batch)
    dynamic = greedy(model, batch)
    ve.wrap(model, "", fast=True)
    assert model.config.vision_config._attn_implementation == "vlm_efficient_flash_packed"
    fast_reads = _vision_host_reads(model, batch)
    assert_same(dynamic, greedy(model, batch))
    if image_size is None:
        assert fast_reads <= plain_reads - layers  # no read per layer
    copied = copy.deepcopy(model)  # wrapped again from the unwrapped copy
    assert copied.config.vision_config._attn_implementation == "vlm_efficient_flash_packed"
    ve.unwrap(copied)
    assert copied.config.vision_config._attn_implementation == "sdpa"
    ve.unwrap(model)
    assert model.config.vision_config._attn_implementation == "sdpa"
