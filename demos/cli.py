"""`vlm-efficient demo`: registered by vlm_efficient.cli; gradio is imported only when the command runs."""

from __future__ import annotations

import importlib.util


def _demo(args) -> int:
    import torch

    if importlib.util.find_spec("gradio") is None:
        raise ValueError("the demo needs gradio: pip install 'vlm-efficient[demo]'")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: give a TCP port, 1 to 65535")
    if args.concurrency < 1:
        raise ValueError(f"--concurrency {args.concurrency}: serve at least one request at a time")
    from vlm_efficient.models import default_device

    from .app import launch

    device = args.device or default_device()
    print(f"loading {args.model} on {device}; the app will listen on http://{args.host}:{args.port}")
    launch(args.model, port=args.port, host=args.host, concurrency=args.concurrency, device=device,
           dtype=getattr(torch, args.dtype), block=True)  # fmt: skip
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="Gradio app: base and wrapped model side by side, kept tokens, attention")
    p.add_argument("--model", default="testbed",
                   help="testbed, testbed-lm, a model directory or hub id, or tiny:<family> (default %(default)s)")  # fmt: skip
    p.add_argument("--port", type=int, default=7860, help="default %(default)s")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--concurrency", type=int, default=2,
                   help="requests answered at once; each needs two copies of the model (default %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_demo)
