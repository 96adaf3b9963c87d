"""`vlm-efficient demo`: a Gradio app that runs the base model and the wrapped model side by side on one image and
question, with the kept visual tokens of each layer and the last token's attention drawn over the image."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import gradio as gr
import torch
from PIL import Image, ImageOps

from vlm_efficient.models import load_model
from vlm_efficient.registry import METHODS, method_class

from . import render
from .runner import DemoRunner

PRESETS = {
    "FastV 50%": "fastv:layer=2,ratio=0.5",
    "FastV 75%": "fastv:layer=2,ratio=0.75",
    "VAR": "var",
    "VisionZip 64 + FastV": "visionzip:ratio=0.889+fastv:layer=2,ratio=0.5",
    "PyramidDrop": "pdrop:ratio=0.5",
    "DART": "dart",
    "DivPrune 75%": "divprune:ratio=0.75",
}
MAX_PIXELS = 40_000_000
MAX_NEW_TOKENS = 128
SCENES = 6  # held-out testbed scenes among the samples
PHOTOS = {"grace_hopper.jpg": "a photo", "Minduka_Present_Blue_Pack.png": "a drawing"}  # matplotlib's sample data


def load_image(path) -> Image.Image:
    """The file at `path` as an RGB image, or a ValueError that says what is wrong with it."""
    if not path:
        raise ValueError("Choose a sample or upload an image.")
    name = Path(path).name
    too_large = f"{name} is too large: the demo takes images up to {MAX_PIXELS / 1e6:.0f} megapixels; downscale it"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{too_large} ({image.width} x {image.height} pixels).")
        return ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError:
        raise ValueError(f"{too_large}.") from None
    except OSError:  # not an image (UnidentifiedImageError), or a broken one
        raise ValueError(f"{name} is not an image the demo can read: upload a PNG, JPEG, WebP, GIF or BMP") from None


def make_samples(directory: Path) -> dict[str, tuple[str, str, str | None]]:
    """label -> (image file, question, expected answer or None): held-out testbed scenes with a description or counting
    question (alternately), then the sample images matplotlib ships."""
    import matplotlib.cbook

    from vlm_efficient.cli import held_out_sample
    from vlm_efficient.evals.testbed import tasks, world

    samples = {}
    for index in range(SCENES):
        path = directory / f"testbed_scene_{index}.png"
        if index % 2:
            image, question, expected = held_out_sample(index)
        else:
            scene = world.make_scene("test", index)
            image, question, expected = scene.image(), tasks.DESCRIBE, tasks.caption(scene)
        image.save(path)
        samples[f"held-out testbed scene {index}: {question.splitlines()[0]}"] = (str(path), question, expected)
    for name, kind in PHOTOS.items():
        path = directory / name
        path.write_bytes(Path(matplotlib.cbook.get_sample_data(name, asfileobj=False)).read_bytes())
        samples[f"{kind}: {name}"] = (str(path), "What is in the image?", None)
    return samples


def compose(names: list[str], spec: str) -> str:
    """The spec for the chosen methods: a method already in `spec` keeps its parameters, a new one gets its defaults."""
    current = {part.split(":")[0].strip(): part.strip() for part in spec.split("+") if part.strip()}
    return "+".join(current.get(name) or method_class(name)().spec() for name in names)


def method_help(spec: str) -> str:
    """Each method of the spec with its summary and its parameters' defaults."""
    lines = []
    for name in dict.fromkeys(part.split(":")[0].strip() for part in spec.split("+")):
        if name in METHODS:
            method = method_class(name)
            lines.append(f"- **{name}**: {method.summary}. Defaults: `{method().spec()}`")
    return "\n".join(lines) or "No method: the wrapped model runs as the base one."


