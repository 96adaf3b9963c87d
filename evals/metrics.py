"""Benchmark metrics, each on model PREDICTIONS against the benchmark's ground truth (REFERENCE.md section 5).

    pope_scores(predictions, answers)            accuracy, precision, recall, f1, gt_yes_ratio; pred_yes_ratio (extra)
    chair_scores(captions, objects, vocab)       chair_s, chair_i, recall (COCO_VOCAB or any synonym table)
    vqa_accuracy(prediction, answers)            VQAv2 / TextVQA soft accuracy with the official normalisation
    gqa_match(prediction, answer)                GQA exact match
    mme_answer(prediction); mme_scores(...)      MME's yes / no reading; acc, acc+ per category; perception / cognition
    scienceqa_letter(prediction)                 ScienceQA answer letter
    chosen_candidate(prediction, candidates)     the multiple-choice candidate an answer names (MVBench layout)

Every benchmark lmms-eval also has is scored as lmms-eval 0.7.3 scores it (answer extraction and normalisation, file
by file below), so both clients report the same numbers on the same answers; tests/test_evals_lmms_eval.py runs both.
Each per-sample scorer returns plain numbers, so a run's samples JSONL holds everything its aggregate needs.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict

import numpy as np

from .coco_objects import COCO_PHRASES, COCO_SYNONYMS

# ----------------------------------------------------------------------------------------------------------------
# POPE (lmms_eval/tasks/pope/utils.py): only an answer that is exactly "yes" or "no" (case and surrounding spaces
# ignored) is read; "Yes, there is a dog." is wrong for either truth, and an answer that is neither yes nor no is not a
# false negative.


def pope_sample(prediction: str, answer: str) -> dict:
    """Per-sample counts, as lmms-eval's POPE scorer reads an answer."""
    pred, gold = (prediction or "").strip().lower(), answer.strip().lower()
    return {
        "pred": pred if pred in ("yes", "no") else "other",
        "correct": float(pred == gold),
        "tp": float(pred == "yes" and gold == "yes"),
        "fp": float(pred == "yes" and gold == "no"),
        "fn": float(pred == "no" and gold == "yes"),
        "gold_yes": float(gold == "yes"),
        "pred_yes": float(pred == "yes"),
    }


# metric -> (numerator field, denominator field or None for a plain mean): everything POPE needs is a ratio of sums.
POPE_RATIOS = {
    "accuracy": ("correct", None),
    "precision": ("tp", ("tp", "fp")),
    "recall": ("tp", ("tp", "fn")),
    "f1": (("tp", "tp"), ("tp", "tp", "fp", "fn")),  # 2TP / (2TP + FP + FN) = 2PR / (P + R)
    "gt_yes_ratio": ("gold_yes", None),  # lmms-eval's pope_yes_ratio: the share of questions whose TRUTH is yes
    "pred_yes_ratio": ("pred_yes", None),  # not in lmms-eval: the share of answers "yes", a model's yes bias
}


def pope_scores(predictions: list[str], answers: list[str]) -> dict[str, float]:
    samples = [pope_sample(p, a) for p, a in zip(predictions, answers, strict=True)]
    return {name: ratio_of_sums(samples, *spec) for name, spec in POPE_RATIOS.items()}


# ----------------------------------------------------------------------------------------------------------------
# Ratios of sums and their standard errors


def _column(samples: list[dict], fields) -> np.ndarray:
    fields = (fields,) if isinstance(fields, str) else fields
    return np.array([sum(float(s[f]) for f in fields) for s in samples], dtype=np.float64)


def ratio_of_sums(samples: list[dict], num, den=None) -> float:
    """sum(num) / sum(den) over samples (den None: the mean of num); 0 when the denominator is 0."""
    x = _column(samples, num)
    y = _column(samples, den) if den is not None else np.ones_like(x)
    return float(x.sum() / y.sum()) if y.sum() > 0 else 0.0


def ratio_stderr(samples: list[dict], num, den=None, iters: int = 1000, seed: int = 1234) -> float | None:
    """Standard error: of the mean as lmms-eval computes it (sample std / sqrt(n)) for a plain mean, else a seeded
    bootstrap over samples (deterministic, so a resumed run reports the same value). A resample whose denominator is
    0 has no ratio (precision without a predicted yes): it is left out, and the error is None (undefined) when fewer
    than half of the resamples have one (a tiny split, where the bootstrap says little)."""
    n = len(samples)
    if n < 2:
        return None
    x = _column(samples, num)
    if den is None:
        return float(x.std(ddof=1) / np.sqrt(n))
    y = _column(samples, den)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=iters)
    num_sums, den_sums = counts @ x, counts @ y
    defined = den_sums > 0
    if defined.sum() < max(2, iters / 2):
        return None
    return float((num_sums[defined] / den_sums[defined]).std(ddof=1))


