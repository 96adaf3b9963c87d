"""Held-out accuracy of the testbed model, per task, greedy.

    python -m vlm_efficient.evals.testbed.evaluate --n 200 --out DIR [--model PATH] [--device cuda]

n = held-out scenes for POPE (3 categories), MME pairs and captions, and questions per VQA task. Writes
DIR/eval.json: POPE accuracy / precision / recall / F1 / yes-ratio (share of PREDICTED yes) per category,
VQA soft accuracy per task (color, count, position, text), MME acc and acc+ per category, caption object recall
and CHAIR_S / CHAIR_I, the latency of one short answer, and some wrong answers per task.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import torch

from . import tasks
from .world import SHAPES

_NUMBERS = {w: str(i) for i, w in enumerate(tasks.NUMBER_WORDS)}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, punctuation out, number words to digits, articles dropped."""
    text = text.lower().replace("\n", " ").strip()
    text = re.sub(r"[^\w\s]", " ", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 soft accuracy: mean over the 10 humans of min(1, matches among the other 9 / 3)."""
    p = normalize_answer(prediction)
    gt = [normalize_answer(a) for a in answers]
    scores = []
    for i in range(len(gt)):
        others = gt[:i] + gt[i + 1 :]
        scores.append(min(1.0, sum(o == p for o in others) / 3))
    return sum(scores) / len(scores)


def yes_no(prediction: str) -> str:
    words = normalize_answer(prediction).split()
    return "yes" if words[:1] == ["yes"] else "no" if words[:1] == ["no"] else "other"


def pope_metrics(preds: list[str], answers: list[str]) -> dict:
    tp = sum(p == "yes" and a == "yes" for p, a in zip(preds, answers))
    fp = sum(p == "yes" and a == "no" for p, a in zip(preds, answers))
    fn = sum(p != "yes" and a == "yes" for p, a in zip(preds, answers))
    correct = sum(p == a for p, a in zip(preds, answers))
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return {
        "accuracy": correct / max(len(preds), 1),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-9),
        "yes_ratio": sum(p == "yes" for p in preds) / max(len(preds), 1),
        "n": len(preds),
    }


def _batched(model, processor, items, batch_size, max_new_tokens, bar):
    from . import ask_batch

    out = []
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        out += ask_batch(model, processor, [c[0] for c in chunk], [c[1] for c in chunk], max_new_tokens)
        if bar is not None:
            bar.update(len(chunk))
    return out


def evaluate(model, processor, n: int = 200, split: str = "test", batch_size: int = 32, progress: bool = True,
             which=("pope", "vqa", "mme", "captions"), caption_tokens: int = 160, start: int = 0,
             world: str = "base") -> dict:  # fmt: skip
    """`world`: the scenes' generator, "base" (the testbed's) or "priors" (testbed-lm's, tasks.scene_maker)."""
    pope_rows = tasks.pope(split, n_images=n, start=start, world=world) if "pope" in which else []
    vqa_rows = tasks.vqa(split, n_per_task=n, start=start, world=world) if "vqa" in which else []
    mme_rows = tasks.mme(split, n_images=n, start=start, world=world) if "mme" in which else []
    cap_rows = tasks.captions(split, n_images=n, start=start, world=world) if "captions" in which else []
    total = len(pope_rows) + len(vqa_rows) + len(mme_rows) + len(cap_rows)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="testbed eval", unit="q")
    results, wrong = {}, {}

    def keep_wrong(task, row, pred, target):
        lst = wrong.setdefault(task, [])
        if len(lst) < 25:
            lst.append({"image": row.get("image_source") or row.get("image_id") or row.get("question_id"),
                        "question": row["question"], "prediction": pred, "target": target})  # fmt: skip

    if pope_rows:
        preds = _batched(model, processor, [(r["image"], r["question"] + tasks.SHORT_SUFFIX) for r in pope_rows],
                         batch_size, 4, bar)  # fmt: skip
        results["pope"] = {}
        for cat in dict.fromkeys(r["category"] for r in pope_rows):
            idx = [i for i, r in enumerate(pope_rows) if r["category"] == cat]
            p = [yes_no(preds[i]) for i in idx]
            results["pope"][cat] = pope_metrics(p, [pope_rows[i]["answer"] for i in idx])
            for i in idx:
                if yes_no(preds[i]) != pope_rows[i]["answer"]:
                    keep_wrong(f"pope_{cat}", pope_rows[i], preds[i], pope_rows[i]["answer"])
        if world == "priors":
            results["pope_prior"] = pope_prior_rates([yes_no(p) for p in preds], pope_rows, split)
    if vqa_rows:
        preds = _batched(model, processor, [(r["image"], r["question"] + tasks.SHORT_SUFFIX) for r in vqa_rows],
                         batch_size, 8, bar)  # fmt: skip
        results["vqa"] = {}
        for task in dict.fromkeys(r["task"] for r in vqa_rows):
            idx = [i for i, r in enumerate(vqa_rows) if r["task"] == task]
            accs = [vqa_accuracy(preds[i], [a["answer"] for a in vqa_rows[i]["answers"]]) for i in idx]
            results["vqa"][task] = {"accuracy": sum(accs) / len(accs), "n": len(idx)}
            for i, a in zip(idx, accs):
                if a < 1:
                    keep_wrong(task, vqa_rows[i], preds[i], vqa_rows[i]["multiple_choice_answer"])
    if mme_rows:
        prompts = [(r["image"], r["question"].replace(tasks.YESNO_SUFFIX, tasks.SHORT_SUFFIX)) for r in mme_rows]
        preds = _batched(model, processor, prompts, batch_size, 4, bar)
        results["mme"] = {}
        for cat in dict.fromkeys(r["category"] for r in mme_rows):
            idx = [i for i, r in enumerate(mme_rows) if r["category"] == cat]
            ok = {i: yes_no(preds[i]) == mme_rows[i]["answer"].lower() for i in idx}
            by_image = {}
            for i in idx:
                by_image.setdefault(mme_rows[i]["question_id"], []).append(ok[i])
            results["mme"][cat] = {"acc": sum(ok.values()) / len(idx),
                                   "acc_plus": sum(all(v) for v in by_image.values()) / len(by_image), "n": len(idx)}  # fmt: skip
            for i in idx:
                if not ok[i]:
                    keep_wrong(f"mme_{cat}", mme_rows[i], preds[i], mme_rows[i]["answer"])
    if cap_rows:
        preds = _batched(model, processor, [(r["image"], tasks.DESCRIBE) for r in cap_rows], batch_size,
                         caption_tokens, bar)  # fmt: skip
        scores = tasks.chair(preds, [r["objects"] for r in cap_rows])
        scores["exact"] = sum(p == r["caption"] for p, r in zip(preds, cap_rows)) / len(cap_rows)
        scores["all_objects_named"] = sum(set(r["objects"]) <= set(tasks.mentioned_objects(p))
                                          for p, r in zip(preds, cap_rows)) / len(cap_rows)  # fmt: skip
        if world == "priors":
            scores.update(prior_caption_scores(preds, cap_rows))
        results["captions"] = scores
        wrong["caption_examples"] = [{"image": r["image_id"], "prediction": p, "target": r["caption"]}
                                     for p, r in list(zip(preds, cap_rows))[:5]]  # fmt: skip
    if bar is not None:
        bar.close()

    # latency of one short answer (batch 1, greedy), median of 5 after a warm-up
    scene_image = (pope_rows or vqa_rows or mme_rows or cap_rows)[0]["image"]
    from . import ask

    ask(model, processor, scene_image, "What color is the star?" + tasks.SHORT_SUFFIX, max_new_tokens=4)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        ask(model, processor, scene_image, "Is there a circle in the image?" + tasks.SHORT_SUFFIX, max_new_tokens=4)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    results["latency_short_answer_s"] = statistics.median(times)
    results["wrong_examples"] = wrong
    return results


