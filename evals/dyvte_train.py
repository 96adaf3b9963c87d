"""Train DyVTE's exit gates (one small MLP per layer) on a frozen model.

    python -m vlm_efficient.evals.dyvte_train --model testbed --out gates.pt
    python -m vlm_efficient.evals.dyvte_train --model tiny:llava --samples 8 --steps 40 --out /tmp/gates.pt

For each training sample (prompt, images, answer) and each candidate layer l: one teacher-forced forward of the full
model and one where every visual token exits after l (the method itself with rule=fixed). The label is 1 ("exit") when
the exit keeps the argmax prediction of more than 99% of the answer tokens and raises their cross-entropy by less than
3% (the public code's rule). The gate input is the hidden state entering layer l + 1 (see dyvte.gate_features). The
paper samples one random exit layer per batch; on small models every layer of every sample is cheap, so all are used.
The answers are the dataset's for the testbed and the model's own greedy continuation for tiny random models.
"""

from __future__ import annotations

import argparse
import random

import torch

import vlm_efficient as ve
from vlm_efficient.token_ops.dyvte import DyVTE, gate_features, make_gate, model_fingerprint, save_gates


def _append(inputs: dict, ids: torch.Tensor) -> dict:
    """Batch-1 processor inputs with answer token ids appended (mask and Qwen's mm_token_type_ids grow too)."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], ids[None]], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(ids)[None]], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)[None]], dim=1)
    return out


def _answer_stats(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax predictions and mean cross-entropy of the answer tokens (the last len(ids) positions)."""
    predicting = logits[0, -ids.numel() - 1 : -1].float()
    return predicting.argmax(-1), torch.nn.functional.cross_entropy(predicting, ids.to(predicting.device))


@torch.no_grad()
def collect(model, samples, layers) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (features [n, 2d], labels [n])} over `samples`: an iterable of (batch-1 inputs, answer ids)."""
    decoder_layers = ve.get_adapter(model).decoder_layers(model)
    image_token = ve.get_adapter(model).image_token_id(model)
    data = {layer: ([], []) for layer in layers}
    for inputs, answer in samples:
        full = _append(inputs, answer)
        entering = {}

        def record(layer):
            def hook(module, args, kwargs):
                entering[layer] = args[0] if args else kwargs["hidden_states"]

            return hook

        handles = [decoder_layers[l + 1].register_forward_pre_hook(record(l), with_kwargs=True) for l in layers]
        try:
            reference = model(**full, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        prompt_length = inputs["input_ids"].shape[1]
        ids = inputs["input_ids"][0]
        after_image = torch.arange(prompt_length) > int((ids == image_token).nonzero().max())
        question = after_image[None].to(reference.device)
        ref_pred, ref_loss = _answer_stats(reference, answer)
        for l in layers:
            ve.wrap(model, [DyVTE(rule="fixed", min_layer=l)])
            try:
                exited = model(**full, use_cache=False).logits
            finally:
                ve.unwrap(model)
            pred, loss = _answer_stats(exited, answer)
            keeps = (pred == ref_pred).float().mean() > 0.99 and loss < ref_loss * 1.03
            data[l][0].append(gate_features(entering[l][:, :prompt_length], question)[0].cpu())
            data[l][1].append(int(keeps))
    return {l: (torch.stack(f), torch.tensor(y)) for l, (f, y) in data.items() if f}


def train(data, hidden_size: int, gate_hidden: int = 2048, steps: int = 200, lr: float = 1e-3, seed: int = 0):
    """One gate per layer, trained with cross-entropy on its (features, labels)."""
    gates = {}
    generator = torch.Generator().manual_seed(seed)
    for layer, (features, labels) in sorted(data.items()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + layer)
            gate = make_gate(hidden_size, gate_hidden)
        optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
        gate.train()
        for _ in range(steps):
            batch = torch.randint(len(labels), (min(32, len(labels)),), generator=generator)
            loss = torch.nn.functional.cross_entropy(gate(features[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        gates[layer] = gate.eval()
    return gates


def tiny_samples(model, processor, count: int, new_tokens: int = 4, seed: int = 0):
    """Prompts with one tiny image each; the answer is the model's own greedy continuation."""
    from vlm_efficient.testing import image_placeholder, tiny_batch, tiny_image

    words = "what is in the picture how many objects are there describe the image color of the car".split()
    rng = random.Random(seed)
    for i in range(count):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
        inputs = tiny_batch(processor, [(f"{question} {image_placeholder(processor)} answer", [tiny_image(seed + i)])])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        yield dict(inputs), out[0, inputs["input_ids"].shape[1] :]


def testbed_samples(model, processor, count: int, seed: int = 0):
    """Training-split VQA questions of the testbed world with their ground-truth answers."""
    from vlm_efficient.evals.testbed import build_prompt
    from vlm_efficient.evals.testbed.prompt import answer_text
    from vlm_efficient.evals.testbed.tasks import vqa

    rows = vqa("train", n_per_task=max(1, count // 4), start=seed)[:count]
    tokenizer = processor.tokenizer
    for row in rows:
        inputs = processor(images=[row["image"]], text=[build_prompt(row["question"])], return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        answer = tokenizer(answer_text(row["multiple_choice_answer"]), add_special_tokens=False).input_ids
        yield inputs, torch.tensor(answer + [tokenizer.eos_token_id], device=model.device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed", help="'testbed' or 'tiny:<family>'")
    parser.add_argument("--out", required=True, help="where to write the gate file")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--gate-hidden", type=int, default=2048)
    parser.add_argument("--min-layer", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    if args.model == "testbed":
        from vlm_efficient.evals.testbed import load_testbed

        model, processor = load_testbed(device=args.device)
        samples = testbed_samples(model, processor, args.samples)
    elif args.model.startswith("tiny:"):
        from vlm_efficient.testing import tiny_model

        model, processor = tiny_model(args.model.split(":", 1)[1])
        samples = tiny_samples(model, processor, args.samples)
    else:
        raise SystemExit(f"--model {args.model!r}: use 'testbed' or 'tiny:<family>'")
    num_layers = len(ve.get_adapter(model).decoder_layers(model))
    layers = list(range(args.min_layer, num_layers - 1))
    data = collect(model, samples, layers)
    hidden_size = ve.get_adapter(model).text_config(model).hidden_size
    gates = train(data, hidden_size, args.gate_hidden, args.steps)
    rates = {l: round(float(y.float().mean()), 3) for l, (_, y) in data.items()}
    save_gates(args.out, gates, hidden_size, args.gate_hidden, model=args.model, exit_label_rate=rates,
               fingerprint=model_fingerprint(model), samples=args.samples, steps=args.steps)
    print(f"wrote {len(gates)} gates to {args.out}; share of 'exit' labels per layer: {rates}")


if __name__ == "__main__":
    main()