# ----------------------------------------------------------------------------------------------------------------
# CHAIR

_IRREGULAR = {"men": "man", "women": "woman", "mice": "mouse", "geese": "goose", "feet": "foot", "teeth": "tooth"}


class ObjectVocabulary:
    """Maps caption text to object mentions: lower case, words of letters/digits, singular forms, multi-word
    synonyms read as one word (longest first), then the synonym table maps each mention to its object.

    synonyms: object -> surface forms (the object's own name included); phrases: extra multi-word rules mapping a
    phrase to the surface form it stands for (CHAIR's "baby bird" -> "bird", "toilet seat" -> "toilet").
    ignore_quoted: drop text between double quotes first (written words on signs are not objects).
    """

    def __init__(self, synonyms: dict[str, list[str]], phrases: dict[str, str] | None = None, ignore_quoted=False):
        self.canonical = {}
        for obj, forms in synonyms.items():
            for form in [obj, *forms]:
                self.canonical[" ".join(form.lower().split())] = obj
        self.phrases = {p: p for p in self.canonical if " " in p}
        self.phrases.update(phrases or {})
        self.max_words = max(len(p.split()) for p in [*self.phrases, "x"])
        self.known = {w for form in [*self.canonical, *self.phrases] for w in form.split()}
        self.ignore_quoted = ignore_quoted

    def singular(self, word: str) -> str:
        """The first singular candidate that the vocabulary knows ("buses" -> "bus", "horses" -> "horse")."""
        if word in self.known:
            return word
        if word in _IRREGULAR:
            return _IRREGULAR[word]
        for suffix, repl in (("ies", "y"), ("ves", "f"), ("ves", "fe"), ("es", ""), ("s", "")):
            if word.endswith(suffix) and len(word) > len(suffix) + 1:
                candidate = word[: -len(suffix)] + repl
                if candidate in self.known:
                    return candidate
        return word

    def words(self, text: str) -> list[str]:
        """The caption as singular words with multi-word synonyms joined into one item."""
        text = text.lower()
        if self.ignore_quoted:
            text = re.sub(r'"[^"]*"', " ", text)
        words = [self.singular(w) for w in re.findall(r"[a-z0-9]+", text)]
        out, i = [], 0
        while i < len(words):
            for n in range(min(self.max_words, len(words) - i), 1, -1):
                phrase = " ".join(words[i : i + n])
                if phrase in self.phrases:
                    out.append(self.phrases[phrase])
                    i += n
                    break
            else:
                out.append(words[i])
                i += 1
        if "toilet" in out and "seat" in out:  # "the seat of the toilet" is not a chair (CHAIR's rule)
            out = [w for w in out if w != "seat"]
        return out

    def mentions(self, text: str) -> list[str]:
        """Objects mentioned in `text`, in order, repeats kept."""
        return [self.canonical[w] for w in self.words(text) if w in self.canonical]

    def objects(self, names) -> set[str]:
        """Ground-truth object names (e.g. COCO category names) mapped through the table; unknown names are kept."""
        return {self.canonical.get(" ".join(n.lower().split()), n) for n in names}


COCO_VOCAB = ObjectVocabulary(COCO_SYNONYMS, COCO_PHRASES)


def chair_sample(caption: str, objects, vocab: ObjectVocabulary = COCO_VOCAB) -> dict:
    """Per-caption counts: mentions, hallucinated mentions (objects not in `objects`), recalled ground-truth objects."""
    truth = vocab.objects(objects)
    said = vocab.mentions(caption)
    wrong = [o for o in said if o not in truth]
    return {
        "mentioned": said,
        "hallucinated": wrong,
        "mentions": float(len(said)),
        "hallucinations": float(len(wrong)),
        "caption_hallucinated": float(bool(wrong)),
        "gt_objects": float(len(truth)),
        "recalled": float(len(truth & set(said))),
    }


CHAIR_RATIOS = {
    "chair_s": ("caption_hallucinated", None),
    "chair_i": ("hallucinations", "mentions"),
    "recall": ("recalled", "gt_objects"),
}


def chair_scores(captions: list[str], objects: list, vocab: ObjectVocabulary = COCO_VOCAB) -> dict[str, float]:
    """CHAIR_S = captions with >= 1 hallucinated object / captions; CHAIR_I = hallucinated mentions / mentions;
    recall = ground-truth objects mentioned / ground-truth objects."""
    samples = [chair_sample(c, o, vocab) for c, o in zip(captions, objects, strict=True)]
    return {name: ratio_of_sums(samples, *spec) for name, spec in CHAIR_RATIOS.items()}


# ----------------------------------------------------------------------------------------------------------------
# VQAv2 / TextVQA soft accuracy, with the answer normalisation of the official VQA evaluation script

