"""A random-weight 7B (evals/archs.py shapes, bf16) split by device_map across two GPUs against the same model on one
GPU: greedy tokens and kept rows of each method must be equal. Part of tests/multi_gpu.sh; writes OUT/split_7b.json.

    python tests/split_7b.py --arch llava-1.5-7b --out OUT [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from accelerate import dispatch_model

import vlm_efficient as ve
from vlm_efficient.evals.archs import DEFAULT_IMAGE_SIZE, build_arch
from vlm_efficient.testing import image_placeholder, tiny_batch, tiny_image

SPECS = ["", "fastv:layer=2,ratio=0.5", "visionzip", "pdrop", "pai", "var", "naavit"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="llava-1.5-7b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the released count)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--devices", default="cuda:0,cuda:1", help="the two halves' devices (cpu,cpu: a smoke run)")
    args = parser.parse_args()
    first, second = args.devices.split(",")
    model, processor = build_arch(args.arch, device=first, layers=args.layers)
    side = DEFAULT_IMAGE_SIZE[args.arch]
    ph = image_placeholder(processor)
    batch = tiny_batch(processor, [(f"USER: {ph}\nDescribe the image. ASSISTANT:", [tiny_image(0, (side, side))]),
                                   (f"USER: {ph}\nWhat is on the left side of this picture? ASSISTANT:",
                                    [tiny_image(1, (side, side))])]).to(first)  # fmt: skip
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)

    def runs(model) -> dict:
        result = {}
        for spec in SPECS:
            ve.wrap(model, spec)
            with torch.no_grad():
                out = model.generate(**batch, do_sample=False, max_new_tokens=args.new_tokens)
            result[spec] = {"tokens": out.cpu().tolist(), "kept": ve.stats(model).tokens_per_layer_per_sample}
            ve.unwrap(model)
        return result

    one = runs(model)
    layers = ve.get_adapter(model).decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    placement = {name: first for name, _ in model.named_children() if name != "model"}
    placement |= {f"model.{name}": first for name, _ in model.model.named_children() if name != "language_model"}
    text = model.model.language_model
    placement |= {f"model.language_model.{name}": second for name, _ in text.named_children() if name != "layers"}
    placement |= {f"{prefix}.{i}": first if i < len(layers) // 2 else second for i in range(len(layers))}
    placement |= {f"model.{name}": first for name, _ in model.model.named_parameters(recurse=False)}
    placement["model.language_model.embed_tokens"] = first
    model = dispatch_model(model, device_map=placement, force_hooks=True)
    two = runs(model)
    report = {spec: {"tokens_equal": one[spec]["tokens"] == two[spec]["tokens"],
                     "kept_equal": one[spec]["kept"] == two[spec]["kept"]} for spec in SPECS}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"split_{args.arch}.json"), "w") as f:
        json.dump({"arch": args.arch, "layers": len(layers), "report": report, "one_gpu": one, "two_gpus": two}, f)
    print(json.dumps(report, indent=1))
    if not all(r["tokens_equal"] and r["kept_equal"] for r in report.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
