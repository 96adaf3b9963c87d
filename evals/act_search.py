"""ACT's head search (the authors' calibration.sh; heads/act.py describes it): every head calibrated alone on
calibration questions, kept where the accuracy rises. A tool above the library: it wraps and unwraps the model.

    python -m vlm_efficient.evals.act_search --model testbed --samples 40
"""

from __future__ import annotations

import argparse

import torch

import vlm_efficient as ve


@torch.no_grad()
def search_heads(model, batches, layers=None, beta: float = 0.4, threshold: float = 0.1) -> tuple[str, dict]:
    """The authors' head search: (heads spec "layer.head/...", {"base": accuracy, "layer.head": accuracy, ...}).

    `batches`: (inputs, choices [B, k] token ids, labels [B]) with left-padded processor inputs; a question is right
    when the last prompt row's logit is highest at its label's choice. Every head of `layers` (default 2..L-2) is
    calibrated alone (`act:heads=layer.head`); it is kept when its accuracy beats the uncalibrated model's."""
    batches = list(batches)
    num_layers = len(ve.get_adapter(model).decoder_layers(model))
    num_heads = ve.get_adapter(model).text_config(model).num_attention_heads
    layers = range(2, num_layers - 1) if layers is None else layers

    def accuracy(spec: str) -> float:
        if spec:
            ve.wrap(model, spec)
        try:
            right = total = 0
            for inputs, choices, labels in batches:
                last = model(**inputs).logits[:, -1].float()
                picked = last.gather(1, choices.to(last.device)).argmax(1)
                right += int((picked == labels.to(last.device)).sum())
                total += len(labels)
        finally:
            if spec:
                ve.unwrap(model)
        return right / total

    scores = {"base": accuracy("")}
    for layer in layers:
        for head in range(num_heads):
            scores[f"{layer}.{head}"] = accuracy(f"act:beta={beta},threshold={threshold},heads={layer}.{head}")
    kept = [name for name, score in scores.items() if name != "base" and score > scores["base"]]
    return "/".join(kept), scores


def testbed_batches(processor, count: int, batch_size: int = 20, tasks=("color", "count")):
    """Training-split VQA questions of the testbed as search_heads' batches: the choices of a question are the first
    answer tokens of every answer its task has (colour names, counts), the label its own answer's. (POPE would not
    do: the testbed answers 99.7% of it right, so no head can raise its accuracy.)"""
    from .testbed import build_prompt
    from .testbed.prompt import answer_text
    from .testbed.tasks import vqa

    rows = vqa("train", n_per_task=count // len(tasks) + 1, tasks=tasks)[:count]
    tokenizer = processor.tokenizer
    first = {row["multiple_choice_answer"]: tokenizer(answer_text(row["multiple_choice_answer"]),
                                                      add_special_tokens=False).input_ids[0] for row in rows}
    options = {task: sorted({row["multiple_choice_answer"] for row in rows if row["task"] == task}) for task in tasks}
    width = max(len(o) for o in options.values())
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        inputs = processor(images=[row["image"] for row in chunk], text=[build_prompt(row["question"]) for row in chunk],
                           padding=True, return_tensors="pt")
        # each row's choices, padded with its first choice (a repeat never changes the argmax's answer)
        choices = [[first[o] for o in options[row["task"]]] for row in chunk]
        choices = torch.tensor([c + c[:1] * (width - len(c)) for c in choices])
        labels = torch.tensor([options[row["task"]].index(row["multiple_choice_answer"]) for row in chunk])
        yield dict(inputs), choices, labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="ACT's head search (the authors' calibration.sh) on the testbed")
    parser.add_argument("--model", default="testbed", help="only 'testbed' (other models: call search_heads)")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--beta", type=float, default=0.4)
    parser.add_argument("--threshold", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.model != "testbed":
        raise SystemExit("--model: only 'testbed' here; for another model call search_heads with its batches")
    from .testbed import load_testbed

    model, processor = load_testbed()
    heads, scores = search_heads(model, testbed_batches(processor, args.samples), beta=args.beta,
                                 threshold=args.threshold)
    print({name: round(score, 4) for name, score in scores.items()})
    print(f"act:heads={heads}" if heads else "no head raises the accuracy: ACT has no head to calibrate here")


if __name__ == "__main__":
    main()