# fmt: off
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# fmt: on
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern "(?!<=\d)(\.)(?!\d)" has a typo for a look-behind: it strips every period not followed by a digit.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_PERIODS_STRIPPED = 32  # lmms-eval passes re.UNICODE (32) as sub()'s count: periods after the 32nd stay
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out, digit_comma = text, _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        # the official rule: a mark next to a space (or any digit,digit comma) disappears, elsewhere it splits words
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIODS_STRIPPED)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa(text: str) -> str:
    """The official VQA answer normalisation: punctuation, number words to digits, articles out, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def normalize_textvqa(text: str) -> str:
    """TextVQA's normalisation in lmms-eval (EvalAIAnswerProcessor.__call__): first lower case, commas and question
    marks out, "'s" split off, then `normalize_vqa`."""
    return normalize_vqa(text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip())


def vqa_accuracy(prediction: str, answers: list[str], normalize=normalize_vqa) -> float:
    """VQAv2 soft accuracy: the mean over the leave-one-out subsets of the human answers (10 in VQAv2/TextVQA) of
    min(1, matches among the others / 3). Both sides are normalised, as lmms-eval does (lmms_eval/tasks/vqav2/utils.py;
    textvqa/utils.py with normalize=normalize_textvqa); the official script normalises the answers only when they
    disagree, and VQAv2's are stored normalised, so all three agree there."""
    pred = normalize(prediction)
    gold = [normalize(a) for a in answers]
    scores = [min(1.0, sum(g == pred for j, g in enumerate(gold) if j != i) / 3) for i in range(len(gold))]
    return sum(scores) / len(scores) if scores else 0.0


def gqa_match(prediction: str, answer: str) -> float:
    """GQA exact match as lmms-eval's exact_match with ignore_case and ignore_punctuation (lmms_eval/api/metrics.py):
    lower case and ASCII punctuation deleted on both sides ("Yes." == "yes", "t-shirt" == "tshirt"); the prediction is
    stripped first, as lmms-eval strips every answer."""
    drop = str.maketrans("", "", string.punctuation)
    return float(prediction.strip().lower().translate(drop) == answer.lower().translate(drop))


# ----------------------------------------------------------------------------------------------------------------
# MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_answer(prediction: str) -> str:
    """'yes', 'no' or 'other' as lmms-eval reads an MME answer (parse_pred_ans in lmms_eval/tasks/mme/utils.py, from
    Otter): lower case without periods; "y" / "n"; else "yes" or "no" within its first four characters."""
    text = (prediction or "").strip().lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(categories: list[str], image_ids: list[str], correct: list[float]) -> dict:
    """Per category: acc (questions right), acc_plus (images with BOTH questions right), score = 100 (acc + acc+),
    max 200. Totals: perception = sum over its 10 categories (max 2000), cognition over its 4 (max 800), each over
    the categories present."""
    by_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cat, image, ok in zip(categories, image_ids, correct, strict=True):
        by_cat[cat][image].append(float(ok))
    out: dict = {"categories": {}}
    for cat, images in by_cat.items():
        flat = [v for vs in images.values() for v in vs]
        acc = sum(flat) / len(flat)
        acc_plus = sum(all(v == 1.0 for v in vs) for vs in images.values()) / len(images)
        out["categories"][cat] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus), "n": len(flat)}
    for total, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [c for c in names if c in out["categories"]]
        out[total] = sum(out["categories"][c]["score"] for c in present)
        out[f"{total}_categories"] = len(present)
    return out


# ----------------------------------------------------------------------------------------------------------------
# ScienceQA


def scienceqa_letter(prediction: str) -> str | None:
    """The option letter of an answer as lmms-eval reads it (sqa_process_results in lmms_eval/tasks/scienceqa/utils.py,
    LLaVA's rule): the answer is one letter ("b" counts), or starts with a capital letter and a period ("B. cat");
    else None."""
    text = (prediction or "").strip()
    if len(text) == 1:
        return text.upper() if text.lower() in string.ascii_lowercase else None
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        return text[0]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice in MVBench's layout (candidates as texts, the answer one of them)


def chosen_candidate(prediction: str, candidates: list[str]) -> str | None:
    """The candidate a prediction names: the candidate itself (VQA normalisation: case, punctuation, articles), or its
    option letter as MVBench's prompt lists them ("(B)", "B", "B. down"), or the one candidate named among its words;
    else None (no answer, or several candidates named)."""
    text = (prediction or "").strip()
    normal = normalize_vqa(text.lower())
    by_text = {normalize_vqa(c.lower()): c for c in candidates}
    if normal in by_text:
        return by_text[normal]
    letter = re.match(r"^\(?([A-Z])(?:\)|\.|$)", text)
    if letter and ord(letter.group(1)) - ord("A") < len(candidates):
        return candidates[ord(letter.group(1)) - ord("A")]
    named = [c for n, c in by_text.items() if re.search(rf"\b{re.escape(n)}\b", normal)]
    return named[0] if len(named) == 1 else None
