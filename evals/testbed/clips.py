"""Short clips of the testbed world, and video QA rows over them in MVBench's layout.

A clip is `FRAMES` frames of one scene of the world (same background, sign and static objects) in which
- one shape, the *mover*, crosses a row from one side to the other (or a column from top to bottom, or back), a
  little further each frame;
- one shape, the *transient*, is present only in a run of the middle frames: it appears and disappears;
- the other objects stay where they are.
Every clip is a pure function of its split and index, from the scene of the same index (`world.make_scene`).

`video_qa` gives rows in MVBench's JSON layout (OpenGVLab/MVBench: `video`, `question`, `candidates`, `answer`, the
answer being one of the candidates) plus `question_id`, `task_type` (MVBench names where one fits) and the decoded
`frames` (MVBench ships mp4 files; the testbed ships the frames themselves, so no video decoder is needed):
- `object_existence`: "Is there a {shape} in the video?": the transient (yes: it is only in some frames) or a shape
  in no frame (no);
- `object_color`: the colour of the mover, or of the transient (seen only in its frames);
- `moving_direction`: which way the mover goes (left / right / up / down): needs the frames' order.
"""

from __future__ import annotations

import dataclasses
import random

from .world import CELL, COLOURS, GRID, SHAPES, Scene, make_scene, object_in_cell, visible
from .words import article

FRAMES = 4
DIRECTIONS = ("left", "right", "up", "down")
TASK_TYPES = ("object_existence", "object_color", "moving_direction")


@dataclasses.dataclass
class Clip:
    scene: Scene  # the first frame's scene without the mover and the transient: background, sign, static objects
    mover: object  # SceneObject at its first cell
    direction: str
    transient: object  # SceneObject
    visible_frames: tuple[int, int]  # [first, last] frame showing the transient
    frames: int = FRAMES

    @property
    def video_id(self) -> str:
        return f"{self.scene.image_id.replace('testbed_', 'testbed_clip_')}.mp4"

    @property
    def shapes(self) -> set[str]:
        return self.scene.shapes | {self.mover.shape, self.transient.shape}

    def frame_scene(self, f: int) -> Scene:
        """The scene shown at frame f: the mover shifted along its path, the transient only in its frames."""
        step = (GRID - 1) * CELL * f / (self.frames - 1)  # from the first cell of its path to the last
        dx, dy = {"right": (step, 0), "left": (-step, 0), "down": (0, step), "up": (0, -step)}[self.direction]
        x0, y0, x1, y1 = self.mover.box
        box = (round(x0 + dx), round(y0 + dy), round(x1 + dx), round(y1 + dy))
        cy, cx = (box[1] + box[3]) / 2, (box[0] + box[2]) / 2
        cell = (min(GRID - 1, int(cy // CELL)), min(GRID - 1, int(cx // CELL)))
        objects = [*self.scene.objects, dataclasses.replace(self.mover, box=box, cell=cell)]
        first, last = self.visible_frames
        if first <= f <= last:
            objects.append(self.transient)
        return dataclasses.replace(self.scene, objects=sorted(objects, key=lambda o: o.cell))

    def images(self) -> list:
        return [self.frame_scene(f).image() for f in range(self.frames)]

    def ground_truth(self) -> dict:
        return {"video_id": self.video_id, "scene": self.scene.ground_truth(), "mover": self.mover.as_dict(),
                "direction": self.direction, "transient": self.transient.as_dict(),
                "visible_frames": list(self.visible_frames), "frames": self.frames}  # fmt: skip


def make_clip(split: str, index: int, frames: int = FRAMES) -> Clip:
    """The clip of scene `index`: its static objects off the mover's path, a mover and a transient of shapes not
    otherwise in the clip (so "the star" names one object)."""
    if frames < 3:
        raise ValueError(f"a clip needs at least 3 frames (start, middle, end), got {frames}")
    base = make_scene(split, index)
    rng = random.Random(f"clip-{base.seed}")
    direction = rng.choice(DIRECTIONS)
    lane = rng.randrange(GRID)
    start = {"right": 0, "down": 0, "left": GRID - 1, "up": GRID - 1}[direction]
    path = {(lane, c) for c in range(GRID)} if direction in ("left", "right") else {(r, lane) for r in range(GRID)}
    first_cell = (lane, start) if direction in ("left", "right") else (start, lane)
    texts = [t for t in base.texts if t.cell not in path]
    objects = [o for o in base.objects if o.cell not in path][:3]
    free = [(r, c) for r in range(GRID) for c in range(GRID)
            if (r, c) not in path and all((r, c) != x.cell for x in [*objects, *texts])]  # fmt: skip
    if not free:  # the transient needs a cell: give it the last static object's
        free, objects = [objects[-1].cell], objects[:-1]
    taken = {o.shape for o in objects}
    mover_shape, transient_shape = rng.sample([s for s in SHAPES if s not in taken], 2)
    colours = [c for c in COLOURS if visible(c, base.background)]
    mover = object_in_cell(rng, mover_shape, rng.choice(colours), first_cell)
    transient = object_in_cell(rng, transient_shape, rng.choice(colours), rng.choice(free))
    first = rng.randint(1, frames - 2)
    last = rng.randint(first, frames - 2)
    scene = dataclasses.replace(base, objects=objects, texts=texts)
    return Clip(scene, mover, direction, transient, (first, last), frames)


def _qa(clip: Clip, rng: random.Random) -> list[tuple[str, str, list[str], str]]:
    """(task_type, question, candidates, answer) of one clip: one or two per task type."""
    absent = rng.choice([s for s in SHAPES if s not in clip.shapes])
    exist = [("object_existence", f"Is there {article(clip.transient.shape)} in the video?", ["yes", "no"], "yes"),
             ("object_existence", f"Is there {article(absent)} in the video?", ["yes", "no"], "no")]  # fmt: skip
    coloured = rng.choice([clip.mover, clip.transient])
    others = rng.sample([c for c in COLOURS if c != coloured.colour], 3)
    colour = ("object_color", f"What color is the {coloured.shape}?", sorted([coloured.colour, *others]),
              coloured.colour)  # fmt: skip
    move = ("moving_direction", f"Which way does the {clip.mover.shape} move?", list(DIRECTIONS), clip.direction)
    return [*exist, colour, move]


def video_qa(split: str = "test", n_clips: int = 50, start: int = 0, frames: int = FRAMES,
             with_frames: bool = True) -> list[dict]:  # fmt: skip
    """MVBench-layout rows, four per clip (two object_existence, one object_color, one moving_direction)."""
    rows = []
    for i in range(start, start + n_clips):
        clip = make_clip(split, i, frames)
        images = clip.images() if with_frames else None
        for task_type, question, candidates, answer in _qa(clip, random.Random(f"video-qa-{clip.scene.seed}")):
            rows.append({"question_id": str(len(rows) + 1), "video": clip.video_id, "question": question,
                         "candidates": candidates, "answer": answer, "task_type": task_type,
                         "frames": images})  # fmt: skip
    return rows
