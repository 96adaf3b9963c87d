"""The testbed: a small LLaVA-architecture VLM trained from scratch on a procedural world of shapes and signs.

    from vlm_efficient.evals.testbed import load_testbed, ask
    model, processor = load_testbed()
    ask(model, processor, image, "What color is the star?")

`world` draws scenes with complete ground truth, `tasks` turns them into POPE / CHAIR / VQAv2 / MME-shaped rows,
`train` is the script that made `checkpoint/`, `evaluate` measures it on held-out scenes. testbed-lm, the same vision
side on the pretrained SmolLM2-135M-Instruct: `lm` (loading, caching, assembly), `lm_train`, and its world of priors
`priors`. The checkpoint is a
standard HF directory: `LlavaForConditionalGeneration.from_pretrained(TESTBED_DIR)` and
`AutoProcessor.from_pretrained(TESTBED_DIR)` load it offline.

Checkpoint: 15.9M parameters (CLIP ViT 256x6 at 336 px / patch 14 -> 576 image tokens; Llama decoder 384x6, 8 query
heads of dim 64, 2 KV heads; 778-token byte-level BPE), fp16 weights, 30 MiB. Trained in four stages (446 s + 182 s +
392 s + 178 s on one H100; runs/ has the curves, logs and each stage's held-out eval). Held-out test scenes, greedy
(runs/stage4_eval.json, 150 scenes): POPE accuracy random / popular / adversarial 0.997 each (n=658 each); VQA count
0.907, colour 0.847, text 0.947, position 0.787 (n=150 each); caption object recall 0.547, CHAIR_S 0.073, CHAIR_I
0.037 (stage 3's push on attribute binding cost caption recall, 0.744 at stage 2).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .prompt import build_prompt

TESTBED_DIR = Path(__file__).resolve().parent / "checkpoint"

__all__ = ["TESTBED_DIR", "load_testbed", "ask", "ask_batch", "build_prompt"]


def load_testbed(device="cpu", dtype=torch.float32, attn_implementation="sdpa", path=None):
    """(model, processor) from the committed checkpoint (or `path`), in eval mode, offline."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = str(path or TESTBED_DIR)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model, processor


def _inputs(model, processor, images, questions):
    from vlm_efficient.models import build_prompt as chat_prompt

    # the processor's chat template: the testbed's renders `build_prompt`, testbed-lm's is SmolLM2's ChatML
    prompts = [chat_prompt(processor, q) for q in questions]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


@torch.inference_mode()
def ask_batch(model, processor, images, questions, max_new_tokens: int = 16, **generate_kwargs) -> list[str]:
    """Greedy answers to one question per image, batched with left padding."""
    inputs = _inputs(model, processor, images, questions)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def ask(model, processor, image, question: str, max_new_tokens: int = 16, **generate_kwargs) -> str:
    """Greedy answer to one question about one image."""
    return ask_batch(model, processor, [image], [question], max_new_tokens, **generate_kwargs)[0]
