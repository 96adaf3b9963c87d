"""Dataset loaders on offline fixtures in the real schemas, the hub's fail-fast path, and the testbed suites."""

import os
import subprocess
import sys

import pytest

from vlm_efficient.evals import datasets as D
from vlm_efficient.evals.fixtures import write_fixtures
from vlm_efficient.evals.tasks import TASKS, get_task

REAL = ["pope", "chair", "vqav2", "textvqa", "gqa", "mme", "scienceqa_img"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("evals_data"))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLM_EFFICIENT_CACHE", str(tmp_path_factory.getbasetemp() / "vlm_efficient_cache"))


def test_every_loader_reads_its_schema(data_dir):
    expected = {"pope": 6, "chair": 3, "vqav2": 3, "textvqa": 2, "gqa": 3, "mme": 4, "scienceqa_img": 2}
    for name in REAL:
        task = get_task(name, data_dir)
        docs = task.load()
        assert len(docs) == task.n_total == expected[name], name
        for doc in docs:
            assert task.prompt(doc) and all(im.mode == "RGB" for im in task.images(doc)), name
            task.score(doc, "yes")
    assert len(get_task("pope", data_dir).load(limit=4)) == 4


def test_loader_fields(data_dir):
    pope = get_task("pope", data_dir).load()
    assert pope.column_names == ["id", "question_id", "question", "answer", "image_source", "image", "category"]
    vqa = get_task("vqav2", data_dir)
    doc = vqa.load()[0]
    assert vqa.target(doc) == ["2"] * 7 + ["3"] * 3 and vqa.score(doc, "two")["accuracy"] == pytest.approx(1.0)
    assert vqa.score(doc, "3")["accuracy"] == pytest.approx(0.9)  # 3 of 10 said "3": (3 * 2/3 + 7 * 1) / 10
    sqa = get_task("scienceqa_img", data_dir)
    doc = sqa.load()[0]
    assert sqa.prompt(doc) == (
        "Context: Look at the picture.\nWhich animal is a mammal?\nA. frog\nB. dog\nC. trout\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert sqa.target(doc) == "B" and sqa.score(doc, "B")["accuracy"] == 1.0
    gqa = get_task("gqa", data_dir)
    docs = gqa.load()
    assert [gqa.score(d, a)["exact_match"] for d, a in zip(docs, ["Yes.", "right", "cat"])] == [1.0, 0.0, 1.0]
    assert gqa.images(docs[0])[0].tobytes() == gqa.images(docs[2])[0].tobytes()  # both on image n1
    mme = get_task("mme", data_dir)
    doc = mme.load()[0]
    assert mme.prompt(doc) == "Is there a dog in this image?\nAnswer the question using a single word or phrase."


def test_chair_ground_truth(data_dir):
    chair = get_task("chair", data_dir)
    docs = {d["image_id"]: d for d in chair.load()}
    # image 42: instances person + dog; captions add nothing new; 74: person + the umbrella of its caption
    assert chair.target(docs[42]) == ["dog", "person"]
    assert chair.target(docs[74]) == ["person", "umbrella"]
    s = chair.score(docs[42], "A man and his puppy sit on a bench.")
    assert s["mentioned"] == ["person", "dog", "bench"] and s["hallucinated"] == ["bench"]


def test_chair_from_lmms_lab_coco_caption(data_dir, tmp_path):
    # COCO folder without images: images and captions come from the COCO-Caption parquet
    coco = tmp_path / "COCO"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_val2014.json").write_text(
        (data_dir / "COCO" / "annotations" / "instances_val2014.json").read_text())  # fmt: skip
    os.symlink(data_dir / "COCO-Caption", tmp_path / "COCO-Caption")
    docs = get_task("chair", tmp_path).load()
    local = get_task("chair", data_dir).load()
    assert docs["image_id"] == local["image_id"] and docs["objects"] == local["objects"]
    assert docs["captions"] == local["captions"] and docs[0]["image"].size == (64, 48)


