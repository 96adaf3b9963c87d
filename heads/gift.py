"""GIFT (Qi et al., 2025, "Gaze Shift-Guided Cross-modal Fusion Enhancement for Vision-Language Models").

Prefill: a holistic saliency map over the image tokens from "gaze shifts", the positive changes of visual attention
between consecutive query rows, max(A_i - A_{i-1}, 0) summed over the question rows, in the top 50% heads by visual
attention of layer 11 (LLaVA-1.5-7B; scaled to depth), clipped at mean + 3 std and min-max normalised to S in [0, 1].
Decoding, layers 12..22 (scaled), per row the top 50% heads by visual attention: image attention A_j -> A_j exp(alpha
S_j), alpha = 5; the question's attention is scaled by beta * r, r = (boosted visual attention) / (visual attention),
so the question keeps its share against the image; the row is renormalised.

No public code was found; these are the paper's definitions as REFERENCE.md gives them, with three readings of ours:
the question rows are the text after the last image (the "informative query words" need a tokenizer's stop list:
not applied); beta = 1 (keep the question:image balance); the boost also applies to the last prompt row, which
predicts the first generated token. The saliency is read from the layer's own attention (an observing post-softmax
edit that changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.method import UNSTRUCTURED, AttentionEdit, Method, at_positions

from .common import check_range, has_image, last_prompt_rows, parse_layers, scaled_range, scatter_positions


def gaze_shift_saliency(probs: torch.Tensor, question: torch.Tensor, image: torch.Tensor, head_ratio: float):
    """Saliency [n_image] of one sample from its attention probs [H, q, kv], question rows [q] and image keys [kv]."""
    attention = probs[:, question][:, :, image]  # [H, nq, ni]
    if attention.shape[1] < 2:
        return attention.new_zeros(attention.shape[2])
    heads = max(1, int(probs.shape[0] * head_ratio + 0.5))
    top = attention.sum(-1).mean(-1).topk(heads).indices
    shifts = (attention[top, 1:] - attention[top, :-1]).clamp(min=0).sum((0, 1))
    shifts = shifts.clamp(max=float(shifts.mean() + 3 * shifts.std(correction=0)))
    low, high = shifts.min(), shifts.max()
    return (shifts - low) / (high - low) if high > low else torch.zeros_like(shifts)


def top_heads(mass: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, H, q] -> boolean of the top `ratio` heads per (sample, row) by `mass`."""
    count = max(1, int(mass.shape[1] * ratio + 0.5))
    rank = mass.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return rank < count


@dataclass
class GIFT(Method):
    name = "gift"
    summary = "saliency from gaze shifts at prefill; boost salient image and question attention while decoding"

    alpha: float = 5.0
    beta: float = 1.0
    head_ratio: float = 0.5
    saliency_layer: int = -1  # default 11 of 32, scaled
    layers: str = ""  # default 12..22 of 32, scaled

    def bind(self, engine) -> None:
        check_range("gift", "head_ratio", self.head_ratio, 0.0, 1.0)
        if self.beta <= 0:
            raise ValueError(f"gift: beta={self.beta} must be > 0")
        n = engine.num_layers
        self.source = int(11 * n / 32 + 0.5) if self.saliency_layer < 0 else self.saliency_layer
        boosted = scaled_range(12, 22, n)
        if self.saliency_layer < 0:  # scaled, the paper's 11 / 12 may round to one layer: boost the later ones
            boosted = range(max(boosted.start, self.source + 1), max(boosted.stop, self.source + 2))
        self.chosen = parse_layers("gift", self.layers, n, boosted)
        if not 0 <= self.source < min(self.chosen):
            raise ValueError(
                f"gift: saliency_layer={self.source} must come before the boosted layers {self.chosen[0]}.."
            )

    def attention_edit(self, layer, run, context):
        memory = run.memory(self)
        if context.prefill and layer == self.source and has_image(run):
            return AttentionEdit(post_softmax=lambda probs: self._observe(probs, run, context))
        saliency = memory.get("saliency")
        if layer not in self.chosen or saliency is None:
            return None
        image = context.keys_where(run.layout.visual)[:, None, None, :]
        question = context.keys_where(run.layout.after_visual_text)[:, None, None, :]
        boost = torch.exp(self.alpha * at_positions(saliency, context.key_positions, 0.0))[:, None, None, :]

        def post_softmax(probs):
            visual = (probs * image).sum(-1, keepdim=True)
            boosted = torch.where(image, probs * boost, probs)
            ratio = torch.where(visual > 0, (boosted * image).sum(-1, keepdim=True) / visual.clamp_min(1e-30), 1.0)
            boosted = torch.where(question, boosted * self.beta * ratio, boosted)
            boosted = boosted / boosted.sum(-1, keepdim=True)
            chosen = top_heads(visual[..., 0], self.head_ratio)[..., None]
            return torch.where(chosen, boosted, probs)

        return AttentionEdit(post_softmax=post_softmax, rows=last_prompt_rows(context))

    def kernel_edit(self, layer, run, prefill):
        """No structured form (the boost ranks the heads of each row and rescales the question by the row's image
        mass: no per (head, key group) table expresses it), but None where attention_edit is None, so the engine
        leaves the other layers alone without asking attention_edit at every decoding step."""
        if prefill and layer == self.source and has_image(run):
            return UNSTRUCTURED
        if layer not in self.chosen or run.memory(self).get("saliency") is None:
            return None
        return UNSTRUCTURED

    def _observe(self, probs, run, context):
        question = context.queries_where(run.layout.after_visual_text)
        image = context.keys_where(run.layout.visual)
        saliency = torch.zeros(image.shape, dtype=torch.float32, device=probs.device)
        for b in range(probs.shape[0]):
            saliency[b, image[b]] = gaze_shift_saliency(probs[b], question[b], image[b], self.head_ratio)
        run.memory(self)["saliency"] = scatter_positions(saliency, context.key_positions, run.layout.length)
        return probs
