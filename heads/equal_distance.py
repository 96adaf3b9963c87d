"""Vista-LLaMA equal-distance-to-visual-tokens (EDVT) attention (Ma, Jin, Wang, Xian, Feng, Yang, CVPR 2024,
"Vista-LLaMA: Reducing Hallucination in Video Language Models via Equal Distance to Visual Tokens", arXiv
2312.08870; code github.com/Flowerfan/VistaLLaMA): the attention logit between a visual and a text token is the dot
product of the query and key WITHOUT rotary position (q . k * scaling), so every text token, however far it is from
the visual tokens, sits at the same distance from all of them; text-text pairs keep RoPE.

Paper (abstract): it "omits relative position encoding when determining attention weights between visual and text
tokens, retaining the position encoding for text and text tokens". `variant=paper` (default): the pairs of one visual
and one text token, either way round (a text row reading an image key; an image row reading an earlier text key,
e.g. the system prompt); image-image and text-text pairs keep RoPE.
Public code (vista_llama/model/llama.py, LlamaAttention.forward): a `visual_mask` over the KEYS, recomputed from
input_ids at every step, in every layer; for every query row the logit is mask * q k^T + (1 - mask) * R(q) R(k)^T:
every pair whose key is visual is unrotated (image-image pairs too), and an image row reading a text key keeps RoPE.
It caches the unrotated keys beside the rotated ones (past_key_value = (k, R(k), v)). `variant=code` reproduces it.

Not in scope: the paper's sequential visual projector (a Q-Former that chains video frames: trained weights), and
the training: Vista-LLaMA trains with EDVT; training-free, on a model trained with RoPE everywhere, it changes the
logits the model was trained on: measure it.

How it runs: the engine captures the pre-rotary query and key of the chosen layers (hooks on the adapter's modules:
q_proj / k_proj, or Qwen3's q_norm / k_norm, which act before RoPE; M-RoPE needs nothing more: pre-rotary vectors
carry no position at all) and computes the marked pairs' logits from them (AttentionEdit.unrotated), in a dense fp32
attention. Decoding: decode rows are text and the image keys sit in the cache, rotated; the engine keeps each chosen
layer's pre-rotary prompt keys from the prefill, for the rows that layer caches (so a pruning method composed with
this one stays aligned): an extra copy of the prompt's keys in those layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_efficient.method import AttentionEdit, Method, refuse_layers_with_own_mask
from vlm_efficient.registry import register_method

from .common import has_image, parse_layers

VARIANTS = ("paper", "code")


@register_method
@dataclass
class EqualDistance(Method):
    name = "equal_distance"
    summary = "Vista-LLaMA: visual-text attention logits without rotary position (text-text keeps RoPE)"

    layers: str = ""  # default: all (the paper's and the code's)
    variant: str = "paper"

    def bind(self, engine) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"equal_distance: variant={self.variant!r}: use paper (visual-text pairs) or code (every visual key)"
            )
        self.chosen = parse_layers("equal_distance", self.layers, engine.num_layers, range(engine.num_layers))
        refuse_layers_with_own_mask("equal_distance", engine, self.chosen,
                                    "the pre-rotary keys kept for decoding follow a full causal cache")  # fmt: skip
        for layer in self.chosen:
            try:
                engine.adapter.pre_rotary_modules(engine.layers[layer].self_attn)
            except AttributeError as error:
                raise ValueError(
                    f"equal_distance: layer {layer}'s attention has no module giving the query and key before "
                    f"rotary position ({error}); its adapter must name them (ModelAdapter.pre_rotary_modules)"
                ) from None

    def uses_unrotated(self, layer: int) -> bool:
        return layer in self.chosen

    def attention_edit(self, layer, run, context):
        if layer not in self.chosen or not has_image(run):
            return None
        layout = run.layout
        key_visual = context.keys_where(layout.visual)[:, None, :]
        if self.variant == "code":
            pairs = key_visual.expand(-1, context.query_positions.shape[1], -1)
        else:
            generated = run.prompt_length  # generated tokens are text
            query_text = context.queries_where(layout.text) | (context.query_positions >= generated)
            key_text = context.keys_where(layout.text) | (context.key_positions >= generated)
            query_visual = context.queries_where(layout.visual)
            pairs = (query_text[:, :, None] & key_visual) | (query_visual[:, :, None] & key_text[:, None, :])
        return AttentionEdit(unrotated=pairs[:, None])
