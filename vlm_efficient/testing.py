"""Offline tiny random vision-language models for tests: no hub, no GPU, deterministic, built in milliseconds.

    model, processor = tiny_model("qwen2_vl", seed=0)
    batch = tiny_batch(processor, [(f"describe {image_placeholder(processor)} please", [tiny_image(0)])])
    model.generate(**batch, max_new_tokens=4, do_sample=False)

Tokens per image at tiny_image's default 112x112: llava 16 (4x4 CLIP grid, CLS dropped); llava_next 24
(4 base + 16 high-res from a 2x2 tile grid + 4 row newlines); qwen2_vl, qwen2_5_vl, qwen3_vl 16 (4x4 after the 2x2
merge). NEW_FAMILIES (engine contract tested, not yet every method): llava_onevision 88 for a prompt's single image
(16 base + 8 rows of 8 high-res cells and a newline), 17 each for several (base + newline); gemma3 4 (2x2 pooled);
idefics3 20 (2x2 tiles of 2x2 tokens + the global image).

Videos (VIDEO_FAMILIES): `tiny_video(seed, frames)` is a clip of frames panning over one random picture;
`video_placeholder(processor)` is its prompt text and `tiny_batch(processor, samples, videos=[...])` processes
prompts with images and clips. A 4-frame clip at the default size gives Qwen 2 temporal patches of 4x4 merged tokens
(32 video tokens), LLaVA-OneVision 4 frames of 2x2 pooled tokens and a newline (17).

Qwen processors: the stock Qwen processors need a video processor, and every video processor in transformers 5.x
needs torchvision. TinyQwen2VLProcessor, TinyQwen2_5_VLProcessor and TinyQwen3VLProcessor are subclasses without one
(their videos go through TinyQwenVideoProcessor, built on the image processor), registered with AutoProcessor when
this module is imported, so AutoProcessor.from_pretrained(save_tiny dir) resolves them by the name saved in
processor_config.json. Without that import, transformers silently returns a bare tokenizer for such a dir.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    BatchFeature,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

__all__ = [
    "FAMILIES",
    "NEW_FAMILIES",
    "VIDEO_FAMILIES",
    "DEFAULT_IMAGE_SIZE",
    "tiny_model",
    "tiny_image",
    "image_placeholder",
    "tiny_video",
    "video_placeholder",
    "tiny_batch",
    "save_tiny",
    "tiny_tokenizer",
    "TinyQwen2VLProcessor",
    "TinyQwen2_5_VLProcessor",
    "TinyQwen3VLProcessor",
]

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Families with an adapter and the engine's exactness contract (tests/test_families.py), not yet run through every
# method's tests (the methods' test files parametrise over FAMILIES).
NEW_FAMILIES: tuple[str, ...] = ("llava_onevision", "gemma3", "idefics3")
VIDEO_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")
DEFAULT_IMAGE_SIZE = (112, 112)  # (width, height), as PIL

# Text decoder shared by all families: GQA (4 query heads, 2 kv heads), head_dim 16.
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
    # 0.2 instead of 0.02: with tiny std the random model repeats one token whatever the prompt.
    initializer_range=0.2,
)
_MROPE_SECTION = [2, 3, 3]  # sums to head_dim / 2
_BASE_SPECIALS = ["<pad>", "<s>", "</s>"]
_QWEN_SPECIALS = {
    "vision_start_token": "<|vision_start|>",
    "image_token": "<|image_pad|>",
    "vision_end_token": "<|vision_end|>",
    "video_token": "<|video_pad|>",
}
_GEMMA3_SPECIALS = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
_CORPUS = """\
The quick brown fox jumps over the lazy dog near the river bank.
Describe the image in detail. What is in the picture? How many objects are there?
A red square sits above a blue circle on a white background.
The cat is sleeping on the sofa while the dog plays in the garden.
Answer the question using a single word or phrase. Yes. No. Two. Three. Left. Right.
What color is the car? The car is green and parked next to a tall building.
There are four people walking along the beach at sunset with a small boat in the water.
Please give a short caption: a bowl of fruit, apples, bananas and oranges on a wooden table.
USER: ASSISTANT: Question: Answer: Image: Caption: The answer is
"""


@functools.lru_cache(maxsize=None)
def _bpe_json() -> str:
    """Byte-level BPE trained once on _CORPUS; returned as JSON so every tokenizer gets a fresh, unshared copy."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=_BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The family's tokenizer: the shared BPE plus its image/vision special tokens (appended after the BPE vocab)."""
    _check_family(family)
    specials = {"image_token": "<image>"} if family.startswith("llava") else dict(_QWEN_SPECIALS)
    if family == "llava_onevision":
        specials["video_token"] = "<video>"
    if family == "gemma3":
        specials = dict(_GEMMA3_SPECIALS)
    if family == "idefics3":  # the processor adds <fake_token_around_image>, <image> and <end_of_utterance> itself
        specials = ["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=specials,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


class TinyQwenVideoProcessor:
    """Qwen's video preprocessing without torchvision, on the image processor: each frame is resized and normalised
    by it (as a one-frame image, whose temporal patch repeats the frame), and temporal patch t of a video takes its
    slice t from frame t of each group of temporal_patch_size frames, which is Qwen2VLVideoProcessor.patchify's
    layout. A clip whose length is not a multiple of temporal_patch_size repeats its last frame, as patchify does.
    Frames are taken as sampled at `FPS` (the frame timestamps of Qwen3-VL's prompt)."""

    FPS = 2.0

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.merge_size = image_processor.merge_size
        self.temporal_patch_size = image_processor.temporal_patch_size

    def __call__(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        from transformers.video_utils import VideoMetadata

        step = self.temporal_patch_size
        patches, grids, metadata = [], [], []
        for frames in videos:
            frames = list(frames) + [frames[-1]] * (-len(frames) % step)
            out = self.image_processor(frames, return_tensors="pt")
            per_frame = out["pixel_values"].view(len(frames), -1, 3, step, *[self.image_processor.patch_size] * 2)
            chunks = [torch.stack([per_frame[g * step + t, :, :, t] for t in range(step)], dim=2)
                      for g in range(len(frames) // step)]  # fmt: skip
            patches.append(torch.cat(chunks).flatten(1))
            _, h, w = out["image_grid_thw"][0].tolist()
            grids.append([len(frames) // step, h, w])
            metadata.append(VideoMetadata(total_num_frames=len(frames), fps=self.FPS,
                                          frames_indices=list(range(len(frames)))))  # fmt: skip
        data = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}
        return BatchFeature({**data, "video_metadata": metadata})


class _TorchvisionFreeQwenProcessor:
    """Mixin: a Qwen processor without a stock video processor (which would need torchvision); videos go through
    TinyQwenVideoProcessor.

    ProcessorMixin derives the sub-processor list from this __init__ signature, so saving and loading handle
    (image_processor, tokenizer) only. Token attributes are set as the stock __init__ sets them.
    """

    @property
    def video_processor(self) -> TinyQwenVideoProcessor:
        return TinyQwenVideoProcessor(self.image_processor)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        for name in ("image", "video", "vision_start", "vision_end"):
            token = getattr(tokenizer, f"{name}_token", None) or _QWEN_SPECIALS[f"{name}_token"]
            setattr(self, f"{name}_token", token)
            setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class TinyQwen2VLProcessor(_TorchvisionFreeQwenProcessor, Qwen2VLProcessor):
    """Qwen2VLProcessor with TinyQwenVideoProcessor for videos."""


class TinyQwen2_5_VLProcessor(_TorchvisionFreeQwenProcessor, Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor with TinyQwenVideoProcessor for videos."""


class TinyQwen3VLProcessor(_TorchvisionFreeQwenProcessor, Qwen3VLProcessor):
    """Qwen3VLProcessor with TinyQwenVideoProcessor for videos."""


_TINY_QWEN_PROCESSORS = {
    "qwen2_vl": TinyQwen2VLProcessor,
    "qwen2_5_vl": TinyQwen2_5_VLProcessor,
    "qwen3_vl": TinyQwen3VLProcessor,
}

# AutoProcessor finds a processor_class that is not part of transformers only among registered processors, and
# registration is keyed by a config class. These keys are never used as model configs; a private key (rather than
# Qwen2VLConfig) leaves the processor resolution of real Qwen checkpoints untouched.
for _family, _processor_cls in _TINY_QWEN_PROCESSORS.items():
    _key = type(f"_{_processor_cls.__name__}Key", (PreTrainedConfig,), {"model_type": f"vlm_efficient_tiny_{_family}"})
    AutoProcessor.register(_key, _processor_cls, exist_ok=True)
del _family, _processor_cls, _key


def _check_family(family: str) -> None:
    if family not in FAMILIES + NEW_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + NEW_FAMILIES}")


def _llava_parts(family: str, tok, num_layers: int):
    text = LlamaConfig(
        **_TEXT,
        head_dim=16,
        num_hidden_layers=num_layers,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    side = 56 if family == "llava" else 28  # 4x4 or 2x2 patches of 14 per (tile) image
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=side,
        patch_size=14,
        projection_dim=32,
    )
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.image_token_id,
        vision_feature_select_strategy="default",  # drops CLS; the processor's num_additional_image_tokens=1 matches
        vision_feature_layer=-2,
    )
    image_kw = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    proc_kw = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava":
        config = LlavaConfig(**common, image_seq_length=16)
        processor = LlavaProcessor(CLIPImageProcessor(**image_kw), tok, **proc_kw)
        return LlavaForConditionalGeneration, config, processor
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]  # (height, width) of the high-res canvas
    config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints, image_seq_length=4)
    processor = LlavaNextProcessor(LlavaNextImageProcessor(**image_kw, image_grid_pinpoints=pinpoints), tok, **proc_kw)
    return LlavaNextForConditionalGeneration, config, processor


class TinyFrameVideoProcessor:
    """LLaVA-OneVision's video preprocessing without torchvision: every frame resized to the tower's square input and
    normalised by an image processor; pixel_values_videos [videos, frames, 3, H, W] (clips of one batch have the same
    number of frames)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        clips = [self.image_processor(list(frames), return_tensors="pt")["pixel_values"] for frames in videos]
        return BatchFeature({"pixel_values_videos": torch.stack(clips)})


class TinyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor with TinyFrameVideoProcessor for videos (the stock video processor needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, vision_aspect_ratio="anyres_max_9",
                 **kwargs):  # fmt: skip
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_aspect_ratio = vision_aspect_ratio
        for name in ("image", "video"):
            token = getattr(tokenizer, f"{name}_token")
            setattr(self, f"{name}_token", token)
            setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    @property
    def video_processor(self) -> TinyFrameVideoProcessor:
        size = self.image_processor.size
        return TinyFrameVideoProcessor(SiglipImageProcessor(
            size={"height": size["height"], "width": size["width"]}, image_mean=self.image_processor.image_mean,
            image_std=self.image_processor.image_std,
        ))  # fmt: skip


def _onevision_parts(tok, num_layers: int):
    """SigLIP tower (no [CLS]: strategy full) 4x4 patches per 56 px tile, Qwen2 decoder; anyres tiles up to 2x2."""
    text = Qwen2Config(**_TEXT, num_hidden_layers=num_layers, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    side = 56
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=side, patch_size=14)  # fmt: skip
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
    )  # fmt: skip
    image_processor = LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_grid_pinpoints=pinpoints)
    processor = TinyLlavaOnevisionProcessor(image_processor, tok, num_image_tokens=16,
                                            vision_feature_select_strategy="full")  # fmt: skip
    return LlavaOnevisionForConditionalGeneration, config, processor


def _gemma3_parts(tok, num_layers: int):
    """SigLIP tower 4x4 patches at 56 px, average-pooled to 2x2 = 4 tokens per image; a Gemma3 decoder whose layers
    alternate sliding-window (a window of 8 tokens, shorter than the prompts) and full attention."""
    text = Gemma3TextConfig(
        **{**_TEXT, "initializer_range": 0.2}, head_dim=16, num_hidden_layers=num_layers, vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
    )  # fmt: skip
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14)  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=tok.image_token_id,
        boi_token_id=tok.boi_token_id, eoi_token_id=tok.eoi_token_id,
    )  # fmt: skip
    image_processor = Gemma3ImageProcessor(size={"height": 56, "width": 56}, do_pan_and_scan=False)
    return Gemma3ForConditionalGeneration, config, Gemma3Processor(image_processor, tok, image_seq_length=4)


def _idefics3_parts(tok, num_layers: int):
    """Idefics3 (SmolVLM's architecture): a SigLIP-style tower, 4x4 patches per 56 px tile, pixel-shuffled 2x2 into 4
    tokens per tile; a 112 px image is split into 2x2 tiles plus the global image (20 tokens); Llama decoder."""
    # the PIL class by name: transformers 5.17's Idefics3ImageProcessor needs torchvision (no PIL fallback yet)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})
    processor = Idefics3Processor(image_processor, tok, image_seq_len=4)  # adds its special tokens to tok
    text = LlamaConfig(**_TEXT, head_dim=16, num_hidden_layers=num_layers, vocab_size=len(tok),
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14)  # fmt: skip
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=processor.image_token_id)  # fmt: skip
    return Idefics3ForConditionalGeneration, config, processor


def _qwen_parts(family: str, tok, num_layers: int):
    patch = 16 if family == "qwen3_vl" else 14
    factor = 2 * patch  # smart_resize rounds sides to patch * merge_size
    text = dict(
        **_TEXT,
        num_hidden_layers=num_layers,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _MROPE_SECTION},
    )
    vision = dict(depth=2, num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        cls, config_cls = Qwen2VLForConditionalGeneration, Qwen2VLConfig
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=64)  # hidden_size = merger output = text hidden
    elif family == "qwen2_5_vl":
        cls, config_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig
        # window 56 px = 2x2 merged tokens: a 4x4 merged grid gives 4 windows; block 1 uses full attention.
        vision.update(
            hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1]
        )
    else:
        cls, config_cls = Qwen3VLForConditionalGeneration, Qwen3VLConfig
        text.update(head_dim=16)
        text["rope_parameters"]["mrope_interleaved"] = True
        # 8x8 learned position grid (interpolated to the image grid); deepstack features from vision blocks 0 and 1
        # are added to the outputs of LLM layers 0 and 1.
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        )
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.image_token_id,
        video_token_id=tok.video_token_id,
        vision_start_token_id=tok.vision_start_token_id,
        vision_end_token_id=tok.vision_end_token_id,
    )
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": factor * factor, "longest_edge": (4 * factor) ** 2},  # 1 to 64 tokens per image
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
    )
    return cls, config, _TINY_QWEN_PROCESSORS[family](image_processor, tok)


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    num_layers: int = 4,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A random-weight <Family>ForConditionalGeneration in eval mode + its processor.

    Same seed -> bitwise identical weights (for any attn_implementation). The global torch RNG is left untouched.
    """
    _check_family(family)
    tok = tiny_tokenizer(family)
    if family == "llava_onevision":
        model_cls, config, processor = _onevision_parts(tok, num_layers)
    elif family == "gemma3":
        model_cls, config, processor = _gemma3_parts(tok, num_layers)
    elif family == "idefics3":
        model_cls, config, processor = _idefics3_parts(tok, num_layers)
    else:
        parts = _llava_parts if family.startswith("llava") else _qwen_parts
        model_cls, config, processor = parts(family, tok, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.set_attn_implementation(attn_implementation)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    # A trained VLM never emits its image/video placeholders; a random one would, and a generated placeholder then
    # reads as an image position to anything that scans the output ids.
    gen.suppress_tokens = [config.image_token_id] + ([config.video_token_id] if family in VIDEO_FAMILIES else [])
    return model.to(dtype).eval(), processor


def tiny_image(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """Deterministic RGB of `size` (width, height; default DEFAULT_IMAGE_SIZE): 8x8 random colour blocks + noise."""
    width, height = size or DEFAULT_IMAGE_SIZE
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(blocks).resize((width, height), Image.NEAREST), dtype=np.int16)
    noise = rng.integers(-24, 25, size=image.shape, dtype=np.int16)
    return Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8))


def tiny_video(seed: int, frames: int = 4, size: tuple[int, int] | None = None, step: int = 8) -> list[Image.Image]:
    """A clip of `frames` frames of `size` (default DEFAULT_IMAGE_SIZE) panning right `step` pixels per frame over
    one random picture: adjacent frames share most of their content, as in a real video."""
    width, height = size or DEFAULT_IMAGE_SIZE
    scene = tiny_image(seed, (width + step * (frames - 1), height))
    return [scene.crop((k * step, 0, k * step + width, height)) for k in range(frames)]


def video_placeholder(processor) -> str:
    """The prompt text for ONE video: '<|vision_start|><|video_pad|><|vision_end|>' for Qwen, '<video>' for LLaVA-OneVision."""
    return image_placeholder(processor).replace(processor.image_token, processor.video_token)


def image_placeholder(processor) -> str:
    """The prompt text for ONE image: '<image>' for llava; '<|vision_start|><|image_pad|><|vision_end|>' for Qwen.

    Works for the real processors too (real Qwen tokenizers may not expose vision_start_token).
    """
    image_token = processor.image_token
    if image_token != _QWEN_SPECIALS["image_token"]:
        return image_token
    tok = processor.tokenizer
    start = getattr(tok, "vision_start_token", None) or _QWEN_SPECIALS["vision_start_token"]
    end = getattr(tok, "vision_end_token", None) or _QWEN_SPECIALS["vision_end_token"]
    return f"{start}{image_token}{end}"


def tiny_batch(
    processor,
    samples: list[tuple[str, list[Image.Image]]],
    *,
    padding_side: str = "left",
    videos: list[list[list[Image.Image]]] | None = None,
) -> BatchFeature:
    """Run the processor on (prompt, images) samples; each prompt holds one image_placeholder per image and, with
    `videos` (per sample, its clips), one video_placeholder per clip.

    Returns the processor's tensors (input_ids, attention_mask, pixel_values, image_sizes or image_grid_thw,
    pixel_values_videos and video_grid_thw with videos, mm_token_type_ids for Qwen), padded on padding_side.
    """
    texts = [text for text, _ in samples]
    images = [image for _, sample_images in samples for image in sample_images]
    if images:  # per sample (LLaVA-OneVision tiles a prompt's single image only; Gemma3 checks counts per prompt)
        images = [sample_images for _, sample_images in samples]
    clips = [clip for sample_clips in videos or [] for clip in sample_clips]
    return processor(
        text=texts, images=images or None, videos=clips or None, padding=True, padding_side=padding_side,
        return_tensors="pt",
    )  # fmt: skip


def save_tiny(family: str, path: str | os.PathLike, **kw) -> None:
    """save_pretrained of tiny_model(family, **kw) and its processor into `path`.

    Load with AutoModelForImageTextToText / AutoProcessor.from_pretrained(path); for Qwen families this module must
    be imported first (see the module docstring).
    """
    model, processor = tiny_model(family, **kw)
    model.save_pretrained(path)
    processor.save_pretrained(path)
