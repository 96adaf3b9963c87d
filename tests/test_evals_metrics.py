"""Benchmark metrics on hand-computed cases."""

import math

import pytest

from vlm_efficient.evals.metrics import (
    COCO_VOCAB,
    CHAIR_RATIOS,
    ObjectVocabulary,
    chair_sample,
    chair_scores,
    gqa_match,
    mme_answer,
    mme_scores,
    normalize_textvqa,
    normalize_vqa,
    pope_scores,
    ratio_stderr,
    scienceqa_letter,
    vqa_accuracy,
)


def test_mme_answer_reads_the_first_four_characters():
    assert [mme_answer(p) for p in ["Yes", " yes, there is.", "NO.", "n", "Not sure", "y"]] == ["yes", "yes", "no", "no",
                                                                                                "no", "yes"]  # fmt: skip
    assert [mme_answer(p) for p in ["There is a cat", "", "I think yes", "x", "It is yes"]] == ["other"] * 5


def test_pope_hand_computed():
    # lmms-eval's reading: only an exact "yes" / "no" (case, spaces ignored) counts; "yes." is neither
    answers = ["yes", "yes", "yes", "yes", "no", "no", "no"]
    preds = ["Yes", " yes ", "No", "yes.", "Yes", "no", "There is"]  # TP TP FN other(gold yes) FP TN other(gold no)
    s = pope_scores(preds, answers)
    assert s["accuracy"] == pytest.approx(3 / 7)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)  # an unreadable answer is no false negative
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["gt_yes_ratio"] == pytest.approx(4 / 7) and s["pred_yes_ratio"] == pytest.approx(3 / 7)


def test_pope_pred_yes_ratio_counts_predictions_not_ground_truth():
    # Ground truth is always 50% yes; lmms-eval's yes-ratio (gt_yes_ratio) reports 0.5 whatever the model says.
    answers = ["yes", "no"] * 4
    always_yes = pope_scores(["Yes"] * 8, answers)
    assert always_yes["pred_yes_ratio"] == 1.0 and always_yes["recall"] == 1.0 and always_yes["precision"] == 0.5
    assert always_yes["gt_yes_ratio"] == 0.5
    assert pope_scores(["No"] * 8, answers)["pred_yes_ratio"] == 0.0
    assert pope_scores(["Yes", "No", "No", "No"] * 2, answers)["pred_yes_ratio"] == 0.25


def test_stderr():
    samples = [{"x": v, "d": 1.0} for v in (1.0, 0.0, 1.0, 1.0)]
    # mean: sample std / sqrt(n), as lmms-eval
    assert ratio_stderr(samples, "x") == pytest.approx(math.sqrt(0.25) / 2)
    # a ratio with a constant denominator is a mean: the bootstrap lands near the analytic value, deterministically
    boot = ratio_stderr(samples, "x", "d", iters=4000)
    assert boot == ratio_stderr(samples, "x", "d", iters=4000)
    assert boot == pytest.approx(math.sqrt(0.1875 / 4), rel=0.1)
    assert ratio_stderr(samples[:1], "x") is None


def test_chair_words_and_rules():
    text = "Two baby birds and a man eat hot dogs near the toilet seat, with wine glasses, buses and knives."
    assert COCO_VOCAB.mentions(text) == ["bird", "person", "hot dog", "toilet", "wine glass", "bus", "knife"]
    # "seat" alone is a chair; next to a toilet it is not; "bow tie" is a tie; a "dog" inside "hot dog" is no dog
    assert COCO_VOCAB.mentions("a seat") == ["chair"]
    assert COCO_VOCAB.mentions("the seat of the toilet") == ["toilet"]
    assert COCO_VOCAB.mentions("a man in a bow tie") == ["person", "tie"]
    assert "dog" not in COCO_VOCAB.mentions("a hot dog")
    assert COCO_VOCAB.mentions("Tennis rackets, teddy bears, cell phones and a stop sign.") == [
        "tennis racket", "teddy bear", "cell phone", "stop sign"]  # fmt: skip
    assert COCO_VOCAB.mentions("Horses, ponies, puppies, mice, women.") == ["horse", "horse", "dog", "mouse", "person"]


def test_chair_hand_computed():
    captions = [
        "A man rides a horse next to a dog.",  # person, horse, dog; truth person, horse -> dog hallucinated
        "A cat sleeps on a sofa.",  # cat, couch: both right
        "A plate.",  # nothing mentioned
    ]
    objects = [["person", "horse"], ["cat", "couch", "remote"], ["dining table"]]
    s = chair_scores(captions, objects)
    assert s["chair_s"] == pytest.approx(1 / 3)
    assert s["chair_i"] == pytest.approx(1 / 5)
    assert s["recall"] == pytest.approx(4 / 6)
    one = chair_sample(captions[0], objects[0])
    assert one["hallucinated"] == ["dog"] and one["mentions"] == 3
    assert set(CHAIR_RATIOS) == {"chair_s", "chair_i", "recall"}


def test_chair_accepts_testbed_vocabulary():
    from vlm_efficient.evals.testbed.tasks import CHAIR_SYNONYMS

    vocab = ObjectVocabulary(CHAIR_SYNONYMS, ignore_quoted=True)
    caption = 'In the top left there is a small red disk. Two plus signs and a crescent moon. A sign reads "MOON".'
    assert vocab.mentions(caption) == ["circle", "cross", "crescent"]
    s = chair_scores([caption, "A blue rings and two hexagons."], [["circle", "cross"], ["ring"]], vocab)
    assert s["chair_s"] == pytest.approx(1.0) and s["chair_i"] == pytest.approx(2 / 5)
    assert s["recall"] == pytest.approx(3 / 3)


def test_vqa_normalisation():
    assert normalize_vqa("Two.") == "2"
    assert normalize_vqa("The dog!") == "dog"
    assert normalize_vqa("1,000") == "1000"
    assert normalize_vqa("dont") == "don't"
    assert normalize_vqa("3.5") == "3.5"
    assert normalize_vqa("yes, it is") == "yes it is"
    assert normalize_vqa("black/white") == "black white"
    assert normalize_vqa("An apple") == "apple"


def test_vqa_soft_accuracy_hand_computed():
    # 2 of 10 humans said "2": each leave-one-out subset holds 1 or 2 matches -> (2 * 1/3 + 8 * 2/3) / 10
    assert vqa_accuracy("Two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("four", ["3"] * 10) == 0.0
    assert vqa_accuracy("A red car.", ["red car"] * 10) == 1.0


def test_textvqa_normalisation_lowers_and_splits_possessives():
    assert normalize_textvqa("Coca-Cola's") == "coca cola 's" and normalize_vqa("Coca-Cola's") == "coca cola's"
    assert vqa_accuracy("STOP?", ["stop"] * 10, normalize_textvqa) == 1.0


def test_gqa_exact_match():
    assert gqa_match("Yes.", "yes") == 1.0
    assert gqa_match(" left ", "left") == 1.0
    assert gqa_match("the left", "left") == 0.0
    assert gqa_match("t-shirt", "tshirt") == 1.0 and gqa_match("t shirt", "t-shirt") == 0.0  # punctuation deleted


def test_mme_hand_computed():
    cats = ["existence"] * 4 + ["code_reasoning"] * 2
    images = ["a", "a", "b", "b", "c", "c"]
    correct = [1, 1, 1, 0, 0, 1]
    s = mme_scores(cats, images, correct)
    assert s["categories"]["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0, "n": 4}
    assert s["categories"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert s["perception"] == pytest.approx(125.0) and s["cognition"] == pytest.approx(50.0)
    assert s["perception_categories"] == 1 and s["cognition_categories"] == 1


def test_scienceqa_letter():
    assert [scienceqa_letter(p) for p in ["B", "b", " C ", "B. dog", "D."]] == ["B", "B", "C", "B", "D"]
    # LLaVA's rule, as lmms-eval: no letter in brackets, after "the answer is", or as the option's text
    assert [scienceqa_letter(p) for p in ["(C) A bird", "The answer is A.", "dog", "b. dog", "1", ""]] == [None] * 6
