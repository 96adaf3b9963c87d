"""One rank of the tensor-parallel check (tests/test_multi_device.py; on GPUs tests/multi_gpu.sh): load a saved tiny
model with tp_plan="auto" (or on one process with --single), run greedy generate() on the two-sample padded batch
with each method spec, and write tokens, logits and kept rows per layer to OUT/rank<RANK>.json.

    torchrun --nproc-per-node 2 tests/tp_check.py --model DIR --out OUT --specs fastv:layer=2,ratio=0.5 pai
    torchrun --nproc-per-node 2 tests/tp_check.py --model DIR --out OUT --refusals plphp vhr
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

import vlm_efficient as ve  # noqa: E402
from test_engine import greedy, two_samples  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--specs", nargs="*", default=[])
    parser.add_argument("--refusals", nargs="*", default=[])
    parser.add_argument("--single", action="store_true", help="one process, no tp_plan: the reference")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-plan", action="store_true", help="check that wrap() refuses (the family has no plan)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 ranks compare exactly
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype,
                                                        tp_plan=None if args.single else "auto")  # fmt: skip
    if args.single and torch.cuda.is_available():
        model.to("cuda")  # the reference on the ranks' kind of device
    processor = AutoProcessor.from_pretrained(args.model)
    device = next(model.parameters()).device
    batch = two_samples(processor).to(device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    text = model.config.get_text_config()
    o_proj = ve.get_adapter(model).head_output_module(ve.get_adapter(model).decoder_layers(model)[0])
    weight = o_proj.weight.to_local() if hasattr(o_proj.weight, "to_local") else o_proj.weight
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    result = {"local_heads": weight.shape[1] // head_dim, "refused": {}}
    if args.no_plan:  # a family whose plan leaves the decoder layers whole
        try:
            ve.wrap(model, "fastv")
        except ValueError as error:
            result["refused"]["no plan"] = str(error)
    for spec in [] if args.no_plan else ["", *args.specs]:
        ve.wrap(model, spec)
        try:
            out = greedy(model, batch)
            kept = ve.stats(model).tokens_per_layer_per_sample
        finally:
            ve.unwrap(model)
        result[spec] = {"tokens": out.sequences.tolist(), "kept": kept,
                        "logits": torch.stack(out.logits).float().cpu().tolist()}  # fmt: skip
    for spec in args.refusals:
        try:
            ve.wrap(model, spec)
        except ValueError as error:
            result["refused"][spec] = str(error)
        else:
            ve.unwrap(model)
            result["refused"][spec] = None
    if args.refusals:  # a plan that shards o_proj by output features instead of by heads (its input)
        from torch.distributed.tensor import Shard, distribute_tensor

        whole = o_proj.weight.full_tensor().detach()
        o_proj.weight = torch.nn.Parameter(distribute_tensor(whole, o_proj.weight.device_mesh, [Shard(0)]))
        try:
            ve.wrap(model, "fastv")
        except ValueError as error:
            result["refused"]["o_proj by rows"] = str(error)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{os.environ.get('RANK', 0)}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