def pope_prior_rates(answers: list[str], rows: list[dict], split: str) -> dict:
    """On testbed-lm's world (priors.py), over every POPE row of every split: the "yes" rate on negatives that are the
    partner of a shape in the scene (the prior's pull) and on the other negatives, and on positives whose every
    instance is faint and on the others. Each entry: {"n": rows, "yes": rate}."""
    from .priors import make_scene, partners_of

    kinds: dict[str, list[bool]] = {"partner_negatives": [], "other_negatives": [], "faint_positives": [],
                                    "clear_positives": []}  # fmt: skip
    scenes: dict = {}  # image -> its scene (each image has several rows)
    for answer, row in zip(answers, rows):
        image = row["image_source"]
        if image not in scenes:
            scenes[image] = make_scene(split, int(image.rsplit("_", 1)[1]))
        scene = scenes[image]
        shape = next(s for s in SHAPES if f" {s} in the image" in row["question"])
        if row["answer"] == "no":
            kind = "partner_negatives" if shape in partners_of(scene.shapes) else "other_negatives"
        else:
            kind = "faint_positives" if all(o.faint for o in scene.objects if o.shape == shape) else "clear_positives"
        kinds[kind].append(answer == "yes")
    return {kind: {"n": len(said), "yes": sum(said) / max(len(said), 1)} for kind, said in kinds.items()}


def prior_caption_scores(captions: list[str], rows: list[dict]) -> dict:
    """On testbed-lm's world (priors.py): the share of hallucinated mentions that name the partner of a shape in the
    scene (prior-driven hallucination), and the share of faint objects the captions name."""
    from .priors import partners_of

    invented = [(o, r["objects"]) for text, r in zip(captions, rows) for o in tasks.mentioned_objects(text)
                if o not in r["objects"]]  # fmt: skip
    faint = [(o["shape"], text) for text, r in zip(captions, rows) for o in r["ground_truth"]["objects"] if o["faint"]]
    return {"hallucinated_partner_share": sum(o in partners_of(present) for o, present in invented) / max(len(invented), 1),
            "hallucinated_mentions": len(invented),
            "faint_recall": sum(shape in tasks.mentioned_objects(text) for shape, text in faint) / max(len(faint), 1),
            "faint_objects": len(faint)}  # fmt: skip


def summary(results: dict) -> str:
    lines = []
    for cat, m in results.get("pope", {}).items():
        lines.append(f"POPE {cat:<12} acc={m['accuracy']:.3f} f1={m['f1']:.3f} yes={m['yes_ratio']:.2f} n={m['n']}")
    if "pope_prior" in results:
        lines.append("POPE prior, yes rate: " + ", ".join(f"{kind} {m['yes']:.3f} (of {m['n']})"
                                                         for kind, m in results["pope_prior"].items()))
    for task, m in results.get("vqa", {}).items():
        lines.append(f"VQA  {task:<12} acc={m['accuracy']:.3f} n={m['n']}")
    for cat, m in results.get("mme", {}).items():
        lines.append(f"MME  {cat:<12} acc={m['acc']:.3f} acc+={m['acc_plus']:.3f} n={m['n']}")
    if "captions" in results:
        c = results["captions"]
        lines.append(f"CAPTION recall={c['recall']:.3f} all_named={c['all_objects_named']:.3f} "
                     f"chair_s={c['chair_s']:.3f} chair_i={c['chair_i']:.3f} exact={c['exact']:.3f} n={c['n']}")  # fmt: skip
        if "faint_recall" in c:
            lines.append(f"CAPTION faint_recall={c['faint_recall']:.3f} (of {c['faint_objects']}) hallucinated "
                         f"partners={c['hallucinated_partner_share']:.3f} (of {c['hallucinated_mentions']})")
    lines.append(f"latency (short answer, batch 1): {results['latency_short_answer_s'] * 1000:.0f} ms")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="model directory or testbed-lm (default: the committed testbed checkpoint)")
    ap.add_argument("--world", default="base", choices=["base", "priors"],
                    help="scenes of the testbed's world or of testbed-lm's (priors.py)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--split", default="test", choices=["validation", "test"])
    ap.add_argument("--out", default=None, help="directory for eval.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tasks", default="pope,vqa,mme,captions")
    args = ap.parse_args(argv)

    from . import load_testbed

    if args.model == "testbed-lm":
        from vlm_efficient.models import load_model

        model, processor = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    else:
        model, processor = load_testbed(args.device, getattr(torch, args.dtype), path=args.model)
    t = time.time()
    results = evaluate(model, processor, n=args.n, split=args.split, batch_size=args.batch_size,
                       which=tuple(args.tasks.split(",")), world=args.world)  # fmt: skip
    results["config"] = {"n": args.n, "split": args.split, "world": args.world, "device": args.device, "dtype": args.dtype,
                         "model": args.model or "testbed", "seconds": round(time.time() - t, 1)}  # fmt: skip
    print(summary(results), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
