"""Benchmark-shaped tasks over the testbed world, from its complete ground truth.

Every generator returns a list of dicts (`to_dataset` turns one into a `datasets.Dataset`) whose columns follow the
real benchmark, so the project's loaders and metrics serve real data and the testbed alike:

- `pope`     lmms-lab/POPE columns: id, question_id, question, answer (yes/no), image_source, category, image;
             negatives sampled as POPE does: random, popular (most frequent objects), adversarial (objects that most
             often co-occur with the ones present).
- `captions` detailed-description prompts with reference captions and the objects present, for CHAIR-style scoring
             through `CHAIR_SYNONYMS` / `mentioned_objects` / `chair`.
- `vqa`      VQAv2 schema (question_id, question, answers = 10 x {answer, answer_confidence, answer_id},
             multiple_choice_answer, answer_type, question_type, image_id, image) plus `task`:
             color / count / position / text.
- `mme`      MME schema (question_id, question, answer Yes/No, category, image): a yes and a no question per image
             and category (existence, count, position, color, OCR), so acc+ can be computed.

`conversation(scene, rng)` builds the multi-turn training dialogues from the same question templates.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from functools import lru_cache

from .world import COLOURS, POSITIONS, SHAPES, SIZES, WORDS, Scene, make_scene
from .words import CHAIR_SYNONYMS, NUMBER_WORDS, STYLE_WORDS, article, plural, where_phrase  # noqa: F401

DESCRIBE = "Please describe this image in detail."
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
YESNO_SUFFIX = " Please answer yes or no."

def _surface_regex():
    forms = []
    for canon, syns in CHAIR_SYNONYMS.items():
        for s in syns:
            forms.append((s, canon))
    forms.sort(key=lambda f: -len(f[0]))  # longest first: "crescent moon" before "moon"
    alternation = "|".join(re.escape(s) + "(?:es|s)?" for s, _ in forms)
    return re.compile(r"\b(" + alternation + r")\b", re.IGNORECASE), forms


_MENTION_RE, _FORMS = _surface_regex()


def mentioned_objects(text: str) -> list[str]:
    """Canonical objects mentioned in a caption, in order of mention (repeats kept), via the synonym table."""
    out = []
    for m in _MENTION_RE.finditer(text):
        word = m.group(1).lower()
        for surface, canon in _FORMS:
            if word in (surface, surface + "s", surface + "es"):
                out.append(canon)
                break
    return out


def chair(captions: list[str], objects: list[list[str]]) -> dict:
    """CHAIR_S, CHAIR_I and object recall of captions against the objects present (canonical names)."""
    mentions = hallucinated = bad_captions = recalled = total = 0
    for text, present in zip(captions, objects):
        said = mentioned_objects(text)
        wrong = [o for o in said if o not in present]
        mentions += len(said)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        recalled += len(set(present) & set(said))
        total += len(set(present))
    n = max(len(captions), 1)
    return {
        "chair_s": bad_captions / n,
        "chair_i": hallucinated / max(mentions, 1),
        "recall": recalled / max(total, 1),
        "n": len(captions),
    }


# ----------------------------------------------------------------------------------------------------------------
# Object statistics (from training scenes only), for POPE's popular and adversarial negatives


def scene_maker(world: str):
    """`make_scene(split, index)` of a world: "base" (world.py, the testbed's) or "priors" (priors.py, testbed-lm's)."""
    if world == "base":
        return make_scene
    if world == "priors":
        from .priors import make_scene as make_prior_scene

        return make_prior_scene
    raise ValueError(f"unknown world {world!r}: use 'base' or 'priors'")


@lru_cache(maxsize=None)
def object_stats(n_scenes: int = 20000, world: str = "base") -> tuple[dict, dict]:
    """(frequency[shape] = scenes containing it, cooccur[a][b] = scenes containing both), over training scenes."""
    freq: Counter = Counter()
    co: dict[str, Counter] = {s: Counter() for s in SHAPES}
    make = scene_maker(world)
    for i in range(n_scenes):
        present = make("train", i).shapes
        freq.update(present)
        for a in present:
            for b in present:
                if a != b:
                    co[a][b] += 1
    return dict(freq), {a: dict(c) for a, c in co.items()}


def negatives(scene: Scene, strategy: str, k: int, rng: random.Random | None = None) -> list[str]:
    """k absent shapes by POPE's strategy: random, popular (most frequent), adversarial (most co-occurring)."""
    present = scene.shapes
    absent = [s for s in SHAPES if s not in present]
    if strategy == "random":
        rng = rng or random.Random(scene.seed)
        return rng.sample(absent, min(k, len(absent)))
    freq, co = object_stats(world=scene.world)
    if strategy == "popular":
        ranked = sorted(absent, key=lambda s: (-freq.get(s, 0), SHAPES.index(s)))
    elif strategy == "adversarial":
        score = {s: sum(co[p].get(s, 0) for p in present) for s in absent}
        ranked = sorted(absent, key=lambda s: (-score[s], SHAPES.index(s)))
    else:
        raise ValueError(strategy)
    return ranked[:k]


