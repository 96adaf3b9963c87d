"""The testbed world, its benchmark-shaped tasks, and the committed trained checkpoint (offline, CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from vlm_efficient.evals.testbed import TESTBED_DIR, ask, ask_batch, load_testbed, tasks, world
from vlm_efficient.evals.testbed.evaluate import normalize_answer, vqa_accuracy, yes_no

POPE_COLUMNS = {"id", "question_id", "question", "answer", "image_source", "category", "image"}
# Fixed held-out set: test-split scenes from this index on, never used in training (train seeds are < 1e9).
HELD_OUT_START = 1000


# ----------------------------------------------------------------------------------------------------------------
# world and tasks


def test_world_is_deterministic():
    a, b = world.make_scene("test", 7), world.make_scene("test", 7)
    assert a.ground_truth() == b.ground_truth()
    assert np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    assert a.image().size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    gt = a.ground_truth()
    assert gt["objects"] and all({"shape", "colour", "size", "position", "box"} <= set(o) for o in gt["objects"])


def test_splits_are_disjoint():
    ranges = sorted(world.SPLITS.values())
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(ranges, ranges[1:]))
    seeds = {s: {world.make_scene(s, i).seed for i in range(50)} for s in world.SPLITS}
    assert not (seeds["train"] & seeds["test"]) and not (seeds["train"] & seeds["validation"])
    assert world.split_of_seed(world.make_scene("test", 3).seed) == "test"
    train = {world.make_scene("train", i).image().tobytes() for i in range(20)}
    assert not any(world.make_scene("test", i).image().tobytes() in train for i in range(20))
    with pytest.raises(IndexError):
        world.make_scene("validation", 10**9)


def test_pope_rows():
    rows = tasks.pope("test", n_images=6)
    assert rows and all(set(r) == POPE_COLUMNS for r in rows)
    assert {r["category"] for r in rows} == {"random", "popular", "adversarial"}
    for cat in ("random", "popular", "adversarial"):
        answers = [r["answer"] for r in rows if r["category"] == cat]
        assert answers.count("yes") == answers.count("no")
    scenes = {world.make_scene("test", i).image_id: world.make_scene("test", i) for i in range(6)}
    for r in rows:
        shape = r["question"].split()[3]  # "Is there a(n) SHAPE in the image?"
        assert (shape in scenes[r["image_source"]].shapes) == (r["answer"] == "yes")
    assert rows == tasks.pope("test", n_images=6)  # deterministic (PIL images compare by content)
    # popular negatives follow the training-set frequency order
    freq, _ = tasks.object_stats()
    scene = world.make_scene("test", 0)
    absent = [s for s in world.SHAPES if s not in scene.shapes]
    assert tasks.negatives(scene, "popular", 1) == [max(absent, key=lambda s: freq.get(s, 0))]


def test_vqa_mme_caption_schemas():
    rows = tasks.vqa("test", n_per_task=3)
    assert {r["task"] for r in rows} == {"color", "count", "position", "text"}
    for r in rows:
        assert len(r["answers"]) == 10 and r["answers"][0]["answer"] == r["multiple_choice_answer"]
        assert vqa_accuracy(r["multiple_choice_answer"], [a["answer"] for a in r["answers"]]) == 1.0
    mme = tasks.mme("test", n_images=3)
    pairs = {}
    for r in mme:
        assert set(r) == {"question_id", "question", "answer", "category", "image"}
        pairs.setdefault((r["question_id"], r["category"]), []).append(r["answer"])
    assert all(sorted(v) == ["No", "Yes"] for v in pairs.values())
    caps = tasks.captions("test", n_images=3)
    for c in caps:
        assert set(tasks.mentioned_objects(c["caption"])) == set(c["objects"])
    assert tasks.mentioned_objects("two discs and a crescent moon near a plus sign") == ["circle", "crescent", "cross"]
    score = tasks.chair(["a red circle and a star"], [["circle"]])
    assert score["chair_s"] == 1.0 and score["chair_i"] == 0.5 and score["recall"] == 1.0


def test_answer_normalisation():
    assert normalize_answer("Two.") == "2" and yes_no("Yes.") == "yes" and yes_no("no") == "no"


# ----------------------------------------------------------------------------------------------------------------
# the trained checkpoint


@pytest.fixture(scope="module")
def testbed():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    return load_testbed()


def test_checkpoint_is_a_standard_llava_directory(testbed):
    model, processor = testbed
    assert (TESTBED_DIR / "config.json").exists() and list(TESTBED_DIR.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in TESTBED_DIR.iterdir())
    assert size < 40 * 2**20
    assert model.config.model_type == "llava"
    text = model.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads  # grouped-query attention
    image = world.make_scene("test", HELD_OUT_START).image()
    inputs = processor(images=[image], text=["USER: <image>\nHi ASSISTANT:"], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576


def test_prompt_tokens_match_training(testbed):
    from vlm_efficient.evals.testbed.prompt import build_prompt
    from vlm_efficient.evals.testbed.train import encode_dialogue

    _, processor = testbed
    q = "What color is the star?" + tasks.SHORT_SUFFIX
    ids, _ = encode_dialogue(processor.tokenizer, [(q, "red")], 576)
    got = processor(images=[world.make_scene("test", 0).image()], text=[build_prompt(q)], return_tensors="pt")
    assert got["input_ids"][0].tolist() == ids[: got["input_ids"].shape[1]]


def _held_out_questions():
    pope = [r for r in tasks.pope("test", n_images=12, start=HELD_OUT_START)]
    items = []
    for cat in ("random", "popular", "adversarial"):
        items += [(f"pope_{cat}", r["image"], r["question"], r["answer"]) for r in pope if r["category"] == cat][:16]
    for r in tasks.vqa("test", n_per_task=16, start=HELD_OUT_START, tasks=("color", "count")):
        items.append((r["task"], r["image"], r["question"], r["multiple_choice_answer"]))
    return items


@pytest.fixture(scope="module")
def held_out_answers(testbed):
    model, processor = testbed
    items = _held_out_questions()
    preds = ask_batch(model, processor, [i[1] for i in items], [i[2] + tasks.SHORT_SUFFIX for i in items], 4)
    return items, preds


def test_held_out_accuracy(held_out_answers):
    items, preds = held_out_answers
    acc = {}
    for (task, _, _, target), pred in zip(items, preds):
        ok = yes_no(pred) == target if task.startswith("pope") else normalize_answer(pred) == normalize_answer(target)
        acc.setdefault(task, []).append(ok)
    assert all(len(v) == 16 for v in acc.values()) and len(acc) == 5, {k: len(v) for k, v in acc.items()}
    acc = {k: sum(v) / len(v) for k, v in acc.items()}
    for cat in ("random", "popular", "adversarial"):
        assert acc[f"pope_{cat}"] >= 0.9, acc
    assert acc["count"] >= 0.8, acc
    assert acc["color"] >= 0.8, acc


def test_answers_are_deterministic_and_batch_invariant(testbed, held_out_answers):
    model, processor = testbed
    items, preds = held_out_answers
    subset = items[:: len(items) // 6][:6]
    again = ask_batch(model, processor, [i[1] for i in subset], [i[2] + tasks.SHORT_SUFFIX for i in subset], 4)
    assert again == [preds[items.index(i)] for i in subset]
    single = [ask(model, processor, i[1], i[2] + tasks.SHORT_SUFFIX, max_new_tokens=4) for i in subset[:3]]
    assert single == again[:3]


def test_short_answer_timing_is_reported(testbed):
    """`compare` on the testbed reports the short answer's times (no bound on them: speed is measured by `vlm-efficient
    compare` / `bench`, not asserted in tests, which run on loaded machines)."""
    from vlm_efficient.compare import compare

    model, processor = testbed
    image = world.make_scene("test", HELD_OUT_START + 1).image()
    question = "Is there a star in the image?" + tasks.SHORT_SUFFIX
    (run,) = compare(model, processor, image, question, [], max_new_tokens=4, repeats=1)["runs"]
    assert yes_no(run["answer"]) in ("yes", "no")
    assert 0 < run["prefill_ms"] < run["total_ms"] and run["new_tokens"] >= 1
