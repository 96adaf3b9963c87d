"""Random-weight models with the shapes of real 7B VLMs, for speed work without checkpoints.

    model, processor = build_arch("qwen2-vl-7b", device="cuda", dtype=torch.bfloat16, layers=None)

The model is built on the `meta` device (no memory, no time) and then materialised on the target device and
initialised there (`initialize_weights`, which also fills the rotary tables). The processors are the real image
processors with the real settings; the tokenizer is the small offline one of `vlm_efficient.testing` (its ids fit in
any vocabulary), so the prompt text is short and the image tokens are exactly as many as with the real model.
`layers` overrides the decoder and vision depths (e.g. 2 for a CPU smoke test).
"""

from __future__ import annotations

import torch

# (text depth, vision depth) of each architecture
_LLAVA_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                   vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip
_CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14,
                  projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_QWEN_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                  vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})  # fmt: skip


def _llava(next_: bool, layers):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor)  # fmt: skip

    from vlm_efficient.testing import tiny_tokenizer

    tok = tiny_tokenizer("llava")
    text = LlamaConfig(**_LLAVA_TEXT, num_hidden_layers=layers or 32, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = CLIPVisionConfig(**_CLIP_L336, num_hidden_layers=layers or 24)
    common = dict(vision_config=vision, text_config=text, image_token_id=tok.image_token_id, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=576)  # fmt: skip
    image_kw = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    proc_kw = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if not next_:
        processor = LlavaProcessor(CLIPImageProcessor(**image_kw), tok, **proc_kw)
        return LlavaForConditionalGeneration, LlavaConfig(**common), processor
    image_processor = LlavaNextImageProcessor(**image_kw, image_grid_pinpoints=_NEXT_PINPOINTS)
    config = LlavaNextConfig(**common, image_grid_pinpoints=_NEXT_PINPOINTS)
    return LlavaNextForConditionalGeneration, config, LlavaNextProcessor(image_processor, tok, **proc_kw)


def _qwen(v25: bool, layers):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor)  # fmt: skip

    from vlm_efficient.testing import TinyQwen2_5_VLProcessor, TinyQwen2VLProcessor, tiny_tokenizer

    family = "qwen2_5_vl" if v25 else "qwen2_vl"
    tok = tiny_tokenizer(family)
    text = dict(**_QWEN_TEXT, num_hidden_layers=layers or 28, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(depth=layers or 32, num_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if v25:
        vision.update(hidden_size=1280, intermediate_size=3420, out_hidden_size=3584, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")  # fmt: skip
        cls, config_cls, proc_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, TinyQwen2_5_VLProcessor
    else:
        vision.update(embed_dim=1280, hidden_size=3584, mlp_ratio=4)
        cls, config_cls, proc_cls = Qwen2VLForConditionalGeneration, Qwen2VLConfig, TinyQwen2VLProcessor
    config = config_cls(text_config=text, vision_config=vision, image_token_id=tok.image_token_id,
                        video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_token_id,
                        vision_end_token_id=tok.vision_end_token_id)  # fmt: skip
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                                            patch_size=14, temporal_patch_size=2, merge_size=2)  # fmt: skip
    return cls, config, proc_cls(image_processor, tok)


_GEMMA3_4B_TEXT = dict(hidden_size=2560, intermediate_size=10240, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=256, vocab_size=262208, max_position_embeddings=131072, rms_norm_eps=1e-6,
                       sliding_window=1024, query_pre_attn_scalar=256,
                       rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                           "rope_theta": 1000000.0}})  # fmt: skip


def _gemma3(layers):
    """Gemma3-4B: five sliding-window layers (1,024 tokens) to one full layer, head_dim 256; SigLIP at 896 px pooled to
    256 tokens per image."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)  # fmt: skip

    from vlm_efficient.testing import tiny_tokenizer

    tok = tiny_tokenizer("gemma3")
    depth = layers or 34
    text = Gemma3TextConfig(**_GEMMA3_4B_TEXT, num_hidden_layers=depth, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                         for i in range(depth)])  # fmt: skip
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers or 27,
                                num_attention_heads=16, image_size=896, patch_size=14)  # fmt: skip
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                          image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id,
                          eoi_token_id=tok.eoi_token_id)  # fmt: skip
    image_processor = Gemma3ImageProcessor(size={"height": 896, "width": 896}, do_pan_and_scan=False)
    return Gemma3ForConditionalGeneration, config, Gemma3Processor(image_processor, tok, image_seq_length=256)


ARCHS = {
    "llava-1.5-7b": lambda layers: _llava(False, layers),
    "llava-next-7b": lambda layers: _llava(True, layers),
    "qwen2-vl-7b": lambda layers: _qwen(False, layers),
    "qwen2.5-vl-7b": lambda layers: _qwen(True, layers),
    "gemma3-4b": _gemma3,
}
# Image side giving 576 LLM image tokens (LLaVA-1.5's count) where the resolution is free; LLaVA-NeXT at 672 px
# uses its 2x2 high-resolution grid.
DEFAULT_IMAGE_SIZE = {"llava-1.5-7b": 336, "llava-next-7b": 672, "qwen2-vl-7b": 672, "qwen2.5-vl-7b": 672,
                      "gemma3-4b": 896}


def arch_on_meta(name: str, layers: int | None = None, dtype: torch.dtype = torch.bfloat16, configure=None):
    """(model on the meta device, processor): shapes and parameter counts, no memory. `configure(config, processor)`
    may edit both before the model is built (evals/host_overhead.py narrows the widths)."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")
    if layers is not None and layers < 1:
        raise ValueError("--layers must be at least 1")
    cls, config, processor = ARCHS[name](layers)
    if configure is not None:
        configure(config, processor)
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    return model, processor


def build_arch(name: str, device="cpu", dtype: torch.dtype = torch.bfloat16, layers: int | None = None, seed: int = 0,
               configure=None):  # fmt: skip
    """A random-weight model of architecture `name` materialised on `device`, in eval mode, + its processor."""
    model, processor = arch_on_meta(name, layers, dtype, configure)
    model.to_empty(device=device)
    for module in model.modules():  # set by the meta construction: initialise everything now
        module.__dict__.pop("_is_hf_initialized", None)
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.__dict__.pop("_is_hf_initialized", None)
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        model.initialize_weights()
    model.tie_weights()
    model.set_attn_implementation("sdpa")
    tok = processor.tokenizer
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model.eval(), processor
