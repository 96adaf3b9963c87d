"""Loading a model by name: a named model from the registry below ("testbed", the project's trained
LLaVA-architecture model; "testbed-lm", the same vision side on the pretrained SmolLM2-135M-Instruct; "tiny:<family>", a small random model of that family, for trying the pipeline on any
architecture without weights), else a Hugging Face directory or hub id through the standard from_pretrained calls.

The registry belongs to the core, so the core never imports the code that makes a named model: the library registers
its tiny models itself, and a package (the evals' testbed, a plugin) registers its models either in Python with
`register_model` or, to be found without being imported first, as an entry point of group `vlm_efficient.models`
in its pyproject.toml (`testbed = "vlm_efficient.evals.testbed:load_testbed"`): the entry point's name is the model's
name, its object the loader, called as `load(device=..., dtype=...)` -> (model, processor) in eval mode."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ENTRY_POINT_GROUP = "vlm_efficient.models"


@dataclass(frozen=True)
class NamedModel:
    name: str
    load: Callable  # load(device=..., dtype=...) -> (model, processor), in eval mode
    summary: str = ""


_NAMED_MODELS: dict[str, NamedModel] = {}
_BUILT_IN_READ = False


def register_model(name: str, load: Callable, summary: str = "") -> NamedModel:
    """Make `load_model(name)` call `load(device=..., dtype=...)`. Names are unique: registering one twice is an
    error (unregister_model first to replace it)."""
    if not name or name != name.strip() or "/" in name or name.startswith((".", "~")):
        raise ValueError(f"model name {name!r}: use a plain name such as 'testbed' or 'tiny:llava' (a path or hub id "
                         "loads without registering)")  # fmt: skip
    if name in named_models():
        raise ValueError(f"a model named {name!r} is already registered ({_NAMED_MODELS[name].load!r}); "
                         "unregister_model it first or pick another name")  # fmt: skip
    entry = _NAMED_MODELS[name] = NamedModel(name, load, summary)
    return entry


def unregister_model(name: str) -> None:
    if _NAMED_MODELS.pop(name, None) is None:
        raise ValueError(f"no model named {name!r} is registered")


def named_models() -> dict[str, NamedModel]:
    """The registered models by name: the library's tiny models and the installed packages' entry points (both read
    at the first call: listing them imports no model code), then those given to register_model."""
    global _BUILT_IN_READ
    if not _BUILT_IN_READ:
        _BUILT_IN_READ = True
        from .testing import FAMILIES, NEW_FAMILIES

        for family in FAMILIES + NEW_FAMILIES:
            _NAMED_MODELS[f"tiny:{family}"] = NamedModel(f"tiny:{family}", _TinyModel(family),
                                                         f"a small random {family} model (offline, no weights)")
        for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if point.name not in _NAMED_MODELS:
                _NAMED_MODELS[point.name] = NamedModel(point.name, _LoadEntryPoint(point), f"from {point.value}")
    return dict(_NAMED_MODELS)


@dataclass(frozen=True)
class _LoadEntryPoint:
    """An entry point's loader, imported at the first load (listing the names imports nothing)."""

    point: importlib.metadata.EntryPoint

    def __call__(self, **kwargs):
        return self.point.load()(**kwargs)


@dataclass(frozen=True)
class _TinyModel:
    family: str

    def __call__(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from .testing import tiny_model

        model, processor = tiny_model(self.family, dtype=dtype)
        return model.to(device), processor


def default_device() -> str:
    """The default device: "cuda" when a GPU is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """-> (model, processor) in eval mode: a registered model by name, else a directory or hub id."""
    models = named_models()
    if name in models:
        return models[name].load(device=device, dtype=dtype)
    if name.startswith("tiny:"):
        tiny = ", ".join(known for known in models if known.startswith("tiny:"))
        raise ValueError(f"unknown built-in model {name!r}: use one of {tiny}")
    from transformers import AutoModelForImageTextToText, ProcessorMixin

    if _looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise ValueError(f"no model directory at {name}: give a Hugging Face model directory, a hub id or a "
                         f"registered model ({', '.join(models)})")  # fmt: skip
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
    except OSError as error:  # missing files, unknown hub id, no network: transformers' message, on one line
        raise ValueError(f"cannot load model {name!r}: {' '.join(str(error).split())}") from None
    processor = _load_processor(name, model.config.model_type)
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"  # batched generation pads on the left
    if not isinstance(processor, ProcessorMixin):
        # AutoProcessor silently falls back to a bare tokenizer when it cannot resolve the processor class
        raise ValueError(
            f"{name}: AutoProcessor returned a {type(processor).__name__}, not a multimodal processor; the "
            "directory needs processor_config.json / preprocessor_config.json for a processor transformers knows"
        )
    return model.to(device).eval(), processor


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("org/name"): absolute, relative with ./ or ../, or under ~."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def _load_processor(name: str, model_type: str):
    """AutoProcessor's processor; for a Qwen directory without torchvision, the same processor without its video
    processor. The stock Qwen processors load a video processor, and every video processor of transformers 5.x needs
    torchvision; the image processors have PIL versions, and this library takes images only."""
    from transformers import AutoProcessor

    from .testing import _TINY_QWEN_PROCESSORS as IMAGE_ONLY_QWEN_PROCESSORS  # image-only, despite the name

    try:
        return AutoProcessor.from_pretrained(name)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
        if model_type not in IMAGE_ONLY_QWEN_PROCESSORS:
            raise ValueError(
                f"{name}: its processor needs torchvision, which is not installed. Install the torchvision build made "
                "for your torch (e.g. pip install torchvision --index-url https://download.pytorch.org/whl/cpu for "
                "CPU torch), not another one beside it"
            ) from None
        return IMAGE_ONLY_QWEN_PROCESSORS[model_type].from_pretrained(name)


def build_prompt(processor, question: str, num_images: int = 1, num_videos: int = 0) -> str:
    """The model's own chat template when it has one, else the images' and videos' placeholders followed by the
    question."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
        messages = [{"role": "user", "content": content + [{"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    from .testing import image_placeholder, video_placeholder

    placeholders = [image_placeholder(processor)] * num_images
    if num_videos:  # image-only processors have no video placeholder
        placeholders += [video_placeholder(processor)] * num_videos
    return " ".join(placeholders) + "\n" + question


def build_inputs(processor, image, question: str, device, dtype):
    """The processor's inputs for one image and `question` (its `build_prompt`), on `device`, pixels in `dtype`."""
    inputs = processor(images=[image], text=[build_prompt(processor, question)], return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs

