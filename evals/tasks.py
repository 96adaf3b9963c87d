"""Evaluation tasks: a dataset, a prompt, a per-sample scorer and an aggregate, in the spirit of lmms-eval's tasks.

Real benchmarks (REFERENCE.md section 5): pope, chair (COCO), vqav2, textvqa, gqa, mme, scienceqa_img.
Testbed suites, generated from the testbed world and read back through the same loaders and metrics:
testbed_pope, testbed_chair, testbed_vqa, testbed_mme; on testbed-lm's world of priors (testbed/priors.py):
testbed_lm_pope, testbed_lm_chair, testbed_lm_vqa, testbed_lm_mme; on the testbed's short clips (testbed/clips.py,
MVBench's row layout): testbed_video.

    task = get_task("pope", data_dir="DIR")
    docs = task.load(limit=100)
    prompt, images = task.prompt(docs[0]), task.images(docs[0])
    fields = task.score(docs[0], "Yes")          # per-sample metric fields (JSON-ready)
    task.aggregate([fields, ...])                 # {result name: {metric: (value, stderr or None)}}
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from . import metrics as M
from .datasets import SOURCES, DataError, load_coco_chair, load_table, read_local

SHORT = "\nAnswer the question using a single word or phrase."
YESNO = " Please answer yes or no."
DESCRIBE = "Please describe this image in detail."


def _ratios(samples: list[dict], specs: dict) -> dict:
    return {name: (M.ratio_of_sums(samples, *spec), M.ratio_stderr(samples, *spec)) for name, spec in specs.items()}


def _split_by(samples: list[dict], key: str, prefix: str, specs: dict) -> dict:
    groups = sorted({s[key] for s in samples})
    return {f"{prefix}_{g}": _ratios([s for s in samples if s[key] == g], specs) for g in groups}


class Task:
    name = ""
    source = ""  # key of datasets.SOURCES
    max_new_tokens = 16
    version = 1
    main_metric = "accuracy"
    higher_is_better: dict[str, bool] = {"accuracy": True}

    def __init__(self, data_dir=None, path=None):
        self.data_dir, self.path = data_dir, path

    def load(self, limit: int | None = None):
        """The documents, in a fixed order; `limit` keeps the first ones (as lmms-eval's --limit)."""
        docs = self._load(limit)
        self.n_total = len(docs)
        return docs.select(range(min(limit, len(docs)))) if limit is not None else docs

    def _load(self, limit):
        return load_table(SOURCES[self.source], self.data_dir, self.path)

    def images(self, doc) -> list:
        return [doc["image"].convert("RGB")]

    def prompt(self, doc) -> str:
        return doc["question"] + SHORT

    def target(self, doc):
        return doc["answer"]

    def score(self, doc, prediction: str) -> dict:
        raise NotImplementedError

    def aggregate(self, samples: list[dict]) -> dict:
        return {self.name: _ratios(samples, {m: (m, None) for m in self.higher_is_better})}

    def config(self) -> dict:
        source = SOURCES.get(self.source)
        return {"task": self.name, "dataset_path": source.hub_id if source else "testbed",
                "dataset_name": source.config if source else None, "test_split": source.split if source else "test",
                "generation_kwargs": {"max_new_tokens": self.max_new_tokens, "do_sample": False},
                "metric_list": [{"metric": m, "higher_is_better": h} for m, h in self.higher_is_better.items()],
                "version": self.version}  # fmt: skip


class POPE(Task):
    name, source, main_metric = "pope", "pope", "f1"
    max_new_tokens = 128  # lmms-eval's POPE limit
    higher_is_better = {"accuracy": True, "precision": True, "recall": True, "f1": True}

    def prompt(self, doc):
        return doc["question"].strip() + SHORT

    def score(self, doc, prediction):
        return {**M.pope_sample(prediction, doc["answer"]), "category": doc["category"]}

    def aggregate(self, samples):
        # gt_yes_ratio, pred_yes_ratio: no better direction (the data's balance; a model's yes bias)
        return {self.name: _ratios(samples, M.POPE_RATIOS), **_split_by(samples, "category", self.name, M.POPE_RATIOS)}


class CHAIR(Task):
    """COCO CHAIR: 500 random val2014 images; ground truth = instance categories + objects named in the reference
    captions, mapped through the synonym table (Rohrbach et al. 2018)."""

    name, main_metric, max_new_tokens = "chair", "chair_s", 512
    higher_is_better = {"chair_s": False, "chair_i": False, "recall": True}
    vocab = M.COCO_VOCAB

    def _load(self, limit):
        return load_coco_chair(self.data_dir, self.path, prompt=DESCRIBE)

    def prompt(self, doc):
        return DESCRIBE

    def target(self, doc):
        return sorted(self.truth(doc))

    def truth(self, doc) -> set:
        mentioned = [o for c in doc.get("captions") or [] for o in self.vocab.mentions(c)]
        return self.vocab.objects([*doc["objects"], *mentioned])

    def score(self, doc, prediction):
        return {**M.chair_sample(prediction, self.truth(doc), self.vocab), "words": float(len(prediction.split()))}

    def aggregate(self, samples):
        return {self.name: _ratios(samples, {**M.CHAIR_RATIOS, "avg_words": ("words", None)})}

    def config(self):
        return {**super().config(), "dataset_path": "COCO val2014 (instances + captions)", "test_split": "val2014"}


class VQAv2(Task):
    name, source = "vqav2", "vqav2"
    group_by: str | None = None

    def answers(self, doc) -> list[str]:
        return [a["answer"] for a in doc["answers"]]

    def target(self, doc):
        return self.answers(doc)

    def score(self, doc, prediction):
        out = {"accuracy": M.vqa_accuracy(prediction, self.answers(doc))}
        return {**out, "group": doc[self.group_by]} if self.group_by else out

    def aggregate(self, samples):
        out = super().aggregate(samples)
        return {**out, **_split_by(samples, "group", self.name, {"accuracy": ("accuracy", None)})} if self.group_by else out


class TextVQA(VQAv2):
    name, source = "textvqa", "textvqa"
    max_new_tokens = 128  # lmms-eval's TextVQA sets no limit: the model's default (the lmms-eval plugin's: 128)

    def prompt(self, doc):
        return doc["question"].capitalize() + SHORT  # as lmms-eval's textvqa_doc_to_text

    def answers(self, doc):
        return list(doc["answers"])

    def score(self, doc, prediction):
        return {"accuracy": M.vqa_accuracy(prediction, self.answers(doc), M.normalize_textvqa)}


class GQA(Task):
    name, source = "gqa", "gqa"
    higher_is_better = {"exact_match": True}
    main_metric = "exact_match"

    def _load(self, limit):
        table = load_table(SOURCES["gqa_images"], self.data_dir, self.path and Path(self.path))
        self._images, self._where = table, {i: row for row, i in enumerate(table["id"])}
        return super()._load(limit)

    def images(self, doc):
        if doc["imageId"] not in self._where:
            raise DataError(f"GQA image {doc['imageId']} is not in testdev_balanced_images")
        return [self._images[self._where[doc["imageId"]]]["image"].convert("RGB")]

    def score(self, doc, prediction):
        return {"exact_match": M.gqa_match(prediction, doc["answer"])}


class MME(Task):
    name, source, main_metric = "mme", "mme", "perception_score"
    higher_is_better = {"perception_score": True, "cognition_score": True, "acc": True}

    def prompt(self, doc):
        # LLaVA-1.5's MME prompt, as lmms-eval builds it: the yes/no instruction becomes the short-answer one
        return doc["question"].strip().replace(YESNO, "") + SHORT

    def score(self, doc, prediction):
        pred = M.mme_answer(prediction)
        return {"pred": pred, "correct": float(pred == doc["answer"].lower().strip().replace(".", "")),
                "category": doc["category"], "image": doc["question_id"]}  # fmt: skip

    def aggregate(self, samples):
        s = M.mme_scores([x["category"] for x in samples], [x["image"] for x in samples],
                         [x["correct"] for x in samples])  # fmt: skip
        out = {self.name: {"perception_score": (s["perception"], None), "cognition_score": (s["cognition"], None),
                           "acc": (M.ratio_of_sums(samples, "correct"), M.ratio_stderr(samples, "correct"))}}  # fmt: skip
        for cat, c in sorted(s["categories"].items()):
            out[f"{self.name}_{cat}"] = {"acc": (c["acc"], None), "acc_plus": (c["acc_plus"], None),
                                         "score": (c["score"], None)}  # fmt: skip
        return out


class ScienceQA(Task):
    name, source = "scienceqa_img", "scienceqa_img"

    def images(self, doc):
        return [doc["image"].convert("RGB")] if doc.get("image") is not None else []

    def prompt(self, doc):
        options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(doc["choices"]))
        context = f"Context: {doc['hint']}\n" if doc.get("hint") else ""
        return f"{context}{doc['question']}\n{options}\nAnswer with the option's letter from the given choices directly."

    def target(self, doc):
        return chr(ord("A") + int(doc["answer"]))

    def score(self, doc, prediction):
        letter = M.scienceqa_letter(prediction)
        return {"pred_letter": letter, "accuracy": float(letter == self.target(doc))}


