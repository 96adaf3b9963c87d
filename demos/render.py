"""What the demo shows of a request: kept tokens and attention drawn over the image as the model saw it, the numbers
table and the raw results."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from .runner import SINK_TAU, Request, Side

DROPPED = 0.2  # brightness left to the cell of a token the layer dropped
SINK = (255, 40, 40)  # outline of a sink token's cell


def _per_pixel(view: Image.Image, grid: tuple[int, int], cells: np.ndarray, values: np.ndarray, fill) -> np.ndarray:
    """[H, W, ...]: each pixel gets the value of the grid cell it lies in (`fill` for cells without a token)."""
    rows, cols = grid
    table = np.full((rows, cols, *values.shape[1:]), fill, dtype=float)
    table[cells[:, 1], cells[:, 2]] = values
    width, height = view.size
    return table[np.arange(height) * rows // height][:, np.arange(width) * cols // width]


def _outline(image: Image.Image, grid: tuple[int, int], cells: np.ndarray) -> Image.Image:
    rows, cols = grid
    width, height = image.size
    draw = ImageDraw.Draw(image)
    for _, row, col in cells:
        box = (col * width / cols, row * height / rows, (col + 1) * width / cols - 1, (row + 1) * height / rows - 1)
        draw.rectangle(box, outline=SINK, width=2)
    return image


def kept_tokens(view: Image.Image, side: Side, layer: int) -> Image.Image:
    """The view with the image tokens that `layer` dropped darkened and its sink tokens outlined."""
    shade = _per_pixel(view, side.grid, side.cells, np.where(side.kept[layer], 1.0, DROPPED), 1.0)
    pixels = np.asarray(view.convert("RGB"), dtype=float) * shade[..., None]
    return _outline(Image.fromarray(pixels.round().astype(np.uint8)), side.grid, side.cells[side.sinks[layer]])


def attention_map(view: Image.Image, side: Side, layer: int, head: int) -> Image.Image:
    """The last prompt token's attention to each image token in `layer` (`head`, or the mean over heads if -1), scaled
    to its largest weight, over the view in grey; tokens the layer dropped are black, sink tokens outlined."""
    weights = side.attention[layer].mean(0) if head < 0 else side.attention[layer, head]
    scaled = weights / max(float(weights.max()), 1e-12)
    colours = np.where(side.kept[layer][:, None], colormaps["inferno"](scaled)[:, :3] * 255, 0.0)
    grey = np.asarray(view.convert("L"), dtype=float)[..., None]
    pixels = 0.25 * grey + 0.75 * _per_pixel(view, side.grid, side.cells, colours, 0.0)
    return _outline(Image.fromarray(pixels.round().astype(np.uint8)), side.grid, side.cells[side.sinks[layer]])


def caption(request: Request, layer: int, head: int) -> str:
    """What the pictures of `layer` and `head` (-1: the mean over heads) show, in numbers."""
    base, wrapped = request.sides
    which = "mean of heads" if head < 0 else f"head {head}"

    def share(side):
        values = side.image_attention[layer]
        return float(values.mean() if head < 0 else values[head])

    def sinks(side):
        return int(side.sinks[layer].sum()) or "none"

    return (
        f"**Layer {layer}, {which}.** The wrapped model keeps {int(wrapped.kept[layer].sum())} of "
        f"{len(wrapped.cells)} image tokens here (dropped ones dark). Sink tokens entering this layer (outlined red; "
        f"VAR's rule, |RMSNorm(h)| > {SINK_TAU:g} in a massive dimension): base {sinks(base)}, wrapped "
        f"{sinks(wrapped)}. The last prompt token's attention to the image: base {share(base):.2f}, wrapped "
        f"{share(wrapped):.2f} (each map is scaled to its largest weight)."
    )


def _speed_up(base: float, wrapped: float) -> str:
    return f"{base / wrapped:.2f}x speed-up"


def _share(base: float, wrapped: float) -> str:
    return f"{wrapped / base:.0%} of base"


def _decode_rate(side: Side) -> float | None:
    steps = side.new_tokens - 1
    return steps / side.decode_ms * 1e3 if side.prefill_ms is not None and steps > 0 and side.decode_ms > 0 else None


def _per_layer(values) -> str:
    return " ".join(f"{v:g}" for v in values)


# (row, value of a side or None while unknown, its text, comparison of the wrapped value with the base one)
MEASURES = (
    ("new tokens", lambda s: s.new_tokens if s.prefill_ms is not None else None, str, None),
    ("time to first token", lambda s: s.prefill_ms, "{:.1f} ms".format, _speed_up),
    ("decode", _decode_rate, "{:.0f} tokens/s".format, lambda base, wrapped: _speed_up(wrapped, base)),
    ("total time", lambda s: s.busy_ms if s.done else None, "{:.1f} ms".format, _speed_up),
    ("KV cache", lambda s: s.stats and s.stats["kv_cache_bytes"], lambda v: f"{v / 2**20:.2f} MiB", _share),
    ("prefill FLOPs", lambda s: s.stats and s.stats["prefill_flops"]["total"], lambda v: f"{v / 1e9:.3f} G", _share),
    ("tokens per layer", lambda s: s.stats and s.stats["tokens_per_layer"], _per_layer, None),
    ("image tokens per layer", lambda s: s.stats and s.stats["visual_tokens_per_layer"], _per_layer, None),
)


def numbers(request: Request) -> str:
    """A markdown table of both sides: times fill in while the answers stream, the rest when a side is done."""
    base, wrapped = request.sides
    lines = [f"| | base | `{wrapped.spec or 'no method'}` | wrapped vs base |", "|---|---|---|---|"]
    for name, value, text, compare in MEASURES:
        values = value(base), value(wrapped)
        cells = [("–" if side.done else "…") if v is None else text(v) for side, v in zip(request.sides, values)]
        ratio = compare(*values) if compare and all(values) else ""
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio} |")
    lines.append("\nTimes are one run of each side, its own compute only; `vlm-efficient compare` gives medians.")
    return "\n".join(lines)


def details(request: Request) -> dict:
    """The raw results of both sides (JSON-ready)."""

    def side(s: Side) -> dict:
        return {
            "methods": s.spec or "base",
            "answer": s.text,
            "new_tokens": s.new_tokens,
            "time_to_first_token_ms": s.prefill_ms,
            "decode_ms": s.decode_ms,
            "total_ms": s.busy_ms,
            "stats": s.stats,
            "image_tokens_kept_per_layer": s.kept.sum(1).tolist(),
            "sink_tokens_per_layer": s.sinks.sum(1).tolist(),
            "image_attention_per_layer_and_head": s.image_attention.round(6).tolist(),
        }

    base, wrapped = request.sides
    return {"base": side(base), "wrapped": side(wrapped)}
