"""`vlm-efficient eval`, `vlm-efficient bench`, `vlm-efficient sweep`: registered by vlm_efficient.cli."""

from __future__ import annotations


def _common(p, model_default="testbed") -> None:
    p.add_argument("--model", default=model_default,
                   help="testbed, testbed-lm, tiny:<family>, a model directory or a hub id (default %(default)s)")  # fmt: skip
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _eval_args(p) -> None:
    from .tasks import TASKS

    p.add_argument("--tasks", required=True, help=f"comma-separated: {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's own")
    p.add_argument("--data-dir", default=None, help="local dataset copies (DIR/POPE, DIR/MME, DIR/COCO, ...)")
    p.add_argument("--output", required=True, help="run directory; rerun with the same arguments to resume")
    p.add_argument("--no-progress", action="store_true")


def _load(args):
    import torch

    from vlm_efficient.models import default_device

    from .runner import dist_state, load_eval_model

    state = dist_state()  # one model per process under accelerate launch, on that process's device
    args.device = args.device or (str(state.device) if state is not None else default_device())
    return load_eval_model(args.model, args.device, getattr(torch, args.dtype))


def _tasks(text: str) -> list[str]:
    from .tasks import TASKS

    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; tasks: {', '.join(TASKS)}")
    return names


def _eval(args) -> int:
    from .runner import evaluate, format_results

    tasks = _tasks(args.tasks)
    model, processor = _load(args)
    results = evaluate(model, processor, tasks, args.output, methods=args.methods, limit=args.limit,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, data_dir=args.data_dir,
                       model_name=args.model, progress=not args.no_progress)  # fmt: skip
    if results is not None:
        print(format_results(results))
        print(f"results: {args.output}/results.json")
    return 0


def _sweep(args) -> int:
    from .sweep import sweep

    from vlm_efficient.registry import split_specs

    tasks = _tasks(args.tasks)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    methods = ["all"] if args.methods.strip() == "all" else split_specs(args.methods)
    model, processor = _load(args)
    table = sweep(model, processor, tasks, args.output, methods=methods, ratios=ratios,
                  speed_repeats=args.speed_repeats, limit=args.limit, batch_size=args.batch_size,
                  max_new_tokens=args.max_new_tokens, data_dir=args.data_dir, model_name=args.model,
                  progress=not args.no_progress)  # fmt: skip
    if table is not None:
        print(table)
    return 0


def _bench(args) -> int:
    import torch

    from vlm_efficient.models import default_device

    from vlm_efficient.registry import split_specs

    from .bench import bench, format_bench, format_profile

    args.device = args.device or default_device()
    result = bench(args.model, [""] + split_specs(args.methods), device=args.device,
                   dtype=getattr(torch, args.dtype), layers=args.layers, batch_size=args.batch_size,
                   image_size=args.image_size, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                   output=args.output, profile=args.profile, video_frames=args.video_frames)  # fmt: skip
    print(format_bench(result))
    if args.profile:
        print("\n" + format_profile(result["profiles"]))
    return 0


def _lmms_eval(args) -> int:
    from .lmms_eval_plugin import run_lmms_eval

    return run_lmms_eval(args.lmms_eval_args)


def register(subparsers) -> None:
    # every argument goes to lmms-eval as it is (prefix "+": none of them is this parser's option)
    p = subparsers.add_parser("lmms-eval", prefix_chars="+", add_help=False,
                              help="lmms-eval's CLI with the shipped tasks (--data-dir DIR for the *_local ones, "
                                   "--tasks-dir prints their folder); exits non-zero when lmms-eval logs an error")  # fmt: skip
    p.add_argument("lmms_eval_args", nargs="*")
    p.set_defaults(func=_lmms_eval)

    p = subparsers.add_parser("eval", help="evaluate a model (+ methods) on benchmarks; resumable, lmms-eval layout")
    _common(p)
    p.add_argument("--methods", default="", help="spec string, e.g. fastv:layer=2,ratio=0.5 (default: none)")
    _eval_args(p)
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("sweep", help="eval over methods x ratios: table (markdown + JSON) and plots")
    _common(p)
    p.add_argument("--methods", required=True,
                   help="';'-separated specs; one with an open ratio runs at each --ratios, e.g. 'fastv:layer=2;pool'; "
                        "'all': every registered method (sweep.ALL)")  # fmt: skip
    p.add_argument("--ratios", default="0.5,0.75,0.889",
                   help="pruning ratios, comma-separated (default %(default)s: 576 -> 288 / 144 / 64 tokens)")
    p.add_argument("--speed-repeats", "--repeats", type=int, default=3,
                   help="batch-1 TTFT and decode timing rounds per run, the best reported with the rounds' range "
                        "(1: a single run, labelled so; 0: none; default %(default)s)")
    _eval_args(p)
    p.set_defaults(func=_sweep)

    from .archs import ARCHS

    p = subparsers.add_parser("bench", help="prefill, first token, decode speed, memory, KV, FLOPs: base vs methods")
    _common(p, model_default="llava-1.5-7b")
    p.set_defaults(func=_bench)
    p.add_argument("--methods", default="fastv:layer=2,ratio=0.5", help="';'-separated specs, each against the base")
    p.add_argument("--layers", type=int, default=None,
                   help=f"decoder and vision layers of a random architecture ({', '.join(ARCHS)}); default: all on "
                        "GPU, 3 on CPU; one that does not fit the device's memory is refused")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--image-size", type=int, default=None, help="square image side in pixels (default per model)")
    p.add_argument("--video-frames", type=int, default=0,
                   help="each sample a synthetic clip of this many frames of --image-size instead of an image "
                        "(Qwen architectures; 0: an image)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds per method; each measure is its best round, shown with the rounds' range")
    p.add_argument("--output", default=None, help="directory for bench.json, bench.md and bench.png")
    p.add_argument("--profile", action="store_true",
                   help="also profile one prefill and one generate() per method: host ops, syncs, GPU busy time")