# ----------------------------------------------------------------------------------------------------------------
# Referring expressions and question templates


def referring_expressions(scene: Scene, obj, allow_colour: bool = True) -> list[str]:
    """Phrases that pick out `obj` uniquely, shortest first."""
    candidates = [
        (obj.shape, lambda o: o.shape == obj.shape),
        (f"{obj.size} {obj.shape}", lambda o: o.shape == obj.shape and o.size == obj.size),
    ]
    if allow_colour:
        candidates += [
            (f"{obj.colour} {obj.shape}", lambda o: o.shape == obj.shape and o.colour == obj.colour),
            (f"{obj.size} {obj.colour} {obj.shape}", lambda o: (o.shape, o.colour, o.size) == (obj.shape, obj.colour, obj.size)),
        ]  # fmt: skip
    return [phrase for phrase, match in candidates if sum(map(match, scene.objects)) == 1]


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """Detailed description: object count and background, then every object in reading order, then the sign
    (a scene of the priors world: its free-form `priors.describe`)."""
    if scene.world == "priors":
        from .priors import describe

        return describe(scene, rng)

    def name(shape):
        if rng is not None and rng.random() < 0.15:
            return rng.choice(CHAIR_SYNONYMS[shape])
        return shape

    n = len(scene.objects)
    noun = "object" if n == 1 else "objects"
    parts = [f"The image shows {NUMBER_WORDS[n]} {noun} on a {STYLE_WORDS[scene.style]} {scene.background} background."]
    for o in scene.objects:
        parts.append(f"{where_phrase(o.position).capitalize()} there is {article(o.size)} {o.colour} {name(o.shape)}.")
    for t in scene.texts:
        parts.append(f'{article(t.colour).capitalize()} sign {where_phrase(t.position)} reads "{t.text}".')
    return " ".join(parts)


EXIST_Q = ["Is there {a} in the image?", "Is there {a} in this image?", "Does the image contain {a}?"]
COLOUR_Q = ["What color is the {ref}?", "What is the color of the {ref}?", "Which color is the {ref}?"]
COUNT_Q = ["How many {things} are there?", "How many {things} are in the image?", "How many {things} can you see?"]
POSITION_Q = ["Where is the {ref}?", "Where is the {ref} in the image?", "In which part of the image is the {ref}?"]
TEXT_Q = ["What does the sign say?", "What is written on the sign?", "What word is written in the image?"]


def question_colour(scene, obj, template=0):
    refs = referring_expressions(scene, obj, allow_colour=False)
    if not refs:
        return None
    ref = refs[0] if isinstance(template, int) else template.choice(refs)
    tpl = COLOUR_Q[template] if isinstance(template, int) else template.choice(COLOUR_Q)
    return tpl.format(ref=ref), obj.colour


def question_count(scene, what: str, by: str = "shape", template=0):
    if by == "shape":
        things, n = plural(what), scene.count(shape=what)
    else:
        things, n = f"{what} objects", scene.count(colour=what)
    tpl = COUNT_Q[template] if isinstance(template, int) else template.choice(COUNT_Q)
    return tpl.format(things=things), str(n)


def question_position(scene, obj, template=0):
    refs = referring_expressions(scene, obj)
    if not refs:
        return None
    ref = refs[0] if isinstance(template, int) else template.choice(refs)
    tpl = POSITION_Q[template] if isinstance(template, int) else template.choice(POSITION_Q)
    return tpl.format(ref=ref), obj.position


