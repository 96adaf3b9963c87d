"""TAG, tuning-free attention-driven grounding (Xu et al., AAAI 2025, "Attention-driven GUI Grounding: Leveraging
Pretrained Multimodal Large Language Models without Fine-Tuning", arXiv 2412.10840; code
github.com/strawberryCheeseCake2/TAG, core_utils/tag.py): a queried element is localised from the attention that the
query's own tokens, inside a constructed prompt, pay the image.

    vlm-efficient ground --model testbed --image scene.png --query "red star" --output ground_out

As the code does it (AttentionDrivenGrounding.token_to_learnable_query and forward), from one prefill:
- the prompt is a template around the query (the code's optical-character-grounding prompt by default:
  `What is the bounding box of "{query}" in the image?`); the chosen tokens are the query's tokens in it;
- per chosen token, every (layer, head) is ranked by the attention mass the token pays the image; the top 10 heads'
  attention over the image grid is averaged; the maps of the chosen tokens are averaged, then divided by their max;
- cells >= 0.5 form 8-connected regions; each region's bounding box gets the max of the map inside it as its
  confidence; boxes under 0.5 are dropped; the answer is the most confident box, then the largest (eval_main.py's
  final decision), and its centre is the click point.
The code maps the LLM's image tokens to ViT patches through MiniCPM's resampler cross-attention; here every visual
token is a grid cell already (layout coords), so the map is over the image grid directly (LLaVA-NeXT: the base
image's grid; the high-resolution parts and row newlines are left out). Batch of one prompt, one image.

On the testbed world (`python -m vlm_efficient.heads.tag --scenes 50`) every object with a unique referring expression
is a query and a box hits when its centre lies in the object's ground-truth box (the code's click-point accuracy).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm_efficient.method import AttentionEdit, Method

TEMPLATE = 'What is the bounding box of "{query}" in the image?'  # the code's OCG prompt


@dataclass
class _QueryAttention(Method):
    """Records, in the prefill, the attention that the chosen rows (original positions) pay every key, per layer."""

    name = "tag_recorder"
    rows: tuple = ()
    found: dict = field(default_factory=dict)

    def attention_edit(self, layer, run, context):
        if not context.prefill:
            return None

        def record(probs):
            positions = context.query_positions[0].tolist()
            picked = [positions.index(row) for row in self.rows]
            self.found[layer] = (probs[0][:, picked].float(), context.key_positions[0])  # [H, t, kv]
            return probs

        return AttentionEdit(post_softmax=record)


def query_rows(tokenizer, input_ids: torch.Tensor, question: str, query: str) -> list[int]:
    """Positions in input_ids [N] of the query's tokens: the question's tokens that overlap the query's characters,
    found as a run in input_ids after the image."""
    start = question.rfind(query)
    if not query.strip() or start < 0:
        raise ValueError(f"tag: the query {query!r} is not in the prompt {question!r}: the template needs {{query}}")
    encoded = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    chosen = [token for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"])
              if a < start + len(query) and b > start]  # fmt: skip
    ids = input_ids.tolist()
    for first in range(len(ids) - len(chosen), -1, -1):  # the last occurrence: the question follows the image
        if ids[first : first + len(chosen)] == chosen:
            return list(range(first, first + len(chosen)))
    raise ValueError(f"tag: the query's tokens {chosen} do not appear in the prompt's input_ids (the processor "
                     "tokenised the prompt differently); put the query between spaces in the template")


def attention_map(found: dict, layout, rows: list[int], top_heads: int) -> torch.Tensor:
    """[rows, cols] TAG's merged map over the image grid (part 0 of the first image), divided by its max."""
    image = layout.visual[0] & (layout.image_index[0] == 0) & (layout.coords[0, :, 0] == 0)
    coords = layout.coords[0]
    grid_rows, grid_cols = int(coords[image, 1].max()) + 1, int(coords[image, 2].max()) + 1
    per_token = []
    for t in range(len(rows)):
        maps, masses = [], []
        for layer in sorted(found):
            probs, keys = found[layer]
            on_image = image.to(keys.device)[keys.clamp(min=0)] & (keys >= 0)
            cells = probs[:, t][:, on_image]  # [H, cells]
            grid = torch.zeros(probs.shape[0], grid_rows * grid_cols, device=cells.device)
            cell = coords[keys[on_image].to(coords.device)]
            grid[:, (cell[:, 1] * grid_cols + cell[:, 2]).to(cells.device)] = cells
            maps.append(grid)
            masses.append(cells.sum(-1))
        maps, masses = torch.cat(maps), torch.cat(masses)  # every (layer, head)
        top = masses.topk(min(top_heads, masses.numel())).indices
        per_token.append(maps[top].mean(0))
    merged = torch.stack(per_token).mean(0).view(grid_rows, grid_cols)
    return merged / merged.max().clamp(min=1e-30)


