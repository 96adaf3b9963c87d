"""ACT, attention calibration (Yu et al., 2024, "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large
Language Models without Training through Attention Calibration", ICML).

In layers 2..L-2 (public code: 2..30 of 32), per head: a key column is a sink when its mean received attention, over
the rows that can see it (column sum / number of later rows, as in the code), exceeds 0.1; the first such column
(usually BOS) is left alone. In every row, sink columns keep beta = 0.4 of their attention and the freed mass goes to
the other keys in proportion to their attention. The column statistics need all rows first: they come from a probe
of the layer's prefill attention over all rows (before the layer runs), so the calibration itself is one pass.

The paper picks heads by an offline search on calibration data; `heads=layer.head/...` restricts ACT to such a list
(default: every head of `layers`). The public code calibrates a single forward (no decoding); here the sink columns
found at prefill are also calibrated in every decoding row.

The authors' search (github.com/GATECH-EIC/ACT, scripts/calibration.sh, main.py --calibrate, models/modelling_llama.py
and llama_modelling_aug.py: atten_process_cal; its result is models/augment_index.py) calibrates ONE head of ONE layer
at a time (layers 2..30 of 32) and scores the model's accuracy on a calibration set of classification and
multiple-choice questions (the argmax over the choices' tokens at the last prompt row); the heads whose calibration
raises the accuracy are the list. `search_heads` runs that procedure on any wrapped-model inputs and returns the
`heads=` value; `python -m vlm_efficient.heads.act --model testbed` runs it on the testbed's training-split POPE
colour and count questions. Testbed result: see the README's ACT row.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from vlm_efficient.kernels import GroupSpec
from vlm_efficient.method import UNSTRUCTURED, AttentionEdit, AttentionRequest, KernelEdit, Method

from .common import check_range, head_mask, key_flags, parse_heads, parse_layers, redistribute, scatter_positions


@dataclass
class ACT(Method):
    name = "act"
    summary = "attention calibration: sink columns (mean received > 0.1, first one kept) keep beta, rest redistributed"

    beta: float = 0.4
    threshold: float = 0.1
    layers: str = ""  # default 2..L-2
    heads: str = ""  # layer.head/...; empty = all heads of `layers`

    def bind(self, engine) -> None:
        check_range("act", "beta", self.beta, 0.0, 1.0)
        check_range("act", "threshold", self.threshold, 0.0, 1.0)
        heads = engine.text_config.num_attention_heads
        self.chosen = parse_layers("act", self.layers, engine.num_layers, range(2, engine.num_layers - 1))
        self.heads_by_layer = parse_heads("act", self.heads, engine.num_layers, heads) if self.heads else None
        if self.heads_by_layer is not None:
            self.chosen = tuple(layer for layer in self.chosen if layer in self.heads_by_layer)
        self.num_heads = heads

    def attention_request(self, layer):
        return AttentionRequest(queries="all", per_head=True, probe=True) if layer in self.chosen else None

    def observe_attention(self, layer, run, stats) -> None:
        received = stats.received.float()  # [B, H, n]: mean over the valid rows
        valid = run.current_valid().to(received.device)
        rows = valid.sum(1).float()
        seen_by = valid.flip(1).cumsum(1).flip(1).float()  # valid rows at or after each key
        mean = received * rows[:, None, None] / seen_by[:, None, :].clamp(min=1)
        sinks = (mean > self.threshold) & valid[:, None, :]
        first = sinks.float().argmax(-1, keepdim=True)
        sinks = sinks.scatter(-1, first, False)
        if self.heads_by_layer is not None:
            sinks &= head_mask(self.heads_by_layer[layer], self.num_heads)[..., 0].to(sinks.device)
        if bool(sinks.any()):
            positions = run.current_positions().to(sinks.device)
            run.memory(self)[layer] = scatter_positions(sinks, positions, run.layout.length)

    def attention_edit(self, layer, run, context):
        sinks = run.memory(self).get(layer)
        if sinks is None:
            return None
        source = key_flags(sinks, context.key_positions)[:, :, None, :]  # [B, H, 1, kv]
        return AttentionEdit(post_softmax=lambda probs: redistribute(probs, source, ~source, self.beta))

    def kernel_edit(self, layer, run, prefill):
        sinks = run.memory(self).get(layer)
        if sinks is None:
            return None
        cache = run.memory(self).setdefault("kernel", {})
        if layer not in cache:
            cache[layer] = self._kernel_edit(sinks)
        return cache[layer]

    def _kernel_edit(self, sinks: torch.Tensor):
        """Sink columns are per head: a key's group is the set of heads in which it is a sink (group 0: none), so the
        tables keep beta of a group's mass in exactly those heads. Kernel 3 runs up to two such head sets."""
        heads = sinks.shape[1]
        if heads > 62:
            return UNSTRUCTURED
        bit = torch.arange(heads, device=sinks.device)
        codes = (sinks.long() << bit[None, :, None]).sum(1)  # [B, N]
        patterns, groups = torch.unique(torch.cat([codes.new_zeros(1), codes.flatten()]), return_inverse=True)
        in_heads = ((patterns.cpu()[None, :] >> bit.cpu()[:, None]) & 1).bool()  # [H, G]
        keep = torch.where(in_heads, self.beta, 1.0)
        spec = GroupSpec(heads, len(patterns), keep=keep, receive=(~in_heads).float(),
                         sink_group=1 if len(patterns) > 1 else None)
        return KernelEdit(spec=spec, groups=groups[1:].view_as(codes))


@torch.no_grad()
def search_heads(model, batches, layers=None, beta: float = 0.4, threshold: float = 0.1) -> tuple[str, dict]:
    """The authors' head search: (heads spec "layer.head/...", {"base": accuracy, "layer.head": accuracy, ...}).

    `batches`: (inputs, choices [B, k] token ids, labels [B]) with left-padded processor inputs; a question is right
    when the last prompt row's logit is highest at its label's choice. Every head of `layers` (default 2..L-2) is
    calibrated alone (`act:heads=layer.head`); it is kept when its accuracy beats the uncalibrated model's."""
    import vlm_efficient as ve

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
    from vlm_efficient.evals.testbed import build_prompt
    from vlm_efficient.evals.testbed.prompt import answer_text
    from vlm_efficient.evals.testbed.tasks import vqa

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
        raise SystemExit("--model: only 'testbed' here; for another model call heads.act.search_heads with its batches")
    from vlm_efficient.evals.testbed import load_testbed

    model, processor = load_testbed()
    heads, scores = search_heads(model, testbed_batches(processor, args.samples), beta=args.beta,
                                 threshold=args.threshold)
    print({name: round(score, 4) for name, score in scores.items()})
    print(f"act:heads={heads}" if heads else "no head raises the accuracy: ACT has no head to calibrate here")


if __name__ == "__main__":
    main()
