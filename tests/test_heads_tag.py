"""TAG grounding: the merged attention map against a slow reference from the unwrapped model's eager attention
weights (the code's loops: per query token, top-k (layer, head) by image mass, mean map, mean over tokens, / max), the
region and box rules on hand-made maps, the command's outputs and its refusals."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_efficient.heads.tag import TEMPLATE, best_box, ground, query_rows, regions
from vlm_efficient.models import build_inputs
from vlm_efficient.testing import tiny_image, tiny_model


def reference_map(model, processor, image, query, top_heads):
    question = TEMPLATE.format(query=query)
    inputs = build_inputs(processor, image, question, "cpu", torch.float32)
    rows = query_rows(processor.tokenizer, inputs["input_ids"][0], question, query)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions  # per layer [1, H, N, N]
    model.set_attn_implementation("sdpa")
    image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten().tolist()
    side = int(len(image_positions) ** 0.5)  # LLaVA-1.5 / Qwen single image: a square grid in row-major order
    token_maps = []
    for row in rows:
        scored = []
        for layer, weights in enumerate(attentions):
            for head in range(weights.shape[1]):
                cells = weights[0, head, row, image_positions]
                scored.append((float(cells.sum()), layer, head, cells))
        scored.sort(key=lambda entry: -entry[0])
        token_maps.append(torch.stack([cells for *_, cells in scored[:top_heads]]).mean(0))
    merged = torch.stack(token_maps).mean(0).view(side, side)
    return merged / merged.max(), rows


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("top_heads", [1, 10])
def test_map_matches_the_codes_loops(family, top_heads):
    model, processor = tiny_model(family)
    image = tiny_image(3)
    expected, rows = reference_map(model, processor, image, "red star", top_heads)
    result = ground(model, processor, image, "red star", top_heads=top_heads)
    assert result["query_tokens"] == rows and len(rows) >= 2
    heat = torch.tensor(result["heatmap"])
    torch.testing.assert_close(heat, expected.float(), atol=1e-5, rtol=1e-4)
    assert heat.max() == 1.0 and result["box"] is not None
    x0, y0, x1, y1 = result["box"]
    width, height = image.size
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert result["click"] == [round((x0 + x1) / 2, 1), round((y0 + y1) / 2, 1)]


def test_regions_and_the_final_decision():
    heat = torch.tensor([
        [0.9, 0.6, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.7, 0.0, 0.0],  # 8-connected to the first region (diagonal)
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 1.0],
        [0.4, 0.0, 0.0, 0.0, 0.0],  # under the threshold
    ])
    boxes = regions(heat, 0.5)
    assert boxes == [((0, 0, 1, 2), pytest.approx(0.9)), ((3, 4, 3, 4), 1.0)]
    assert best_box(boxes) == 1  # most confident first
    tie = [((0, 0, 0, 0), 1.0), ((0, 0, 2, 2), 1.0)]
    assert best_box(tie) == 1  # then the largest


def test_ground_command_writes_box_and_heatmap(tmp_path):
    from vlm_efficient.cli import main

    image_path = tmp_path / "image.png"
    tiny_image(1).save(image_path)
    out = tmp_path / "out"
    assert main(["ground", "--model", "tiny:llava", "--image", str(image_path), "--query", "blue circle",
                 "--output", str(out)]) == 0
    result = json.loads((out / "ground.json").read_text())
    assert result["query"] == "blue circle" and len(result["box"]) == 4
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, message", [
    ({"template": "Where is it?"}, "placeholder"),
    ({"top_heads": 0}, "top_heads"),
    ({"threshold": 0}, "threshold"),
])
def test_bad_input(kwargs, message):
    model, processor = tiny_model("llava")
    with pytest.raises(ValueError, match=message):
        ground(model, processor, tiny_image(0), "star", **kwargs)