def regions(heat: torch.Tensor, threshold: float) -> list[tuple[tuple[int, int, int, int], float]]:
    """The code's find_connected_regions_with_confidence + filter_bbox on a [rows, cols] map: 8-connected regions of
    cells >= threshold, as ((row0, col0, row1, col1) inclusive, confidence = max inside the box), confidence >=
    threshold. As the code does, a region's bounding box is marked visited (regions inside it are not counted)."""
    mask = (heat >= threshold).tolist()
    rows, cols = len(mask), len(mask[0])
    visited = [[False] * cols for _ in range(rows)]
    boxes = []
    for i in range(rows):
        for j in range(cols):
            if not mask[i][j] or visited[i][j]:
                continue
            queue, cells = deque([(i, j)]), []
            while queue:
                a, b = queue.popleft()
                if not (0 <= a < rows and 0 <= b < cols) or visited[a][b] or not mask[a][b]:
                    continue
                visited[a][b] = True
                cells.append((a, b))
                queue.extend((a + da, b + db) for da in (-1, 0, 1) for db in (-1, 0, 1))
            r0, r1 = min(c[0] for c in cells), max(c[0] for c in cells)
            c0, c1 = min(c[1] for c in cells), max(c[1] for c in cells)
            for a in range(r0, r1 + 1):
                for b in range(c0, c1 + 1):
                    visited[a][b] = True
            confidence = float(heat[r0 : r1 + 1, c0 : c1 + 1].max())
            if confidence >= threshold:
                boxes.append(((r0, c0, r1, c1), confidence))
    return boxes


def best_box(boxes) -> int:
    """eval_main.py's final decision over regions() boxes: the index of the most confident box, then the largest."""
    area = lambda box: (box[0][2] - box[0][0] + 1) * (box[0][3] - box[0][1] + 1)  # noqa: E731
    return max(range(len(boxes)), key=lambda i: (boxes[i][1], area(boxes[i])))


def _grid_to_pixels(box, grid: tuple[int, int], image_size: tuple[int, int], center_crop: bool):
    """Grid cells (row0, col0, row1, col1) -> pixel box (x0, y0, x1, y1) of the original image. A CLIP processor
    resizes the short side and crops the centre square: the grid then covers that square only."""
    width, height = image_size
    left, top, span_x, span_y = 0.0, 0.0, float(width), float(height)
    if center_crop:
        side = min(width, height)
        left, top, span_x, span_y = (width - side) / 2, (height - side) / 2, side, side
    r0, c0, r1, c1 = box
    rows, cols = grid
    return (left + c0 * span_x / cols, top + r0 * span_y / rows, left + (c1 + 1) * span_x / cols,
            top + (r1 + 1) * span_y / rows)  # fmt: skip


def ground(model, processor, image, query: str, *, template: str = TEMPLATE, top_heads: int = 10,
           threshold: float = 0.5) -> dict:
    """TAG on one image and query: {"box": [x0, y0, x1, y1] pixels or None, "confidence", "click", "heatmap": [rows,
    cols] list, "boxes": every candidate}."""
    import vlm_efficient as ve
    from vlm_efficient.models import build_inputs

    if "{query}" not in template:
        raise ValueError(f"tag: template {template!r} has no {{query}} placeholder")
    if top_heads < 1 or not 0 < threshold <= 1:
        raise ValueError(f"tag: top_heads={top_heads} must be >= 1 and threshold={threshold} in (0, 1]")
    question = template.format(query=query)
    device = next(model.parameters()).device
    inputs = build_inputs(processor, image, question, device, next(model.parameters()).dtype)
    rows = query_rows(getattr(processor, "tokenizer", processor), inputs["input_ids"][0], question, query)
    recorder = _QueryAttention(rows=tuple(rows))
    ve.wrap(model, [recorder])
    try:
        with torch.no_grad():
            model(**inputs)
        layout = ve.engine_of(model).run.layout
    finally:
        ve.unwrap(model)
    heat = attention_map(recorder.found, layout, rows, top_heads).cpu()
    boxes = regions(heat, threshold)
    image_processor = getattr(processor, "image_processor", None)
    crop = bool(getattr(image_processor, "do_center_crop", False))
    pixel_boxes = [(_grid_to_pixels(box, tuple(heat.shape), image.size, crop), confidence) for box, confidence in boxes]
    result = {"query": query, "prompt": question, "query_tokens": rows, "heatmap": heat.tolist(),
              "boxes": [{"box": [round(v, 1) for v in box], "confidence": round(c, 4)} for box, c in pixel_boxes],
              "box": None, "confidence": None, "click": None}  # fmt: skip
    if boxes:
        box, confidence = pixel_boxes[best_box(boxes)]
        result.update(box=[round(v, 1) for v in box], confidence=round(confidence, 4),
                      click=[round((box[0] + box[2]) / 2, 1), round((box[1] + box[3]) / 2, 1)])
    return result