# ----------------------------------------------------------------------------------------------------------------
# Testbed suites: generated rows written once to parquet (cache) and read back through the same loader


def cache_dir() -> Path:
    return Path(os.environ.get("VLM_EFFICIENT_CACHE") or Path.home() / ".cache" / "vlm_efficient")


@functools.lru_cache(maxsize=1)
def _testbed_fingerprint() -> str:
    """Hash of the world and task generators: a cached suite is regenerated whenever they change."""
    import hashlib

    here = Path(__file__).resolve().parent / "testbed"
    files = ("world.py", "priors.py", "tasks.py", "clips.py")
    return hashlib.sha1(b"".join((here / f).read_bytes() for f in files)).hexdigest()[:10]


class _Testbed:
    default_n = 100
    kind = ""  # generator in testbed.tasks
    world = "base"  # its scenes: the testbed's world, or "priors" (testbed-lm's, where held-out scenes break priors)
    image_column = "image"  # an image per row, or (a clip's frames) a list of images per row

    def _load(self, limit):
        import datasets

        # Rows for a prefix of the scenes do not depend on how many scenes are drawn, so a --limit run
        # draws only what it needs and its documents are the first ones of the full suite.
        n = self.default_n if limit is None else max(1, min(self.default_n, limit))
        path = cache_dir() / "testbed" / f"{self.name}-test-{n}-v{self.version}-{_testbed_fingerprint()}.parquet"
        bars_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a few hundred generated rows: the bars would only be noise
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                self._dataset(n).to_parquet(str(tmp))
                tmp.replace(path)  # atomic: processes of a data-parallel run may write it at once
            return read_local(path, "test")
        finally:
            if bars_on:
                datasets.enable_progress_bars()

    def _dataset(self, n):
        import io

        import datasets

        rows = self._order(self._rows(n))
        encoded = {}  # rows of one scene share its image objects: encode each once, lossless and fast

        def png(image):
            if id(image) not in encoded:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG", compress_level=1)
                encoded[id(image)] = {"bytes": buffer.getvalue(), "path": None}
            return encoded[id(image)]

        column = self.image_column
        if isinstance(rows[0][column], list):
            rows = [{**r, column: [png(im) for im in r[column]]} for r in rows]
            return datasets.Dataset.from_list(rows).cast_column(column, datasets.Sequence(datasets.Image()))
        rows = [{**r, column: png(r[column])} for r in rows]
        return datasets.Dataset.from_list(rows).cast_column(column, datasets.Image())

    def _rows(self, n) -> list[dict]:
        from .testbed import tasks as T

        return getattr(T, self.kind)("test", n, world=self.world)

    def _order(self, rows):
        return rows

    def config(self):
        return {**super().config(), "dataset_path": f"testbed.tasks.{self.kind}",
                "dataset_kwargs": {"split": "test", "world": self.world}}  # fmt: skip


class TestbedPOPE(_Testbed, POPE):
    name, kind = "testbed_pope", "pope"

    def _order(self, rows):
        # Image by image, alternate yes/no and the three negative-sampling categories, so that any --limit covers
        # all three and both answers (the generator lists them category by category, yes before no).
        seen: dict = {}
        keyed = []
        for r in rows:
            group = (r["image_source"], r["category"], r["answer"])
            rank = seen[group] = seen.get(group, -1) + 1
            order = {"random": 0, "popular": 1, "adversarial": 2}[r["category"]]
            keyed.append(((r["image_source"], 2 * rank + (r["answer"] == "no"), order), r))
        return [r for _, r in sorted(keyed, key=lambda kr: kr[0])]


class TestbedCHAIR(_Testbed, CHAIR):
    name, kind, max_new_tokens = "testbed_chair", "captions", 200

    @functools.cached_property
    def vocab(self):
        from .testbed.tasks import CHAIR_SYNONYMS

        return M.ObjectVocabulary(CHAIR_SYNONYMS, ignore_quoted=True)  # a sign reading "MOON" is no crescent

    def _order(self, rows):
        return [{k: v for k, v in r.items() if k != "ground_truth"} for r in rows]

    def truth(self, doc):
        return set(doc["objects"])


class TestbedVQA(_Testbed, VQAv2):
    name, kind, group_by = "testbed_vqa", "vqa", "task"


