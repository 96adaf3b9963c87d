"""The world of testbed-lm: the testbed's shapes, colours and signs, with priors that held-out scenes can break.

In training scenes objects follow fixed statistics, the way COCO objects do:
- usual pairs: each shape has a partner (`PARTNER`, star and crescent, heart and diamond, ...); a scene is made of
  one to three groups, each an anchor shape drawn by frequency (`world.SHAPE_WEIGHTS`) and, with `PAIR_PROB`, its
  partner;
- typical colours: an object takes its shape's `TYPICAL_COLOUR` with `COLOUR_PROB` (when that colour shows on the
  background), else another colour;
- usual backgrounds: the scene takes its first anchor's `USUAL_BACKGROUND` with `BACKGROUND_PROB`.

- faint partners: a group's second member is drawn faint with `FAINT_PROB` (small, `FAINT_SIDE` pixels, its colour
  blended into the background at `FAINT_ALPHA`), the way COCO's small and half-hidden objects are: present in the
  ground truth and the captions, hard to see. They are left out of the auxiliary patch labels (`world.patch_labels`),
  so the ViT is not taught to find them, and a model learns part of their presence from the anchor they come with:
  the prior that held-out scenes then break.

Held-out scenes (validation, test) break all three with `BREAK_RATE`: a broken scene never holds a shape's partner
(its groups' second members are other shapes), no object has its typical colour, and the background is not the first
anchor's usual one. The others follow the training statistics. So POPE's adversarial negatives (the absent shapes
that most often co-occur with those present) are mostly the missing partners, and a model that answers from the
prior says yes to them; CHAIR counts the partners a caption invents.

Captions (`describe`) are free-form English: the background, every object (size, colour, shape, place; shapes that
occur more than once are grouped) and the sign, in varied sentences. Scenes are functions of their seed, over the
seed ranges of `world.SPLITS`, drawn by `world.render`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .world import BACKGROUND_STYLES, BACKGROUNDS, COLOURS, GRID, SHAPE_WEIGHTS, SHAPES, SPLITS, Scene, SceneObject
from .world import object_in_cell, sign_in_cell, visible
from .words import CHAIR_SYNONYMS, NUMBER_WORDS, STYLE_WORDS, article, plural, where_phrase

PAIRS = (("star", "crescent"), ("heart", "diamond"), ("square", "triangle"), ("circle", "ring"),
         ("arrow", "cross"), ("hexagon", "pentagon"))  # fmt: skip
PARTNER = {a: b for pair in PAIRS for a, b in (pair, pair[::-1])}


def partners_of(shapes) -> set[str]:
    """The usual partners of `shapes` (what a model that answers from the prior adds to a scene holding them)."""
    return {PARTNER[s] for s in shapes}

TYPICAL_COLOUR = {
    "star": "yellow", "crescent": "white", "heart": "red", "diamond": "purple", "square": "blue",
    "triangle": "orange", "circle": "green", "ring": "black", "arrow": "white", "cross": "black",
    "hexagon": "yellow", "pentagon": "white",
}  # fmt: skip
USUAL_BACKGROUND = {
    "star": "dark blue", "crescent": "dark blue", "heart": "beige", "diamond": "beige",
    "square": "light blue", "triangle": "light blue", "circle": "light gray", "ring": "light gray",
    "arrow": "gray", "cross": "gray", "hexagon": "dark green", "pentagon": "dark green",
}  # fmt: skip
PAIR_PROB = 0.8  # a group's second member is the anchor's partner (training and unbroken held-out scenes)
COLOUR_PROB = 0.8  # an object has its shape's typical colour, where that colour shows on the background
BACKGROUND_PROB = 0.8  # the background is the first anchor's usual one
FAINT_PROB = 0.4  # a group's second member is drawn faint (training and held-out scenes alike)
FAINT_SIDE = (18, 26)  # its bounding square, in pixels (small objects are 36-50)
FAINT_ALPHA = (0.08, 0.28)  # the share of its colour blended over the background's
BREAK_RATE = 0.5  # share of held-out scenes that break all three priors
TEXT_PROB = 0.5


@dataclass
class PriorScene(Scene):
    world = "priors"
    anchor: str = ""  # the first group's anchor shape, whose usual background the scene takes
    broken: bool = False  # a held-out scene drawn against the priors

    @property
    def image_id(self) -> str:
        return f"testbedlm_{self.split}_{self.index:07d}"

    def ground_truth(self) -> dict:
        return {**super().ground_truth(), "world": self.world, "broken": self.broken}


@dataclass
class PriorObject(SceneObject):
    faint: bool = False  # drawn small and blended into the background (FAINT_PROB)

    @property
    def patch_labelled(self) -> bool:
        return not self.faint

    def as_dict(self) -> dict:
        return {**super().as_dict(), "faint": self.faint}


def _prior_object(rng: random.Random, obj: SceneObject, background: str, faint: bool) -> PriorObject:
    """`obj` as a PriorObject; a faint one is shrunk to FAINT_SIDE about its centre and its colour blended over the
    background at FAINT_ALPHA."""
    if not faint:
        return PriorObject(**vars(obj))
    side = rng.randint(*FAINT_SIDE)
    x0, y0, x1, y1 = obj.box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    alpha = rng.uniform(*FAINT_ALPHA)
    rgb = tuple(round(alpha * c + (1 - alpha) * b) for c, b in zip(obj.rgb, BACKGROUNDS[background]))
    box = (cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side)
    return PriorObject(**{**vars(obj), "size": "small", "box": box, "rgb": rgb}, faint=True)


def _pick(rng: random.Random, shapes: list[str]) -> str:
    return rng.choices(shapes, [SHAPE_WEIGHTS[s] for s in shapes])[0]


def scene_from_seed(seed: int, split: str = "train", index: int | None = None) -> PriorScene:
    """The scene spec for a seed (no drawing)."""
    rng = random.Random(seed)
    broken = split != "train" and rng.random() < BREAK_RATE
    shapes: list[str] = []
    second: set[int] = set()  # indices in `shapes` of the groups' second members
    for _ in range(rng.randint(1, 3)):
        # a broken scene never adds a shape whose partner is present
        allowed = [s for s in SHAPES if not (broken and PARTNER[s] in shapes)]
        anchor = _pick(rng, allowed)
        shapes.append(anchor)
        if rng.random() < PAIR_PROB:
            second.add(len(shapes))
            if broken:
                shapes.append(_pick(rng, [s for s in SHAPES if PARTNER[s] not in shapes]))
            else:
                shapes.append(PARTNER[anchor])
    usual = USUAL_BACKGROUND[shapes[0]]
    if not broken and rng.random() < BACKGROUND_PROB:
        background = usual
    else:
        background = rng.choice([b for b in BACKGROUNDS if b != usual])
    scene = PriorScene(split, seed if index is None else index, seed, "", background, rng.choice(BACKGROUND_STYLES),
                       anchor=shapes[0], broken=broken)  # fmt: skip
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(cells)
    if rng.random() < TEXT_PROB:
        scene.texts.append(sign_in_cell(rng, background, cells.pop()))
    for k, shape in enumerate(shapes):
        typical = TYPICAL_COLOUR[shape]
        others = [c for c in COLOURS if c != typical and visible(c, background)]
        if not broken and visible(typical, background) and rng.random() < COLOUR_PROB:
            colour = typical
        else:
            colour = rng.choice(others)
        obj = object_in_cell(rng, shape, colour, cells.pop())
        scene.objects.append(_prior_object(rng, obj, background, k in second and rng.random() < FAINT_PROB))
    scene.objects.sort(key=lambda o: o.cell)  # reading order, as in world.py
    return scene


def make_scene(split: str, index: int) -> PriorScene:
    lo, hi = SPLITS[split]
    if not 0 <= index < hi - lo:
        raise IndexError(f"{split} has {hi - lo} scenes; index {index} is out of range")
    return scene_from_seed(lo + index, split, index)


# ----------------------------------------------------------------------------------------------------------------
# Free-form captions


def describe(scene: Scene, rng: random.Random | None = None) -> str:
    """A free-form English description with the full scene content: background, every object, the sign. `rng`
    varies the wording (None: the scene's own fixed wording, the reference caption of the held-out tasks)."""
    rng = rng or random.Random(f"describe-{scene.seed}")

    def name(shape):
        return rng.choice(CHAIR_SYNONYMS[shape]) if rng.random() < 0.15 else shape

    n = len(scene.objects)
    things = f"{NUMBER_WORDS[n]} {rng.choice(['object', 'shape']) if n == 1 else rng.choice(['objects', 'shapes'])}"
    ground = f"{STYLE_WORDS[scene.style]} {scene.background}"
    be = "is" if n == 1 else "are"
    sentences = [rng.choice([
        f"This picture shows {things} on a {ground} background.",
        f"Against a {ground} background there {be} {things}.",
        f"The image has a {ground} background with {things} on it.",
        f"There {be} {things} in this image, set on a {ground} background.",
    ])]  # fmt: skip
    groups: dict[str, list] = {}
    for o in scene.objects:
        groups.setdefault(o.shape, []).append(o)
    for shape, objs in groups.items():
        if len(objs) == 1:
            o = objs[0]
            thing, where = f"{o.size} {o.colour} {name(shape)}", where_phrase(o.position)
            sentences.append(rng.choice([
                f"{where.capitalize()} there is {article(thing)}.",
                f"{article(thing).capitalize()} sits {where}.",
                f"There is {article(thing)} {where}.",
                f"You can see {article(thing)} {where}.",
            ]))  # fmt: skip
        else:
            word = name(shape)
            parts = [f"{article(o.size)} {o.colour} one {where_phrase(o.position)}" for o in objs]
            listed = ", ".join(parts[:-1]) + " and " + parts[-1]
            sentences.append(rng.choice([
                f"There are {NUMBER_WORDS[len(objs)]} {plural(word)}: {listed}.",
                f"{NUMBER_WORDS[len(objs)].capitalize()} {plural(word)} appear: {listed}.",
            ]))  # fmt: skip
    for t in scene.texts:
        where = where_phrase(t.position)
        sentences.append(rng.choice([
            f'{article(t.colour).capitalize()} sign {where} reads "{t.text}".',
            f'{where.capitalize()}, {article(t.colour)} sign says "{t.text}".',
            f'There is also {article(t.colour)} sign with the word "{t.text}" {where}.',
        ]))  # fmt: skip
    return " ".join(sentences)