def save_heatmap(image, result: dict, path: Path) -> None:
    """The map over the image (nearest-upsampled to its grid cells) with the chosen box, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 5))
    axis.imshow(image)
    width, height = image.size
    axis.imshow(torch.tensor(result["heatmap"]).numpy(), cmap="jet", alpha=0.45, extent=(0, width, height, 0),
                interpolation="nearest")
    if result["box"] is not None:
        x0, y0, x1, y1 = result["box"]
        axis.add_patch(matplotlib.patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=2))
    axis.set_title(f"{result['query']}: confidence {result['confidence']}")
    axis.axis("off")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def testbed_accuracy(model, processor, scenes: int, start: int = 0, **kwargs) -> dict:
    """Click-point accuracy on held-out testbed scenes: one query per object with a unique referring expression."""
    from vlm_efficient.evals.testbed import tasks, world

    hits = total = no_box = 0
    chance = 0.0
    for index in range(start, start + scenes):
        scene = world.make_scene("test", index)
        image = scene.image()
        for obj in scene.objects:
            refs = tasks.referring_expressions(scene, obj)
            if not refs:
                continue
            result = ground(model, processor, image, refs[0], **kwargs)
            x0, y0, x1, y1 = obj.box
            total += 1
            chance += (x1 - x0) * (y1 - y0) / (image.size[0] * image.size[1])
            if result["click"] is None:
                no_box += 1
                continue
            x, y = result["click"]
            hits += x0 <= x <= x1 and y0 <= y <= y1
    return {"scenes": scenes, "start": start, "queries": total, "accuracy": hits / max(total, 1),
            "no_box": no_box, "random_click": chance / max(total, 1)}


def _ground(args) -> int:
    from PIL import Image

    from vlm_efficient.models import load_model

    try:
        image = Image.open(args.image).convert("RGB")
    except (FileNotFoundError, OSError):
        raise ValueError(f"--image {args.image}: not an image file PIL can read") from None
    model, processor = load_model(args.model, device=args.device or "cpu", dtype=getattr(torch, args.dtype))
    result = ground(model, processor, image, args.query, template=args.template, top_heads=args.top_heads,
                    threshold=args.threshold)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    save_heatmap(image, result, out / "heatmap.png")
    (out / "ground.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("query", "box", "confidence", "click")}))
    print(f"wrote {out / 'ground.json'} and {out / 'heatmap.png'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("ground", help="TAG: a box and a heatmap for a text query, from attention maps")
    p.add_argument("--model", default="testbed", help="testbed, a HF directory or hub id, or tiny:<family>")
    p.add_argument("--image", required=True)
    p.add_argument("--query", required=True, help="the element to find, e.g. 'red star'")
    p.add_argument("--template", default=TEMPLATE, help="the prompt around {query} (default: TAG's OCG prompt)")
    p.add_argument("--top-heads", type=int, default=10, help="heads kept per query token (TAG: 10)")
    p.add_argument("--threshold", type=float, default=0.5, help="map threshold and box confidence (TAG: 0.5)")
    p.add_argument("--output", default="ground_out", help="directory for ground.json and heatmap.png")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_ground)


if __name__ == "__main__":
    import argparse

    from vlm_efficient.models import load_model

    parser = argparse.ArgumentParser(description="TAG's click-point accuracy on held-out testbed scenes (CPU)")
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--template", default=TEMPLATE)
    args = parser.parse_args()
    testbed_model, testbed_processor = load_model("testbed")
    print(json.dumps(testbed_accuracy(testbed_model, testbed_processor, args.scenes, args.start,
                                      template=args.template)))