def test_local_formats(data_dir, tmp_path):
    source = D.SOURCES["pope"]
    ref = D.read_local(data_dir / "POPE", "test")
    single = data_dir / "POPE" / "data" / "test-00000-of-00001.parquet"
    ref.save_to_disk(str(tmp_path / "disk"))
    ref.remove_columns("image").to_json(str(tmp_path / "pope.jsonl"))  # json: no image bytes
    for path in (single, tmp_path / "disk", tmp_path / "pope.jsonl"):
        table = D.load_table(source, path=path)
        assert table["question"] == ref["question"], path
    # a save_to_disk DatasetDict: the split is picked by name
    import datasets

    datasets.DatasetDict({"test": ref, "other": ref.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(D.load_table(source, path=tmp_path / "dict")) == 6
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_table(source, path=tmp_path / "missing")
    with pytest.raises(D.DataError, match="no parquet"):
        (tmp_path / "empty").mkdir()
        D.load_table(source, path=tmp_path / "empty")
    with pytest.raises(D.DataError, match="not a directory"):
        D.find_local(source, tmp_path / "pope.jsonl")


def test_missing_coco_says_what_to_do(tmp_path):
    with pytest.raises(D.DataError, match="instances_val2014.json"):
        get_task("chair", tmp_path).load()


_HUB_SCRIPT = """
import time
from vlm_efficient.evals.datasets import SOURCES, DataError, load_table
start = time.time()
try:
    load_table(SOURCES["pope"])
except DataError as error:
    print("ERROR", round(time.time() - start, 1), error)
"""


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}])
def test_hub_fails_without_network(env, tmp_path):
    # a subprocess: `datasets` reads HF_HUB_OFFLINE at import; an empty cache makes sure nothing is found there
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path), "HF_HOME": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", _HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("ERROR"), out.stdout + out.stderr
    assert "lmms-lab/POPE" in out.stdout and "--data-dir" in out.stdout
    print(f"hub refusal after {float(out.stdout.split()[1])} s")  # reported, not bounded: CI machines are loaded


def test_testbed_suites_through_the_same_loaders():
    pope = get_task("testbed_pope")
    docs = pope.load(limit=12)
    assert {d["category"] for d in docs} == {"random", "popular", "adversarial"}  # interleaved for any --limit
    assert {d["answer"] for d in docs} == {"yes", "no"}
    # the limited suite is the first part of the full one (rows depend only on their own scene)
    assert get_task("testbed_pope").load(limit=40)[:12]["question"] == docs["question"]
    vqa = get_task("testbed_vqa")
    docs = vqa.load(limit=8)
    doc = docs[0]
    assert len(doc["answers"]) == 10 and vqa.score(doc, doc["multiple_choice_answer"].upper() + ".")["accuracy"] == 1.0
    agg = vqa.aggregate([vqa.score(d, d["multiple_choice_answer"]) for d in docs])
    assert agg["testbed_vqa"]["accuracy"][0] == 1.0 and any(k.startswith("testbed_vqa_") for k in agg)
    mme = get_task("testbed_mme")
    docs = mme.load(limit=10)
    agg = mme.aggregate([mme.score(d, d["answer"]) for d in docs])
    assert agg["testbed_mme"]["acc"][0] == 1.0 and agg["testbed_mme"]["perception_score"][0] > 0
    chair = get_task("testbed_chair")
    docs = chair.load(limit=3)
    scores = [chair.score(d, d["caption"]) for d in docs]  # the reference caption names exactly the objects
    assert all(s["hallucinations"] == 0 and s["recalled"] == s["gt_objects"] > 0 for s in scores)
    absent = next(s for s in ("pentagon", "ring", "arrow", "crescent") if s not in docs[0]["objects"])
    assert chair.score(docs[0], f"There is a {absent} with a sign reading \"MOON\".")["hallucinated"] == [absent]


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'popee'.*pope"):
        get_task("popee")
    suites = {f"{testbed}_{kind}" for testbed in ("testbed", "testbed_lm") for kind in ("pope", "chair", "vqa", "mme")}
    assert set(REAL) | suites | {"testbed_video"} == set(TASKS)


def test_testbed_video_suite():
    from vlm_efficient.evals.metrics import chosen_candidate
    from vlm_efficient.evals.testbed.clips import CELL, make_clip

    task = get_task("testbed_video")
    docs = task.load(limit=8)
    assert {"video", "question", "candidates", "answer", "task_type", "question_id"} <= set(docs.column_names)
    assert all(d["answer"] in d["candidates"] for d in docs)
    assert {d["task_type"] for d in docs} == {"object_existence", "object_color", "moving_direction"}
    assert len(task.images(docs[0])) == 4 and task.images(docs[0])[0].size == (336, 336)
    assert get_task("testbed_video").load(limit=16)[:8]["question"] == docs["question"]  # a prefix of the suite
    agg = task.aggregate([task.score(d, d["answer"].capitalize() + ".") for d in docs])
    assert agg["testbed_video"]["accuracy"][0] == 1.0 and agg["testbed_video_moving_direction"]["accuracy"][0] == 1.0
    assert task.score(docs[0], "(B)")["pred"] == docs[0]["candidates"][1]
    assert chosen_candidate("It moves up.", ["left", "right", "up", "down"]) == "up"
    assert chosen_candidate("up or down", ["left", "right", "up", "down"]) is None
    assert chosen_candidate("", ["yes", "no"]) is None
    # ground truth: the transient only in its frames, the mover one cell span further each frame, others still
    for index in range(20):
        clip = make_clip("test", index)
        first, last = clip.visible_frames
        assert 0 < first <= last < clip.frames - 1
        scenes = [clip.frame_scene(f) for f in range(clip.frames)]
        for f, scene in enumerate(scenes):
            assert (clip.transient in scene.objects) == (first <= f <= last)
            assert sum(o.shape == clip.mover.shape for o in scene.objects) == 1
        boxes = [next(o.box for o in s.objects if o.shape == clip.mover.shape) for s in scenes]
        axis, sign = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}[clip.direction]
        assert sign * (boxes[-1][axis] - boxes[0][axis]) == 2 * CELL
        cells = [next(o.cell for o in s.objects if o.shape == clip.mover.shape) for s in scenes]
        assert len({c[axis] for c in cells}) == 1 and len({c[1 - axis] for c in cells}) == 3  # cell: (row, col)
        statics = [o for o in scenes[0].objects if o.shape not in (clip.mover.shape, clip.transient.shape)]
        assert all(o in s.objects for s in scenes for o in statics)
        assert not {clip.mover.shape, clip.transient.shape} & {o.shape for o in statics}


def test_testbed_video_lmms_eval_yaml_functions():
    """The shipped YAML's !function targets exist, and read the rows as `vlm-efficient eval` does (lmms-eval itself
    is optional: tests/test_evals_lmms_eval.py runs the installed client)."""
    import importlib
    from pathlib import Path

    import yaml

    from vlm_efficient.evals import lmms_eval_plugin as plugin

    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: ld.construct_scalar(node))
    config = yaml.load((Path(plugin.TASKS_DIR) / "testbed_video.yaml").read_text(), Loader=loader)
    functions = {}
    for key in ("process_docs", "doc_to_visual", "doc_to_text", "process_results"):
        module, name = config[key].rsplit(".", 1)
        functions[key] = getattr(importlib.import_module(module), name)
    task = get_task("testbed_video")
    docs = functions["process_docs"](None).select(range(4))
    doc = docs[3]
    assert doc["question"] == task.load(limit=4)[3]["question"]
    assert [im.size for im in functions["doc_to_visual"](doc)] == [(336, 336)] * 4
    assert functions["doc_to_text"](doc) == task.prompt(doc)
    assert functions["process_results"](doc, [doc["answer"]]) == {"accuracy": 1.0}
    assert functions["process_results"](doc, ["nowhere"]) == {"accuracy": 0.0}
