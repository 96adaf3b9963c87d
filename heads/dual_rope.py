"""Temporal-aware dual RoPE (TC-LLaVA: Gao et al., 2024, "TC-LLaVA: Rethinking the Transfer from Image to Video
Understanding with Temporal Considerations", arXiv 2409.03206): the model's own rotary position stays as it is (every
token keeps its global position id, so text and visual tokens keep their relative positions), and a second rotary
position on TEMPORAL ids, shared by the visual tokens of one frame, adds the frames' order to the attention between
visual tokens.

Source: the paper's description (abstract and method overview); no code by the authors was found public (GitHub's
index searched for TC-LLaVA / dual RoPE, 2026-12). Its exact combination of the two rotations and its weight could not
be checked against the paper's equation here, so this is the reading that keeps both relative structures exact: for
a query row i and key j that are visual tokens of one clip,
    logit(i, j) = s * R(m_i) q_i . R(m_j) k_j  +  gamma * s * R(t_i) q_i . R(t_j) k_j
with m the global positions (the model's own term, unchanged), t the temporal ids (the frame index: a video's
temporal index, `layout.frame`; for images, each image of a sample is one frame of one clip, as frame_causal takes
them), s the layer's scaling, R the layer's own 1-D rotary tables; both terms depend on differences only
(m_j - m_i, t_j - t_i). Every other pair (text rows, text keys) keeps the model's logit, so generated rows (text)
are unchanged and the edit is a prefill edit. TC-LLaVA trains with it (with the frame-wise block-causal mask,
`frame_causal`: compose them as `frame_causal+dual_rope`); training-free it changes what the model was trained on:
measure it.

Families: those with a 1-D rotary position (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Idefics3, Gemma3 with each layer
type's own base). Qwen2-VL / 2.5-VL / 3-VL are refused: their M-RoPE is 3-D, its time axis already on its own
channels (a video token's position is (frame, row, col)), so there is no 1-D position to add a second one to.

How it runs: forward hooks on the chosen layers' pre-rotary modules (ModelAdapter.pre_rotary_modules) keep the
prefill's query and key; the temporal term is an additive logit (AttentionEdit.logit_bias) on the dense path.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from vlm_efficient.layout import IMAGE, VIDEO
from vlm_efficient.method import UNSTRUCTURED, AttentionEdit, Method, at_positions
from vlm_efficient.registry import register_method

from .common import has_image, parse_layers

OUTSIDE = -1  # clip id of tokens in no clip (text, padding, a video's newline outside every frame)
IMAGES = -2  # clip id of a sample's images (its frames, in prompt order)


def temporal_ids(layout) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, N] temporal id, [B, N] clip id): a video token's frame index within its video (clip = the video's index),
    an image token's image index within its sample (clip = IMAGES); OUTSIDE elsewhere."""
    video = (layout.kind == VIDEO) & (layout.frame >= 0)
    image = layout.kind == IMAGE
    temporal = torch.where(video, layout.frame, torch.where(image, layout.image_index, OUTSIDE))
    clip = torch.where(video, layout.image_index, torch.where(image, IMAGES, OUTSIDE))
    return temporal, clip


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, d] rotated by (cos, sin) [B, n, d]: HF's rotate-half convention, as the families' attention does."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated_half * sin[:, None]


@register_method
@dataclass
class DualRope(Method):
    name = "dual_rope"
    summary = "video: visual pairs also get a rotary term on frame indices (TC-LLaVA's temporal-aware dual RoPE)"

    gamma: float = 1.0  # weight of the temporal term
    layers: str = ""  # default: all layers

    def bind(self, engine) -> None:
        if not self.gamma > 0:
            raise ValueError(f"dual_rope: gamma={self.gamma} must be > 0 (the temporal term's weight, 1: the global's)")
        self.chosen = parse_layers("dual_rope", self.layers, engine.num_layers, range(engine.num_layers))
        probe = torch.zeros(1, 1, 1)
        try:
            engine.adapter.rotary_tables(engine.model, self.chosen[0], probe, torch.zeros(1, 1, dtype=torch.long))
        except ValueError as error:
            raise ValueError(f"dual_rope: {error}; use frame_causal alone on this family") from None
        self._engine_ref = engine_ref = weakref.ref(engine)
        self.attention = {}
        for layer in self.chosen:
            attention = engine.layers[layer].self_attn
            try:
                modules = engine.adapter.pre_rotary_modules(attention)
            except AttributeError as error:
                raise ValueError(
                    f"dual_rope: layer {layer}'s attention has no module giving the query and key before rotary "
                    f"position ({error}); its adapter must name them (ModelAdapter.pre_rotary_modules)"
                ) from None
            self.attention[layer] = attention
            for part, module in zip("qk", modules):
                engine.add_handle(module.register_forward_hook(self._capture(layer, part, engine_ref)))

    def _capture(self, layer: int, part: str, engine_ref):
        def hook(module, args, output):
            engine = engine_ref()
            run = engine.run if engine is not None else None
            if run is not None and run.prefill:
                run.memory(self).setdefault(layer, {})[part] = output

        return hook

    def attention_edit(self, layer, run, context):
        if not context.prefill or layer not in self.chosen or not has_image(run):
            return None
        memory = run.memory(self)
        captured = memory.pop(layer)
        if "ids" not in memory:
            memory["ids"] = temporal_ids(run.layout)
        temporal, clip = memory["ids"]
        attention, engine = self.attention[layer], self._engine_ref()
        rows, keys = context.query_positions.shape[1], context.key_positions.shape[1]
        q = engine.adapter.pre_rotary_heads(captured["q"], rows, attention.head_dim).float()
        k = engine.adapter.pre_rotary_heads(captured["k"], rows, attention.head_dim).float()
        if k.shape[2] != keys:
            raise ValueError(f"dual_rope: layer {layer}'s prefill of {rows} rows attends to {keys} keys: feed the "
                             "prompt in one call, on an empty cache")  # fmt: skip
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # each query head reads its KV group's key
        t_q = at_positions(temporal, context.query_positions, OUTSIDE).to(q.device)
        t_k = at_positions(temporal, context.key_positions, OUTSIDE).to(q.device)
        q = rotate(q, *engine.adapter.rotary_tables(engine.model, layer, q, t_q.clamp(min=0)))
        k = rotate(k, *engine.adapter.rotary_tables(engine.model, layer, k, t_k.clamp(min=0)))
        c_q = at_positions(clip, context.query_positions, OUTSIDE).to(q.device)
        c_k = at_positions(clip, context.key_positions, OUTSIDE).to(q.device)
        same_clip = (c_q[:, :, None] == c_k[:, None, :]) & (c_q[:, :, None] != OUTSIDE)
        temporal_logits = (q @ k.transpose(-1, -2)) * (self.gamma * attention.scaling)
        return AttentionEdit(logit_bias=temporal_logits * same_clip[:, None])

    def kernel_edit(self, layer, run, prefill):
        # decoding rows are generated text: nothing changes there; the prefill's term is dense (pair logits)
        if not prefill or layer not in self.chosen or not has_image(run):
            return None
        return UNSTRUCTURED
