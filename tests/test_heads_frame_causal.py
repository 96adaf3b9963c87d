"""TC-LLaVA's frame-wise block-causal mask on every family: generate() with the KV cache on a left-padded batch (the
second prompt has two images: two frames) against the dense cache-free reference with the rule written out from
input_ids; and, where the rule has a kernel form (one image per sample), the kernels' torch reference route against
the dense path."""

from __future__ import annotations

import os

import pytest
import torch

import vlm_efficient as ve
from test_engine import greedy
from test_heads_masks import check_edit, later, pairs
from vlm_efficient.kernel_plan import ENV
from vlm_efficient.layout import VIDEO, ModalityLayout
from vlm_efficient.heads.frame_causal import frame_ids
from vlm_efficient.testing import FAMILIES, image_placeholder, tiny_batch, tiny_image, tiny_model


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def same_run(p):
    """[B, T, T]: both positions in the same contiguous run of visual tokens (an image: one frame)."""
    start = p.visual & ~torch.nn.functional.pad(p.visual, (1, 0))[:, :-1]
    run = torch.where(p.visual, start.long().cumsum(1), -1)
    return (run[:, :, None] == run[:, None, :]) & p.visual[:, :, None]


def test_frame_causal(family):
    check_edit(family, "frame_causal", lambda p, batch: {"allow": pairs(p.visual, p.visual) & same_run(p) & later(p)})


def test_frame_causal_on_some_layers(family):
    check_edit(family, "frame_causal:layers=1-2",
               lambda p, batch: {"allow": pairs(p.visual, p.visual) & same_run(p) & later(p)}, layers=(1, 2))


def test_video_frames_are_their_temporal_index():
    kind = torch.tensor([[1, 3, 3, 3, 3, 2, 2]])
    image_index = torch.tensor([[-1, 0, 0, 0, 0, 1, 1]])
    part = torch.tensor([[-1, 0, 0, 1, 1, 0, 0]])
    coords = torch.stack([part, part.clamp(max=0), part.clamp(max=0)], -1)
    layout = ModalityLayout(kind=kind, image_index=image_index, coords=coords, images=[[]], has_visual=True,
                            padded=False)
    frames = frame_ids(layout)[0].tolist()
    assert frames[0] == -1 and frames[1] == frames[2] != frames[3] == frames[4] and frames[5] == frames[6]
    assert len({frames[1], frames[3], frames[5]}) == 3 and kind[0, 1] == VIDEO


def one_image_each(processor):
    ph = image_placeholder(processor)
    return tiny_batch(processor, [(f"what is {ph} this", [tiny_image(0)]),
                                  (f"a much longer prompt with {ph} here, tell me", [tiny_image(1)])])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_kernel_route_equals_dense_for_one_frame(family):
    model, processor = tiny_model(family)
    batch = one_image_each(processor)
    ve.wrap(model, "frame_causal")
    engine = ve.engine_of(model)
    try:
        os.environ[ENV] = "off"
        dense = greedy(model, batch)
        os.environ[ENV] = "reference"
        routed = greedy(model, batch)
        routes = dict(engine.router.routes(engine.run))
    finally:
        os.environ.pop(ENV, None)
        ve.unwrap(model)
    assert {routes[("prefill", layer)] for layer in range(4)} == {"mask"}
    assert torch.equal(dense.sequences, routed.sequences)
    torch.testing.assert_close(torch.stack(routed.logits), torch.stack(dense.logits), atol=5e-5, rtol=5e-5)
