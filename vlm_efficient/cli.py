"""The `vlm-efficient` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import importlib

from .models import default_device

DEFAULT_MODEL = "testbed"

# Modules that add subcommands: each has `register(subparsers)` and imports heavy dependencies lazily.
COMMAND_MODULES: tuple[str, ...] = (
    "vlm_efficient.evals.cli",
    "vlm_efficient.heads.inspect",
    "vlm_efficient.heads.tag",
    "vlm_efficient.demos.cli",
)


def _compare(args) -> int:
    import torch

    from .compare import compare, format_compare
    from .models import load_model
    from .registry import split_specs

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    specs = split_specs(args.methods)
    image, question, expected = _sample(args)  # bad input fails before the model is loaded
    model, processor = load_model(args.model, device=args.device, dtype=dtype)
    results = compare(model, processor, image, question, specs, max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    results.update(model=args.model, expected_answer=expected)
    print(format_compare(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _sample(args):
    """(image, question, expected answer or None): the user's image, else a held-out testbed scene with a
    counting question about it (or the user's question)."""
    from PIL import Image

    if args.image:
        try:
            image = Image.open(args.image).convert("RGB")
        except FileNotFoundError:
            raise ValueError(f"--image {args.image}: no such file") from None
        except OSError:  # not an image (UnidentifiedImageError), or a broken one
            raise ValueError(f"--image {args.image}: not an image file PIL can read; give a PNG, JPEG, WebP, GIF or "
                             "BMP") from None  # fmt: skip
        return image, args.question or "What is in the image?", None
    image, question, answer = held_out_sample(args.scene)
    return (image, args.question, None) if args.question else (image, question, answer)


def held_out_sample(index: int):
    """(image, question, expected answer): held-out testbed scene `index` and a counting question about it."""
    from .evals.testbed import tasks, world

    scene = world.make_scene("test", index)
    question, answer = tasks.question_count(scene, scene.objects[0].shape)
    return scene.image(), question + tasks.SHORT_SUFFIX, answer


def _methods(args) -> int:
    from .registry import METHODS, method_class

    for name in sorted(METHODS):
        cls = method_class(name)
        print(f"{name}: {cls.summary}  (defaults: {cls().spec()})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-efficient", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", help="run a model with and without methods on one image and question")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="testbed, testbed-lm, a HF directory or hub id, or tiny:<family> (default %(default)s)")
    p.add_argument("--methods", default="fastv:layer=2,ratio=0.5;fastv:layer=2,ratio=0.75",
                   help="spec strings to compare with the base model, ';'-separated (each may '+'-join methods)")
    p.add_argument("--image", help="image file (default: a held-out testbed scene)")
    p.add_argument("--scene", type=int, default=0, help="index of the held-out testbed scene (default %(default)s)")
    p.add_argument("--question", help="default: a counting question about the scene")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_compare)

    p = sub.add_parser("methods", help="list the registered methods and their defaults")
    p.set_defaults(func=_methods)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:  # bad input: a clear message, not a traceback
        print(f"vlm-efficient: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