def question_text(scene, template=0):
    if not scene.texts:
        return None
    tpl = TEXT_Q[template] if isinstance(template, int) else template.choice(TEXT_Q)
    return tpl, scene.texts[0].text.lower()


# ----------------------------------------------------------------------------------------------------------------
# Benchmark rows


def _scenes(split: str, n: int, start: int = 0, world: str = "base"):
    make = scene_maker(world)
    for i in range(start, start + n):
        yield make(split, i)


def pope(split: str = "test", n_images: int = 100, start: int = 0, per_image: int = 3,
         categories=("random", "popular", "adversarial"), with_images: bool = True,
         world: str = "base") -> list[dict]:  # fmt: skip
    """POPE rows (lmms-lab/POPE columns): per image up to `per_image` present objects (yes) and as many absent
    objects (no) for each negative-sampling category."""
    rows = []
    for category in categories:
        for scene in _scenes(split, n_images, start, world):
            rng = random.Random(f"pope-{scene.seed}-{category}")
            present = sorted(scene.shapes, key=SHAPES.index)
            pos = rng.sample(present, min(per_image, len(present)))
            neg = negatives(scene, category, len(pos), rng)
            image = scene.image() if with_images else None
            for shape, answer in [(s, "yes") for s in pos] + [(s, "no") for s in neg]:
                rows.append({
                    "id": str(len(rows)),
                    "question_id": str(len(rows) + 1),
                    "question": f"Is there {article(shape)} in the image?",
                    "answer": answer,
                    "image_source": scene.image_id,
                    "category": category,
                    "image": image,
                })  # fmt: skip
    return rows


def captions(split: str = "test", n_images: int = 100, start: int = 0, with_images: bool = True,
             world: str = "base") -> list[dict]:  # fmt: skip
    return [
        {
            "image_id": scene.image_id,
            "question": DESCRIBE,
            "caption": caption(scene),
            "objects": sorted(scene.shapes, key=SHAPES.index),
            "ground_truth": scene.ground_truth(),
            "image": scene.image() if with_images else None,
        }
        for scene in _scenes(split, n_images, start, world)
    ]


def _vqa_row(qid, scene, question, answer, task, image):
    answer_type = "number" if task == "count" else "other"
    question_type = {"color": "what color is the", "count": "how many", "position": "where is the",
                     "text": "what does the"}[task]  # fmt: skip
    return {
        "question_id": qid,
        "question": question,
        "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
        "multiple_choice_answer": answer,
        "answer_type": answer_type,
        "question_type": question_type,
        "image_id": scene.image_id,
        "task": task,
        "image": image,
    }


def vqa(split: str = "test", n_per_task: int = 100, start: int = 0, tasks=("color", "count", "position", "text"),
        with_images: bool = True, max_scenes: int = 5000, world: str = "base") -> list[dict]:  # fmt: skip
    """VQAv2-schema rows: `n_per_task` questions for each task, at most one per task and scene, scenes in order."""
    rows, done = [], Counter()
    make = scene_maker(world)
    for i in range(start, start + max_scenes):
        if all(done[t] >= n_per_task for t in tasks):
            break
        scene = make(split, i)
        rng = random.Random(f"vqa-{scene.seed}")
        image = None
        for task in tasks:
            if done[task] >= n_per_task:
                continue
            qa = None
            if task == "color":
                objs = [o for o in scene.objects if referring_expressions(scene, o, allow_colour=False)]
                qa = question_colour(scene, rng.choice(objs)) if objs else None
            elif task == "count":
                if rng.random() < 0.75 or not scene.objects:
                    shape = rng.choice(sorted(scene.shapes) + [rng.choice(SHAPES)])
                    qa = question_count(scene, shape, "shape")
                else:
                    qa = question_count(scene, rng.choice(scene.objects).colour, "colour")
            elif task == "position":
                objs = [o for o in scene.objects if referring_expressions(scene, o)]
                qa = question_position(scene, rng.choice(objs)) if objs else None
            elif task == "text":
                qa = question_text(scene)
            if qa is None:
                continue
            if image is None and with_images:
                image = scene.image()
            rows.append(_vqa_row(len(rows) + 1, scene, qa[0], qa[1], task, image))
            done[task] += 1
    return rows


def _mme_pairs(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(category, question, Yes/No) pairs: one Yes and one No per category where the scene allows."""
    out = []
    present = sorted(scene.shapes, key=SHAPES.index)
    if present:
        absent = [s for s in SHAPES if s not in scene.shapes]
        out += [("existence", f"Is there {article(rng.choice(present))} in this image?", "Yes"),
                ("existence", f"Is there {article(rng.choice(absent))} in this image?", "No")]  # fmt: skip
        shape = rng.choice(present)
        n = scene.count(shape=shape)
        wrong = rng.choice([k for k in range(1, 7) if k != n])
        for k, ans in ((n, "Yes"), (wrong, "No")):
            noun = shape if k == 1 else plural(shape)
            verb = "Is" if k == 1 else "Are"
            out.append(("count", f"{verb} there {NUMBER_WORDS[k]} {noun} in this image?", ans))
    objs = [o for o in scene.objects if referring_expressions(scene, o, allow_colour=False)]
    if objs:
        o = rng.choice(objs)
        ref = referring_expressions(scene, o, allow_colour=False)[0]
        other = rng.choice([c for c in COLOURS if c != o.colour])
        out += [("color", f"Is the {ref} {o.colour}?", "Yes"), ("color", f"Is the {ref} {other}?", "No")]
        where = rng.choice([p for p in POSITIONS if p != o.position])
        out += [("position", f"Is the {ref} in the {o.position} of the image?", "Yes"),
                ("position", f"Is the {ref} in the {where} of the image?", "No")]  # fmt: skip
    if scene.texts:
        word = scene.texts[0].text.lower()
        other = rng.choice([w for w in WORDS if w != word])
        out += [("OCR", f'Does the sign say "{word.upper()}"?', "Yes"),
                ("OCR", f'Does the sign say "{other.upper()}"?', "No")]  # fmt: skip
    return out


def mme(split: str = "test", n_images: int = 100, start: int = 0, with_images: bool = True,
        world: str = "base") -> list[dict]:  # fmt: skip
    """MME-style rows: paired Yes/No questions per image and category; question_id is the image name (pairs share
    it, as in MME, so acc+ groups by (category, question_id))."""
    rows = []
    for scene in _scenes(split, n_images, start, world):
        rng = random.Random(f"mme-{scene.seed}")
        image = scene.image() if with_images else None
        for category, question, answer in _mme_pairs(scene, rng):
            rows.append({"question_id": f"{scene.image_id}.png", "question": question + YESNO_SUFFIX,
                         "answer": answer, "category": category, "image": image})  # fmt: skip
    return rows


def to_dataset(rows: list[dict]):
    """A `datasets.Dataset` with an Image feature (imports `datasets` lazily)."""
    import datasets

    return datasets.Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------------------------
# Training dialogues


def _yes_no(b: bool) -> str:
    return "Yes" if b else "No"


def _short(q: str, rng: random.Random) -> str:
    return q + SHORT_SUFFIX if rng.random() < 0.6 else q


def _yn(q: str, rng: random.Random) -> str:
    r = rng.random()
    return q + SHORT_SUFFIX if r < 0.45 else q + YESNO_SUFFIX if r < 0.65 else q


def _turn(scene: Scene, kind: str, rng: random.Random):
    present = sorted(scene.shapes, key=SHAPES.index)
    if kind == "exist_yes" and present:
        s = rng.choice(present)
        return _yn(rng.choice(EXIST_Q).format(a=article(s)), rng), "Yes"
    if kind == "exist_no":
        neg = negatives(scene, rng.choice(["random", "popular", "adversarial"]), 1, rng)
        if neg:
            return _yn(rng.choice(EXIST_Q).format(a=article(neg[0])), rng), "No"
    if kind == "attr_exist" and scene.objects:
        o = rng.choice(scene.objects)
        if rng.random() < 0.5:
            colour, shape = o.colour, o.shape
        elif rng.random() < 0.5:
            colour, shape = rng.choice(list(COLOURS)), o.shape
        else:
            colour, shape = o.colour, rng.choice(SHAPES)
        truth = any(x.colour == colour and x.shape == shape for x in scene.objects)
        return _yn(rng.choice(EXIST_Q).format(a=article(f"{colour} {shape}")), rng), _yes_no(truth)
    if kind == "colour" and scene.objects:
        qa = question_colour(scene, rng.choice(scene.objects), rng)
        if qa:
            return _short(qa[0], rng), qa[1]
    if kind == "count":
        r = rng.random()
        if r < 0.6 and present:
            qa = question_count(scene, rng.choice(present), "shape", rng)
        elif r < 0.75:
            qa = question_count(scene, rng.choice(SHAPES), "shape", rng)
        elif r < 0.9 and scene.objects:
            qa = question_count(scene, rng.choice(scene.objects).colour, "colour", rng)
        else:
            qa = (rng.choice(["How many objects are there?", "How many shapes are in the image?"]), str(len(scene.objects)))
        return _short(qa[0], rng), qa[1]
    if kind == "count_yn" and present:
        shape = rng.choice(present)
        n = scene.count(shape=shape)
        k = n if rng.random() < 0.5 else rng.choice([j for j in range(1, 7) if j != n])
        noun, verb = (shape, "Is") if k == 1 else (plural(shape), "Are")
        return _yn(f"{verb} there {NUMBER_WORDS[k]} {noun} in this image?", rng), _yes_no(k == n)
    if kind == "position" and scene.objects:
        qa = question_position(scene, rng.choice(scene.objects), rng)
        if qa:
            return _short(qa[0], rng), qa[1]
    if kind == "position_yn" and scene.objects:
        o = rng.choice(scene.objects)
        refs = referring_expressions(scene, o)
        if refs:
            where = o.position if rng.random() < 0.5 else rng.choice(POSITIONS)
            return _yn(f"Is the {rng.choice(refs)} in the {where} of the image?", rng), _yes_no(where == o.position)
    if kind == "colour_yn" and scene.objects:
        o = rng.choice(scene.objects)
        refs = referring_expressions(scene, o, allow_colour=False)
        if refs:
            c = o.colour if rng.random() < 0.5 else rng.choice(list(COLOURS))
            return _yn(f"Is the {rng.choice(refs)} {c}?", rng), _yes_no(c == o.colour)
    if kind == "text":
        qa = question_text(scene, rng)
        if qa:
            return _short(qa[0], rng), qa[1]
        return _yn(rng.choice(["Is there a sign in the image?", "Is there any text in the image?"]), rng), "No"
    if kind == "text_yn" and scene.texts:
        word = scene.texts[0].text.lower()
        w = word if rng.random() < 0.5 else rng.choice(WORDS)
        return _yn(f'Does the sign say "{w.upper()}"?', rng), _yes_no(w == word)
    if kind == "caption":
        return rng.choice([DESCRIBE, "Describe the image in detail.", "What is in this image? Describe it in detail."]), caption(scene, rng)  # fmt: skip
    return None


TURN_WEIGHTS = {
    "exist_yes": 3, "exist_no": 3, "attr_exist": 1.5, "colour": 2.5, "count": 2.5, "count_yn": 1,
    "position": 2, "position_yn": 1, "colour_yn": 1, "text": 1.5, "text_yn": 0.7,
}  # fmt: skip


def conversation(scene: Scene, rng: random.Random, max_turns: int = 8, caption_prob: float = 0.3,
                 turn_weights: dict | None = None) -> list[tuple[str, str]]:  # fmt: skip
    """A multi-turn training dialogue about one scene: short-answer and yes/no turns in random order (kinds drawn by
    `turn_weights`, default TURN_WEIGHTS), then a detailed caption with probability `caption_prob`."""
    kinds, weights = zip(*(turn_weights or TURN_WEIGHTS).items())
    turns, seen = [], set()
    n = rng.randint(max(1, max_turns // 2), max_turns)
    tries = 0
    while len(turns) < n and tries < 4 * n:
        tries += 1
        qa = _turn(scene, rng.choices(kinds, weights)[0], rng)
        if qa and qa[0] not in seen:
            seen.add(qa[0])
            turns.append(qa)
    if rng.random() < caption_prob:  # last, so that no short answer can be copied from it
        turns.append(_turn(scene, "caption", rng))
    return turns


def corpus(n_scenes: int = 3000, seed: int = 0):
    """Text of training dialogues (for training the tokenizer)."""
    rng = random.Random(seed)
    for i in range(n_scenes):
        scene = make_scene("train", i)
        for q, a in conversation(scene, rng, caption_prob=1.0):
            yield q
            yield a
    yield " ".join(SIZES) + " " + " ".join(POSITIONS) + " " + " ".join(WORDS) + " " + " ".join(w.upper() for w in WORDS)
