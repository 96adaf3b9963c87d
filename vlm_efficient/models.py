"""Loading a model by name: "testbed" (the project's trained LLaVA-architecture model, shipped in the package),
"testbed-lm" (the same vision side on the pretrained SmolLM2-135M-Instruct, evals/testbed/lm.py), a
Hugging Face directory or hub id through the standard from_pretrained calls, or "tiny:<family>" (a small random model
of that family, for trying the pipeline on any architecture without weights)."""

from __future__ import annotations

from pathlib import Path

import torch


def default_device() -> str:
    """The default device: "cuda" when a GPU is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """-> (model, processor) in eval mode."""
    if name == "testbed":
        from .evals.testbed import TESTBED_DIR

        name = str(TESTBED_DIR)
    if name == "testbed-lm":  # LLaVA on SmolLM2: the trained parts of the checkout + the cached LM, assembled once
        from .evals.testbed.lm import assembled_dir

        name = str(assembled_dir())
    if name.startswith("tiny:"):
        from .testing import FAMILIES, tiny_model

        family = name.split(":", 1)[1]
        if family not in FAMILIES:
            raise ValueError(f"unknown built-in model {name!r}: use one of {', '.join('tiny:' + f for f in FAMILIES)}")
        model, processor = tiny_model(family, dtype=dtype)
        return model.to(device), processor
    from transformers import AutoModelForImageTextToText, ProcessorMixin

    if _looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise ValueError(f"no model directory at {name}: give a Hugging Face model directory, a hub id, testbed or "
                         "tiny:<family>")  # fmt: skip
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


def build_prompt(processor, question: str, num_images: int = 1) -> str:
    """The model's own chat template when it has one, else the images' placeholders followed by the question."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    from .testing import image_placeholder

    return " ".join([image_placeholder(processor)] * num_images) + "\n" + question


def build_inputs(processor, image, question: str, device, dtype):
    """The processor's inputs for one image and `question` (its `build_prompt`), on `device`, pixels in `dtype`."""
    inputs = processor(images=[image], text=[build_prompt(processor, question)], return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs
