"""A procedural world of coloured shapes and signs, drawn with PIL, with complete ground truth.

A scene is a 336x336 image cut into a 3x3 grid of cells. Each occupied cell holds one object (a shape of some colour
and size, slightly jittered and rotated) or a sign with a short word on it. Scenes have a *theme* that favours a few
shapes, so objects co-occur the way COCO objects do (POPE's adversarial negatives need that), and shapes have unequal
base frequencies (POPE's popular negatives need that).

Every scene is a pure function of its integer seed. The seed ranges of the splits are disjoint:

    train       [0, 1_000_000_000)
    validation  [1_000_000_000, 1_000_100_000)
    test        [2_000_000_000, 2_000_100_000)

so no held-out scene is ever drawn in training. `make_scene(split, index)` gives the scene; `scene.image()` draws it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import ClassVar
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 336
GRID = 3
CELL = IMAGE_SIZE // GRID  # 112

# The object vocabulary, most frequent first (base weight ~ 1 / (rank + 2)).
SHAPES = (
    "circle", "square", "triangle", "star", "heart", "cross",
    "diamond", "hexagon", "ring", "arrow", "crescent", "pentagon",
)  # fmt: skip
SHAPE_WEIGHTS = {s: 1.0 / (rank + 2) for rank, s in enumerate(SHAPES)}

# Themes: each favours three shapes, which therefore co-occur (adversarial POPE negatives).
THEMES = {
    "sky": ("star", "crescent", "circle"),
    "cards": ("heart", "diamond", "cross"),
    "blocks": ("square", "triangle", "hexagon"),
    "signs": ("arrow", "ring", "pentagon"),
}
THEME_PROB = 0.65  # chance that an object is drawn from the scene's theme rather than from all shapes

COLOURS = {
    "red": (215, 35, 35),
    "green": (30, 165, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "orange": (250, 135, 20),
    "purple": (140, 50, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES = {"small": (36, 50), "large": (72, 94)}  # side of the bounding square, in pixels

BACKGROUNDS = {
    "gray": (150, 150, 150),
    "light gray": (205, 205, 205),
    "beige": (228, 212, 178),
    "light blue": (178, 204, 232),
    "dark blue": (28, 38, 88),
    "dark green": (28, 72, 44),
}
BACKGROUND_STYLES = ("plain", "gradient", "noisy", "striped")

WORDS = (
    "stop", "open", "exit", "sale", "cafe", "bank", "park", "taxi", "hotel", "bus",
    "shop", "food", "gate", "zoo", "play", "help", "book", "milk", "cake", "fish",
    "lamp", "road", "wind", "rain", "sun", "moon", "tree", "door", "bike", "farm",
    "mall", "pool",
)  # fmt: skip
SIGN_COLOURS = {"white": ((250, 250, 250), (20, 20, 20)), "black": ((20, 20, 20), (250, 250, 250)),
                "yellow": ((245, 215, 30), (20, 20, 20)), "red": ((200, 30, 30), (250, 250, 250))}  # fmt: skip

ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")

SPLITS = {
    "train": (0, 1_000_000_000),
    "validation": (1_000_000_000, 1_000_100_000),
    "test": (2_000_000_000, 2_000_100_000),
}


def position_name(row: int, col: int) -> str:
    """3x3 region name: 'top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', ..."""
    r, c = ROWS[row], COLS[col]
    if r == "middle":
        return "center" if c == "center" else c
    return r if c == "center" else f"{r} {c}"


POSITIONS = tuple(position_name(r, c) for r in range(GRID) for c in range(GRID))


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, col)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the bounding square
    angle: float = 0.0
    rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def position(self) -> str:
        return position_name(*self.cell)

    @property
    def patch_labelled(self) -> bool:
        """Whether patch_labels marks it (testbed-lm's faint objects are not: priors.py)."""
        return True

    def as_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position,
                "cell": list(self.cell), "box": list(self.box)}  # fmt: skip


@dataclass
class SceneText:
    text: str
    colour: str  # the sign's colour
    cell: tuple[int, int]
    box: tuple[int, int, int, int]
    font_size: int = 22

    @property
    def position(self) -> str:
        return position_name(*self.cell)

    def as_dict(self) -> dict:
        return {"text": self.text, "colour": self.colour, "position": self.position, "cell": list(self.cell),
                "box": list(self.box)}  # fmt: skip


@dataclass
class Scene:
    world: ClassVar[str] = "base"  # which generator drew it (testbed-lm's scenes come from priors.py)
    split: str
    index: int
    seed: int
    theme: str
    background: str
    style: str
    objects: list[SceneObject] = field(default_factory=list)
    texts: list[SceneText] = field(default_factory=list)

    @property
    def image_id(self) -> str:
        return f"testbed_{self.split}_{self.index:07d}"

    @property
    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (colour is None or o.colour == colour) for o in self.objects)

    def ground_truth(self) -> dict:
        return {"image_id": self.image_id, "split": self.split, "seed": self.seed, "theme": self.theme,
                "background": self.background, "style": self.style,
                "objects": [o.as_dict() for o in self.objects], "texts": [t.as_dict() for t in self.texts]}  # fmt: skip

    def image(self) -> Image.Image:
        return render(self)


def _colour_distance(a, b) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def _jitter_rgb(rng: random.Random, rgb, amount: int = 18):
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)


def visible(colour: str, background: str) -> bool:
    """Whether an object of `colour` stands out enough from `background` to be drawn on it."""
    return _colour_distance(COLOURS[colour], BACKGROUNDS[background]) > 120


def sign_in_cell(rng: random.Random, background: str, cell: tuple[int, int]) -> SceneText:
    """A sign with a random word, placed at random in `cell`, in a colour that stands out from `background`."""
    r, c = cell
    word = rng.choice(WORDS)
    sign = rng.choice(sorted(SIGN_COLOURS))
    if _colour_distance(SIGN_COLOURS[sign][0], BACKGROUNDS[background]) < 110:
        sign = "black" if sum(BACKGROUNDS[background]) > 380 else "white"
    font_size = rng.randint(20, 26)
    w = int(font_size * 0.72 * len(word)) + 18
    h = font_size + 16
    x0 = c * CELL + rng.randint(2, max(2, CELL - w - 2))
    y0 = r * CELL + rng.randint(6, CELL - h - 6)
    return SceneText(word.upper(), sign, (r, c), (x0, y0, x0 + w, y0 + h), font_size)


def object_in_cell(rng: random.Random, shape: str, colour: str, cell: tuple[int, int]) -> SceneObject:
    """`shape` in `colour` with a random size, jittered position and rotation in `cell`."""
    r, c = cell
    size = rng.choice(list(SIZES))
    side = rng.randint(*SIZES[size])
    slack = CELL - side
    cx = c * CELL + CELL // 2 + rng.randint(-slack // 2 + 2, slack // 2 - 2)
    cy = r * CELL + CELL // 2 + rng.randint(-slack // 2 + 2, slack // 2 - 2)
    box = (cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side)
    angle = rng.uniform(-15, 15)
    return SceneObject(shape, colour, size, (r, c), box, angle, _jitter_rgb(rng, COLOURS[colour]))


def scene_from_seed(seed: int, split: str = "train", index: int | None = None) -> Scene:
    """The scene spec for a seed (no drawing)."""
    rng = random.Random(seed)
    theme = rng.choice(sorted(THEMES))
    background = rng.choice(list(BACKGROUNDS))
    style = rng.choice(BACKGROUND_STYLES)
    scene = Scene(split, seed if index is None else index, seed, theme, background, style)
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(cells)
    has_text = rng.random() < 0.5
    n_objects = rng.randint(1, 6)
    if has_text:
        scene.texts.append(sign_in_cell(rng, background, cells.pop()))
    theme_shapes = THEMES[theme]
    all_weights = [SHAPE_WEIGHTS[s] for s in SHAPES]
    for _ in range(n_objects):
        r, c = cells.pop()
        if rng.random() < THEME_PROB:
            shape = rng.choices(theme_shapes, [SHAPE_WEIGHTS[s] for s in theme_shapes])[0]
        else:
            shape = rng.choices(SHAPES, all_weights)[0]
        while True:
            colour = rng.choice(list(COLOURS))
            if visible(colour, background):
                break
        scene.objects.append(object_in_cell(rng, shape, colour, (r, c)))
    # Reading order (top-left to bottom-right) for captions and stable ground truth.
    scene.objects.sort(key=lambda o: o.cell)
    return scene


def make_scene(split: str, index: int) -> Scene:
    lo, hi = SPLITS[split]
    if not 0 <= index < hi - lo:
        raise IndexError(f"{split} has {hi - lo} scenes; index {index} is out of range")
    return scene_from_seed(lo + index, split, index)


def split_of_seed(seed: int) -> str | None:
    for name, (lo, hi) in SPLITS.items():
        if lo <= seed < hi:
            return name
    return None


# ----------------------------------------------------------------------------------------------------------------
# Drawing


def _regular(n: int, r: float, phase: float = -math.pi / 2):
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(r: float):
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.42
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return pts


def _heart(r: float):
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x * r / 17, (y + 2) * r / 17))
    return pts


def _cross(r: float):
    a, b = r, r * 0.34
    return [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]


def _arrow(r: float):
    return [(-r, -0.3 * r), (0.15 * r, -0.3 * r), (0.15 * r, -0.8 * r), (r, 0), (0.15 * r, 0.8 * r),
            (0.15 * r, 0.3 * r), (-r, 0.3 * r)]  # fmt: skip


