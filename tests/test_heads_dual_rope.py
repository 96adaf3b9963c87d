"""TC-LLaVA's temporal-aware dual RoPE (dual_rope) on the families with a 1-D rotary position: generate() with the
KV cache on a left-padded batch (the second prompt's two images: two frames of one clip) against the dense
cache-free reference, whose temporal term is written out from input_ids and the layer's pre-rotary q / k as complex
rotations, exp(i (t_i - t_j) theta); the refusal on Qwen's M-RoPE; composition with frame_causal."""

from __future__ import annotations

import pytest
import torch

import vlm_efficient as ve
from test_heads_dense import Prompt, assert_matches, live_hidden, reference_logits, run_wrapped
from test_heads_masks import later, pairs
from test_heads_frame_causal import same_run
from vlm_efficient.testing import tiny_model

LAYERS = 4
ROTARY_1D = ["llava", "llava_next", "llava_onevision", "gemma3"]


def frame_index(p) -> torch.Tensor:
    """[B, T] the index of each visual token's image (contiguous run of image tokens) in its sample, -1 elsewhere."""
    start = p.visual & ~torch.nn.functional.pad(p.visual, (1, 0))[:, :-1]
    return torch.where(p.visual, start.long().cumsum(1) - 1, -1)


def pre_rotary(model, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's query and key before rotary position, [B, H, T, d] (keys repeated over their query heads)."""
    decoder = ve.get_adapter(model).decoder_layers(model)[layer]
    attention = decoder.self_attn
    x = decoder.input_layernorm(hidden)
    q = attention.q_proj(x).unflatten(-1, (-1, attention.head_dim))
    k = attention.k_proj(x).unflatten(-1, (-1, attention.head_dim))
    if hasattr(attention, "q_norm"):  # Gemma3 normalises each head's q and k before rotary
        q, k = attention.q_norm(q), attention.k_norm(k)
    q, k = q.transpose(1, 2).double(), k.transpose(1, 2).double()
    return q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


def inverse_frequencies(model, layer: int) -> torch.Tensor:
    rotary = ve.get_adapter(model).text_model(model).rotary_emb
    layer_types = getattr(ve.get_adapter(model).text_config(model), "layer_types", None)
    if hasattr(rotary, "inv_freq"):
        return rotary.inv_freq.double()
    return getattr(rotary, f"{layer_types[layer]}_inv_freq").double()


def temporal_logits(model, layer: int, frames: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma * s * Re sum_c q_c conj(k_c) exp(i (t_q - t_k) theta_c) for the pairs of visual tokens [B, H, T, T]."""
    q, k = pre_rotary(model, layer, live_hidden(layer))
    half = q.shape[-1] // 2
    zq, zk = torch.complex(q[..., :half], q[..., half:]), torch.complex(k[..., :half], k[..., half:])
    theta = inverse_frequencies(model, layer)
    t = frames.clamp(min=0).double()
    phase = torch.exp(1j * (t[:, :, None, None] - t[:, None, :, None]) * theta)  # [B, T, T, d/2]
    term = torch.einsum("bhic,bhjc,bijc->bhij", zq, zk.conj(), phase).real
    scaling = ve.get_adapter(model).decoder_layers(model)[layer].self_attn.scaling
    both = (frames[:, :, None] >= 0) & (frames[:, None, :] >= 0)
    return gamma * scaling * term * both[:, None]


@pytest.mark.parametrize("family", ROTARY_1D)
def test_dual_rope_matches_the_written_out_rule(family):
    gamma = 0.7
    model, batch, out, plain, run, _ = run_wrapped(family, f"dual_rope:gamma={gamma}")
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    frames = frame_index(p)
    assert frames.amax() == 1  # the second prompt holds two frames
    logits = {layer: (lambda scores, layer=layer: scores + temporal_logits(model, layer, frames, gamma))
              for layer in range(LAYERS)}  # fmt: skip
    reference, _ = reference_logits(model, batch, out, logits=logits)
    assert_matches(out, reference, plain)


def test_dual_rope_with_frame_causal_and_chosen_layers():
    family, gamma, layers = "llava", 1.0, (1, 2)
    model, batch, out, plain, run, _ = run_wrapped(family, "frame_causal+dual_rope:layers=1-2")
    p = Prompt(model, batch, out.sequences.shape[1] - 1)
    frames = frame_index(p)
    logits = {layer: (lambda scores, layer=layer: scores + temporal_logits(model, layer, frames, gamma))
              for layer in layers}  # fmt: skip
    allow = pairs(p.visual, p.visual) & same_run(p) & later(p)
    reference, _ = reference_logits(model, batch, out, logits=logits, allow={layer: allow for layer in range(LAYERS)})
    assert_matches(out, reference, plain)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_refused_on_m_rope(family):
    model, _ = tiny_model(family)
    with pytest.raises(ValueError, match="M-RoPE is 3-D.*frame_causal"):
        ve.wrap(model, "dual_rope")
    assert not ve.is_wrapped(model)


@pytest.mark.parametrize("spec", ["dual_rope:gamma=0", "dual_rope:layers=9"])
def test_bad_parameters(spec):
    model, _ = tiny_model("llava")
    with pytest.raises(ValueError, match="dual_rope"):
        ve.wrap(model, spec)