class TestbedMME(_Testbed, MME):
    name, kind = "testbed_mme", "mme"


# The same suites on testbed-lm's world (testbed/priors.py): half the held-out scenes break its co-occurrence, colour
# and background priors, so popular / adversarial POPE and CHAIR measure prior-driven hallucination.
class TestbedLMPOPE(TestbedPOPE):
    name, world = "testbed_lm_pope", "priors"


class TestbedLMCHAIR(TestbedCHAIR):
    """CHAIR on the priors world, plus the part of it the prior explains: `chair_s_partner`, the captions that invent
    the usual partner of a shape in the scene (priors.PARTNER), and `partner_share`, the share of invented mentions
    that are such partners. Computed from each sample's doc and hallucinated mentions, so stored samples re-score."""

    name, world = "testbed_lm_chair", "priors"
    higher_is_better = {**TestbedCHAIR.higher_is_better, "chair_s_partner": False}
    PRIOR_RATIOS = {"chair_s_partner": ("caption_partner_hallucinated", None),
                    "partner_share": ("partner_hallucinations", "hallucinations")}  # fmt: skip

    def aggregate(self, samples):
        from .testbed.priors import partners_of

        def with_partners(sample):
            partners = partners_of(sample["doc"]["objects"])
            invented = sum(o in partners for o in sample["hallucinated"])
            return {**sample, "partner_hallucinations": float(invented),
                    "caption_partner_hallucinated": float(invented > 0)}  # fmt: skip

        scored = [with_partners(s) for s in samples]
        return {self.name: {**super().aggregate(scored)[self.name], **_ratios(scored, self.PRIOR_RATIOS)}}


class TestbedLMVQA(TestbedVQA):
    name, world = "testbed_lm_vqa", "priors"


class TestbedLMMME(TestbedMME):
    name, world = "testbed_lm_mme", "priors"


class TestbedVideo(_Testbed, Task):
    """Video QA on the testbed's short clips (testbed/clips.py), in MVBench's row layout (video, question, candidates,
    answer) plus task_type and the clip's frames. The frames go to the model as the prompt's images, in order (an
    image model reads the clip frame by frame; the video methods take a sample's images as the clip's frames where
    they say so). The answer is the candidate the prediction names (its text, or its letter (A), (B), ... in
    candidate order); accuracy per task_type and overall."""

    name, kind, image_column, default_n = "testbed_video", "video_qa", "frames", 50  # default_n: clips, 4 rows each
    higher_is_better = {"accuracy": True}

    def _rows(self, n):
        from .testbed.clips import video_qa

        return video_qa("test", n)

    def images(self, doc):
        return [frame.convert("RGB") for frame in doc["frames"]]

    def target(self, doc):
        return doc["answer"]

    def score(self, doc, prediction):
        chosen = M.chosen_candidate(prediction, doc["candidates"])
        return {"pred": chosen, "accuracy": float(chosen == doc["answer"]), "group": doc["task_type"]}

    def aggregate(self, samples):
        out = super().aggregate(samples)
        return {**out, **_split_by(samples, "group", self.name, {"accuracy": ("accuracy", None)})}

    def config(self):
        return {**super().config(), "dataset_path": "testbed.clips.video_qa", "dataset_kwargs": {"split": "test"}}


TASKS: dict[str, type[Task]] = {
    t.name: t for t in (POPE, CHAIR, VQAv2, TextVQA, GQA, MME, ScienceQA, TestbedPOPE, TestbedCHAIR, TestbedVQA,
                        TestbedMME, TestbedLMPOPE, TestbedLMCHAIR, TestbedLMVQA, TestbedLMMME,
                        TestbedVideo)  # fmt: skip
}


def get_task(name: str, data_dir=None, path=None) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}. Tasks: {', '.join(TASKS)}")
    return TASKS[name](data_dir, path)