def _polygon(shape: str, r: float):
    if shape == "square":
        return [(-r * 0.86, -r * 0.86), (r * 0.86, -r * 0.86), (r * 0.86, r * 0.86), (-r * 0.86, r * 0.86)]
    if shape == "triangle":
        return [(0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)]
    if shape == "diamond":
        return [(0, -r), (r * 0.68, 0), (0, r), (-r * 0.68, 0)]
    if shape == "hexagon":
        return _regular(6, r, 0)
    if shape == "pentagon":
        return _regular(5, r)
    if shape == "star":
        return _star(r)
    if shape == "heart":
        return _heart(r)
    if shape == "cross":
        return _cross(r)
    if shape == "arrow":
        return _arrow(r)
    raise KeyError(shape)


def _rotate(pts, angle_deg: float, cx: float, cy: float):
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, background_rgb, fill=None) -> None:
    """Draw `obj` in its colour (or `fill`); holes (ring, crescent) get `background_rgb`."""
    fill = obj.rgb if fill is None else fill
    x0, y0, x1, y1 = obj.box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = (x1 - x0) / 2
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        h = r * 0.55
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=background_rgb)
    elif obj.shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        off = r * 0.5
        a = math.radians(obj.angle * 3)
        ox, oy = cx + off * math.cos(a), cy + off * math.sin(a) - r * 0.1
        draw.ellipse((ox - r * 0.85, oy - r * 0.85, ox + r * 0.85, oy + r * 0.85), fill=background_rgb)
    else:
        draw.polygon(_rotate(_polygon(obj.shape, r), obj.angle, cx, cy), fill=fill)


@lru_cache(maxsize=16)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _background(scene: Scene, nprng: np.random.Generator) -> np.ndarray:
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = base
    if scene.style == "gradient":
        ramp = np.linspace(-28, 28, IMAGE_SIZE, dtype=np.float32)
        img += ramp[:, None, None] if nprng.random() < 0.5 else ramp[None, :, None]
    elif scene.style == "noisy":
        img += nprng.normal(0, 14, size=(IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    elif scene.style == "striped":
        period = int(nprng.integers(12, 28))
        stripes = ((np.arange(IMAGE_SIZE) // (period // 2)) % 2).astype(np.float32) * 18 - 9
        img += stripes[:, None, None] if nprng.random() < 0.5 else stripes[None, :, None]
    return img


def render(scene: Scene) -> Image.Image:
    nprng = np.random.default_rng(scene.seed)
    bg = _background(scene, nprng)
    image = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    bg_rgb = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        # holes (ring, crescent) show the local background colour
        x0, y0, x1, y1 = obj.box
        local = tuple(int(v) for v in np.clip(bg[(y0 + y1) // 2, (x0 + x1) // 2], 0, 255))
        _draw_object(draw, obj, local if scene.style != "plain" else bg_rgb)
    for t in scene.texts:
        plate, ink = SIGN_COLOURS[t.colour]
        draw.rectangle(t.box, fill=plate)
        font = _font(t.font_size)
        x0, y0, x1, y1 = t.box
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), t.text, fill=ink, font=font, anchor="mm")
    # mild sensor noise everywhere
    arr = np.asarray(image, dtype=np.int16)
    arr = arr + nprng.integers(-6, 7, size=arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def patch_labels(scene: Scene, patch: int = 14, min_pixels: int = 20) -> np.ndarray:
    """Dense ground truth on the ViT patch grid, int64 [4, G, G] (G = 336 / patch): the shape (0 background,
    1..12 SHAPES, 13 sign), colour (0 none, 1..8 COLOURS), word (0 none, 1..32 WORDS) of the item covering most of
    each patch (at least `min_pixels`), and 1 on the patch holding each object's centre. Used by train.py as an
    auxiliary loss on the projected image tokens. Objects that are not `patch_labelled` are left to the background."""
    g = IMAGE_SIZE // patch
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    objects = [o for o in scene.objects if o.patch_labelled]
    for k, obj in enumerate(objects):
        _draw_object(draw, obj, 0, fill=k + 1)
    n = len(objects)
    for t, text in enumerate(scene.texts):
        draw.rectangle(text.box, fill=n + t + 1)
    lab = np.asarray(mask)
    items = n + len(scene.texts)
    counts = np.zeros((items + 1, g, g), dtype=np.int32)
    for k in range(1, items + 1):
        counts[k] = (lab == k).reshape(g, patch, g, patch).sum(axis=(1, 3))
    counts[0] = min_pixels - 1  # background wins unless an item covers >= min_pixels
    owner = counts.argmax(0)
    shape_of = [0] + [SHAPES.index(o.shape) + 1 for o in objects] + [len(SHAPES) + 1] * len(scene.texts)
    colour_of = [0] + [list(COLOURS).index(o.colour) + 1 for o in objects] + [0] * len(scene.texts)
    word_of = [0] + [0] * n + [WORDS.index(t.text.lower()) + 1 for t in scene.texts]
    out = np.zeros((4, g, g), dtype=np.int64)
    out[0] = np.asarray(shape_of)[owner]
    out[1] = np.asarray(colour_of)[owner]
    out[2] = np.asarray(word_of)[owner]
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        out[3, min(g - 1, (y0 + y1) // 2 // patch), min(g - 1, (x0 + x1) // 2 // patch)] = 1
    return out
