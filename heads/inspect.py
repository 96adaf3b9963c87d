"""Discovery: `vlm-efficient inspect` runs one image and question through the model and reports, per layer and head,
where the attention of the question goes, which tokens are sinks, and which heads look at the image.

    vlm-efficient inspect --model llava-hf/llava-1.5-7b-hf --image photo.jpg --question "What is written here?" \\
        --ocr-box 0.1,0.6,0.9,0.8 --output inspect_out

Writes inspect_out/inspect.json and one heatmap PNG per [layer x head] map. Definitions (question rows = the text
after the last image; every head map is the mean over those rows):
- sink dims: per layer, the hidden dimensions where the first token has |RMSNorm(h)| > tau (VAR's automatic rule);
  `massive` lists the first token's 5 largest |x| per layer, so a model without sinks at tau still shows its peaks;
- sink tokens: per layer, tokens with |x| > tau in a sink dim (VAR); text sinks: ACT's column rule (mean received
  attention over the rows that see the column > 0.1, per head, first one excluded), union over heads;
- image / text / sink attention: the attention mass the question rows pay image tokens, text tokens, sink tokens;
- image-centric ratio (VAR): share of question rows with image attention >= 0.2 and non-sink share >= 0.5;
- visual concentration ("visual heads"): 1 - entropy / log(n) of the attention renormalised over the image tokens;
- OCR score (with --ocr-box x0,y0,x1,y1 in image fractions): share of the image attention that lands on image tokens
  whose grid cell centre lies in the box;
- VHD: vision-aware head divergence at the last prompt token (VHR), with vs without the image.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm_efficient.method import AttentionEdit, Method

from .var import first_token_dims, rms_normalize, sink_tokens
from .vhr import vision_head_divergence

HEAD_MAPS = ("image_attention", "text_attention", "sink_attention", "image_centric_ratio", "visual_concentration")


@dataclass
class _Recorder(Method):
    """Collects the statistics of one prefill (batch of one); changes nothing."""

    name = "inspect"
    tau: float = 20.0
    ocr_box: tuple | None = None
    act_threshold: float = 0.1
    found: dict = field(default_factory=dict)

    def observes_hidden(self, layer):
        return True

    def observe_hidden(self, layer, run, hidden):
        if not run.prefill:
            return
        normed = rms_normalize(hidden)
        valid = run.current_valid().to(normed.device)
        dims = first_token_dims(normed, valid, self.tau)
        first = normed[0, int(valid[0].float().argmax())].abs()
        values, top = first.topk(min(5, first.numel()))
        self.found.setdefault("sink_dims", {})[layer] = dims[0].nonzero().flatten().tolist()
        self.found.setdefault("massive", {})[layer] = [[int(d), round(float(v), 2)] for d, v in zip(top, values)]
        self.found.setdefault("sinks", {})[layer] = (sink_tokens(normed, dims, self.tau) & valid)[0].cpu()

    def attention_edit(self, layer, run, context):
        if not context.prefill:
            return None
        return AttentionEdit(post_softmax=lambda probs: self._record(layer, run, context, probs))

    def _record(self, layer, run, context, probs):
        layout = run.layout
        p = probs[0].float()  # [H, q, kv]
        rows = context.queries_where(layout.after_visual_text)[0]
        image = context.keys_where(layout.visual)[0]
        text = context.keys_where(layout.text)[0]
        sink = self.found["sinks"][layer].to(image.device)[context.key_positions[0].clamp(min=0)]
        a = p[:, rows]  # [H, nq, kv]
        to_image, to_sinks = a[..., image].sum(-1), a[..., sink].sum(-1)
        to_visual_sinks = a[..., image & sink].sum(-1)
        centric = (to_image >= 0.2) & (to_image - to_visual_sinks >= 0.5 * to_image)
        share = a[..., image] / to_image[..., None].clamp_min(1e-12)
        entropy = -(share * share.clamp_min(1e-12).log()).sum(-1)
        maps = {
            "image_attention": to_image,
            "text_attention": a[..., text].sum(-1),
            "sink_attention": to_sinks,
            "image_centric_ratio": centric.float(),
            "visual_concentration": 1 - entropy / math.log(max(int(image.sum()), 2)),
        }
        if self.ocr_box is not None:
            in_box = context.keys_where(box_tokens(layout, self.ocr_box))[0]
            maps["ocr_score"] = a[..., in_box].sum(-1) / to_image.clamp_min(1e-12)
        for name, values in maps.items():
            self.found.setdefault(name, {})[layer] = values.mean(-1).tolist()
        # ACT's text-sink column rule over all valid rows
        valid = context.queries_where(layout.valid)[0]
        seen_by = valid.flip(0).cumsum(0).flip(0).clamp(min=1)
        mean = (p * valid[None, :, None]).sum(1) / seen_by[None, :]
        columns = (mean > self.act_threshold) & valid[None, :]
        first = columns.float().argmax(-1, keepdim=True)
        columns = columns.scatter(-1, first, False).any(0)
        positions = context.key_positions[0]
        self.found.setdefault("text_sinks", {})[layer] = positions[columns & text].tolist()
        return probs


def box_tokens(layout, box) -> torch.Tensor:
    """[B, N]: image tokens whose grid-cell centre lies in box (x0, y0, x1, y1), fractions of each image grid."""
    x0, y0, x1, y1 = box
    inside = torch.zeros_like(layout.visual)
    coords, index = layout.coords, layout.image_index
    for b in range(inside.shape[0]):
        for item in range(len(layout.images[b])):
            for part in coords[b, index[b] == item, 0].unique().tolist():
                if part < 0:
                    continue
                cells = (index[b] == item) & (coords[b, :, 0] == part)
                rows, cols = coords[b, cells, 1].max() + 1, coords[b, cells, 2].max() + 1
                y, x = (coords[b, :, 1] + 0.5) / rows, (coords[b, :, 2] + 0.5) / cols
                inside[b] |= cells & (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    return inside


def inspect_model(model, inputs: dict, *, tau: float = 20.0, ocr_box=None, with_vhd: bool = True) -> dict:
    """The discovery report of one prompt (batch of one) as a JSON-ready dict."""
    import vlm_efficient as ve

    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("inspect: give one prompt (batch of one)")
    recorder = _Recorder(tau=tau, ocr_box=ocr_box)
    ve.wrap(model, [recorder])
    try:
        with torch.no_grad():
            model(**inputs)
        layout = ve.engine_of(model).run.layout
    finally:
        ve.unwrap(model)
    if not layout.has_visual:
        raise ValueError("inspect: the prompt has no image tokens")
    found = recorder.found
    num_layers = len(found["sink_dims"])
    report = {
        "num_layers": num_layers,
        "image_positions": layout.visual[0].nonzero().flatten().tolist(),
        "question_positions": layout.after_visual_text[0].nonzero().flatten().tolist(),
        "tau": tau,
        "sink_dims": found["sink_dims"],
        "massive": found["massive"],
        "sink_tokens": {layer: s.nonzero().flatten().tolist() for layer, s in found["sinks"].items()},
        "visual_sink_tokens": {
            layer: (s & layout.visual[0].cpu()).nonzero().flatten().tolist() for layer, s in found["sinks"].items()
        },
        "text_sinks": found["text_sinks"],
        "heads": {
            name: [found[name][layer] for layer in range(num_layers)]
            for name in (*HEAD_MAPS, "ocr_score")
            if name in found
        },
    }
    # the dims massive in at least half of the layers from 2 on: the model's sink dims (VAR's fixed list)
    counts: dict[int, int] = {}
    for layer in range(2, num_layers):
        for dim in found["sink_dims"][layer]:
            counts[dim] = counts.get(dim, 0) + 1
    report["model_sink_dims"] = sorted(d for d, c in counts.items() if c >= max(1, (num_layers - 2) / 2))
    if with_vhd:
        vhd, _ = vision_head_divergence(model, inputs)
        report["heads"]["vhd"] = vhd[0].tolist()
    report["top_heads"] = {name: _top(values) for name, values in report["heads"].items()}
    return report


def _top(values, count: int = 10) -> list[str]:
    flat = torch.tensor(values).flatten()
    heads = len(values[0])
    order = flat.argsort(descending=True, stable=True)[:count]
    return [f"{int(i) // heads}.{int(i) % heads}" for i in order]


def write_heatmaps(report: dict, directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    for name, values in report["heads"].items():
        figure, axis = plt.subplots(figsize=(max(4, len(values[0]) * 0.25 + 2), max(3, len(values) * 0.2 + 1.5)))
        image = axis.imshow(torch.tensor(values).numpy(), aspect="auto", cmap="viridis")
        axis.set(xlabel="head", ylabel="layer", title=name.replace("_", " "))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.colorbar(image, ax=axis)
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path.name)
    sinks = torch.zeros(report["num_layers"], max(report["image_positions"] + report["question_positions"]) + 1)
    for layer, positions in report["sink_tokens"].items():
        sinks[int(layer), [p for p in positions if p < sinks.shape[1]]] = 1
    figure, axis = plt.subplots(figsize=(8, 3))
    axis.imshow(sinks.numpy(), aspect="auto", cmap="Greys", interpolation="nearest")
    axis.set(xlabel="position", ylabel="layer", title=f"sink tokens (tau={report['tau']})")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    path = directory / "sink_tokens.png"
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return written + [path.name]


def _inspect(args) -> int:
    from PIL import Image

    from vlm_efficient.models import build_inputs, load_model

    box = None
    if args.ocr_box:
        try:
            box = tuple(float(v) for v in args.ocr_box.split(","))
        except ValueError:
            box = ()
        if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise ValueError(f"--ocr-box {args.ocr_box!r}: give x0,y0,x1,y1 as fractions with x0 < x1, y0 < y1")
    torch.manual_seed(0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model(args.model, device=device, dtype=getattr(torch, args.dtype))
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        from vlm_efficient.testing import tiny_image

        image = tiny_image(0)
    inputs = build_inputs(processor, image, args.question, device, getattr(torch, args.dtype))
    report = inspect_model(model, dict(inputs), tau=args.tau, ocr_box=box)
    report.update(model=args.model, question=args.question, image=args.image or "built-in sample")
    tokenizer = getattr(processor, "tokenizer", processor)
    report["tokens"] = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_heatmaps(report, out)
    (out / "inspect.json").write_text(json.dumps(report, indent=1))
    print(f"sink dims (tau={args.tau}): {report['model_sink_dims'] or 'none'}")
    for name in ("image_attention", "visual_concentration", "vhd", "ocr_score"):
        if name in report["top_heads"]:
            print(f"top {name} heads (layer.head): {' '.join(report['top_heads'][name][:5])}")
    print(f"wrote {out / 'inspect.json'} and {len(report['plots'])} heatmaps")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="per layer/head attention maps, sinks and vision heads for one prompt")
    p.add_argument("--model", default="tiny:llava", help="testbed, testbed-lm, HF directory or hub id, or tiny:<family>")
    p.add_argument("--image", help="image file (default: a built-in sample)")
    p.add_argument("--question", default="What is in the image?")
    p.add_argument("--output", default="inspect_out", help="directory for inspect.json and the heatmaps")
    p.add_argument("--tau", type=float, default=20.0, help="sink threshold on |RMSNorm(h)| (VAR: 20)")
    p.add_argument("--ocr-box", help="x0,y0,x1,y1 (fractions of the image) of the text region: OCR-head score")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_inspect)