def build_app(runner: DemoRunner, samples: dict) -> gr.Blocks:
    """The app: `samples` as make_samples gives them; the runner's `concurrency` requests are answered at once."""
    first = next(iter(samples))
    layers, heads = runner.num_layers, runner.num_heads

    def choose_sample(label):
        path, question, expected = samples[label]
        return path, path, question, f"Expected answer: {expected}" if expected else ""

    def uploaded(path):
        try:
            return load_image(path), ""
        except ValueError as error:
            raise gr.Error(str(error)) from None

    def pictures(request, layer, head):
        if request is None:
            return None, None, None, ""
        layer, head = int(layer), int(head)
        return (
            render.kept_tokens(request.view, request.wrapped, layer),
            render.attention_map(request.view, request.base, layer, head),
            render.attention_map(request.view, request.wrapped, layer, head),
            render.caption(request, layer, head),
        )

    def answer(path, question, spec, max_new_tokens, layer, head):
        try:
            image = load_image(path)
            if not (question or "").strip():
                raise ValueError("Type a question about the image.")
            for request in runner.run(image, question.strip(), (spec or "").strip(), int(max_new_tokens)):
                done = all(side.done for side in request.sides)
                shown = pictures(request, layer, head) if done else (None, None, None, "")
                yield (
                    "Done." if done else "Answering…",
                    request.base.text,
                    request.wrapped.text,
                    render.numbers(request),
                    *shown,
                    render.details(request) if done else None,
                    request if done else None,
                )
        except ValueError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title="vlm-efficient demo", analytics_enabled=False) as app:
        gr.Markdown(
            "## vlm-efficient: the base model and the wrapped model side by side\n"
            "Pick a sample or upload an image, ask a question, choose methods (a preset, or methods and their "
            "parameters in the spec), then **Run**. Both answers stream; the pictures show, per layer, which image "
            "tokens the wrapped model kept and where the last prompt token looks."
        )
        with gr.Row():
            with gr.Column(scale=2):
                sample = gr.Dropdown(list(samples), value=first, label="Sample")
                image_file = gr.File(value=samples[first][0], label="Image file (the sample's, or upload your own)",
                                     file_types=["image"], type="filepath", elem_id="image-file")  # fmt: skip
                preview = gr.Image(value=samples[first][0], label="Image", interactive=False, height=240,
                                   elem_id="preview")  # fmt: skip
            with gr.Column(scale=3):
                question = gr.Textbox(samples[first][1], label="Question", lines=2)
                expected = gr.Markdown(choose_sample(first)[3])
                preset = gr.Dropdown(list(PRESETS), value="FastV 75%", label="Preset")
                methods = gr.Dropdown(sorted(METHODS), value=["fastv"], multiselect=True, label="Methods")
                spec = gr.Textbox(PRESETS["FastV 75%"], label="Spec: methods and their parameters ('+' joins methods)")
                parameters = gr.Markdown(method_help(PRESETS["FastV 75%"]))
                max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=48, step=1, label="Max new tokens")
                run = gr.Button("Run", variant="primary")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            base_answer = gr.Textbox(label="Base model", lines=4, interactive=False, elem_id="base-answer")
            wrapped_answer = gr.Textbox(label="Wrapped model", lines=4, interactive=False, elem_id="wrapped-answer")
        table = gr.Markdown(elem_id="numbers")
        with gr.Row():
            layer = gr.Slider(0, layers - 1, value=layers - 1, step=1, label="Layer")
            # string values: the API advertises a dropdown's values as strings, so that is what it must take
            head = gr.Dropdown([("mean of heads", "-1")] + [(f"head {h}", str(h)) for h in range(heads)], value="-1",
                               label="Head")  # fmt: skip
        caption = gr.Markdown()
        with gr.Row():
            kept = gr.Image(label="Wrapped: image tokens kept in this layer", interactive=False, format="png",
                            elem_id="kept")
            base_map = gr.Image(label="Base: last token's attention", interactive=False, format="png")
            wrapped_map = gr.Image(label="Wrapped: last token's attention", interactive=False, format="png")
        with gr.Accordion("Raw results", open=False):
            raw = gr.JSON()
        request = gr.State()

        sample.change(choose_sample, sample, [image_file, preview, question, expected], api_name="sample")
        image_file.upload(uploaded, image_file, [preview, expected], api_name="upload")
        preset.change(lambda name: (PRESETS[name], [p.split(":")[0] for p in PRESETS[name].split("+")]), preset,
                      [spec, methods], api_name=False)  # fmt: skip
        methods.input(compose, [methods, spec], spec, api_name=False)
        spec.change(method_help, spec, parameters, api_name=False)
        run.click(
            answer,
            [image_file, question, spec, max_new_tokens, layer, head],
            [status, base_answer, wrapped_answer, table, kept, base_map, wrapped_map, caption, raw, request],
            api_name="answer",
            concurrency_limit=runner.concurrency,
        )
        for control, name in ((layer, "pictures"), (head, False)):
            control.change(pictures, [request, layer, head], [kept, base_map, wrapped_map, caption], api_name=name)
    return app


def launch(model: str = "testbed", *, port: int | None = None, host: str = "127.0.0.1", concurrency: int = 2,
           device: str = "cpu", dtype: torch.dtype = torch.float32, block: bool = False) -> gr.Blocks:  # fmt: skip
    """Load `model`, warm it up on the first sample and serve the app (in the background unless `block`); the app's
    `local_url` is where it listens."""
    model, processor = load_model(model, device=device, dtype=dtype)
    runner = DemoRunner(model, processor, concurrency)
    directory = tempfile.TemporaryDirectory(prefix="vlm_efficient_demo_")
    samples = make_samples(Path(directory.name))
    path, question, _ = next(iter(samples.values()))
    for _ in range(concurrency):  # each pair of copies in turn: no timed request is a model's first call
        for _ in runner.run(load_image(path), question, "", 2):
            pass
    app = build_app(runner, samples)
    app.samples_directory = directory  # removed with the app
    app.queue(default_concurrency_limit=concurrency)
    # system fonts: the default theme loads its fonts from the internet
    theme = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("monospace",))
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, quiet=not block,
               max_file_size="50mb", theme=theme)  # fmt: skip
    return app
