"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More").

At layer K (default 2), pick pivot tokens by the L1 norm of their layer K-1 keys (all key heads concatenated):
4 image tokens and 4 tokens of the text after the image. For each pivot in turn, keep the image tokens LEAST
cosine-similar to it (similarity of the hidden states entering layer K after the model's final norm), int(n (1-R) /
#pivots) per pivot, removing them from the candidates; keep the image pivots too. Needs no attention weights, so
every layer stays on SDPA. Pivots are visited in position order (the public code visits a Python set).

`count=code`: the authors' runs (github.com/ZichenWen1/DART, last commit of the author 5a19452,
llava/model/language_model/modeling_llama_self.py: get_retained_image_token, with the scripts' max_num_trunction
128 at ratio 0.778) keep `truncation // #pivots` per pivot whatever the ratio: 16 per pivot and 4 + 8 x 16 = 132
image tokens of LLaVA-1.5's 576, where the paper's count gives 15 and 124. At the scripts' other settings pass
their max_num_trunction as `truncation`. Either count is capped by the candidates left (the public code would fail).
Kept tokens keep their original positions, as in the authors' code (position_ids = keep_indexs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlm_efficient.method import AttentionRequest, Method, Selection
from vlm_efficient.registry import register_method
from vlm_efficient.selection import check_drop_ratio, top_k_mask


@register_method
@dataclass
class DART(Method):
    name = "dart"
    summary = "keep the image tokens least similar to a few pivot tokens (no attention weights needed)"

    layer: int = 2
    ratio: float = 0.778
    image_pivots: int = 4
    text_pivots: int = 4
    count: str = "ratio"  # "code": truncation // #pivots per pivot, as the authors' scripts run it
    truncation: int = 128  # count=code: the scripts' max_num_trunction

    def bind(self, engine) -> None:
        check_drop_ratio("dart", self.ratio)
        if not 1 <= self.layer < engine.num_layers:
            raise ValueError(f"dart: layer={self.layer} must be in [1, {engine.num_layers - 1}]")
        if self.image_pivots < 1 or self.text_pivots < 0:
            raise ValueError("dart: image_pivots must be >= 1 and text_pivots >= 0")
        if self.count not in ("ratio", "code"):
            raise ValueError(f"dart: count={self.count!r}: use ratio (the paper's n (1-R) / #pivots per pivot) or code "
                             "(the authors' truncation // #pivots)")
        if self.truncation < 0:
            raise ValueError(f"dart: truncation={self.truncation} must be >= 0")
        self.final_norm = engine.adapter.text_model(engine.model).norm

    def prune_layers(self) -> set[int]:
        return {self.layer}

    def attention_request(self, layer: int) -> AttentionRequest | None:
        return AttentionRequest(queries=None, keys=True) if layer == self.layer - 1 and self.ratio > 0 else None

    def observe_attention(self, layer, run, stats) -> None:
        keys = stats.keys  # [B, Hkv, n, d]
        run.memory(self)["key_norm"] = keys.float().abs().sum(dim=(1, 3))  # L1 norm over all heads' keys

    def select_tokens(self, layer, run, hidden) -> Selection | None:
        key_norm = run.memory(self).pop("key_norm", None)
        if key_norm is None:
            return None
        states = torch.nn.functional.normalize(self.final_norm(hidden).float(), dim=-1)
        visual = run.current(run.layout.visual, fill=False).to(hidden.device)
        question = run.current(run.layout.after_visual_text, fill=False).to(hidden.device)
        keep = ~visual | self.kept_image_rows(key_norm.to(hidden.device), states, visual, question)
        return Selection(keep=keep, visual_kept=self.kept_counts(run))

    def kept_counts(self, run) -> list[int] | None:
        """Each sample's kept image rows as kept_image_rows keeps them, from counts the host knows (the layout's), where
        the rows are still the prompt's: its image pivots, then per pivot (image and text) up to per_pivot more, as
        many as the candidates allow."""
        questions = run.layout.after_visual_text_counts
        if run.visual_rows is None or run.positions is not None or questions is None:
            return None
        pivots = self.image_pivots + self.text_pivots
        kept = []
        for images, question in zip(run.visual_rows, questions):
            if self.count == "code":
                per_pivot = self.truncation // pivots
            else:  # the same float64 arithmetic as on the device
                per_pivot = math.floor(images * (1 - self.ratio) / pivots)
            image_pivots = min(images, self.image_pivots)
            steps = image_pivots + min(question, self.text_pivots)
            kept.append(image_pivots + min(images - image_pivots, steps * per_pivot))
        return kept

    def kept_image_rows(self, key_norm, states, visual, question) -> torch.Tensor:
        """[B, n] kept image rows, every sample at once (per-sample counts stay on the device: no host sync)."""
        n_image = visual.sum(1)
        kept = top_k_mask(key_norm, visual, n_image.clamp(max=self.image_pivots))
        pivots = kept | top_k_mask(key_norm, question, question.sum(1).clamp(max=self.text_pivots))
        if self.count == "code":
            per_pivot = torch.full_like(n_image, self.truncation // (self.image_pivots + self.text_pivots))
        else:
            per_pivot = torch.floor(n_image.double() * (1 - self.ratio) / (self.image_pivots + self.text_pivots)).long()
        # the pivots of each sample in position order, [B, P]; a slot past a sample's own pivots has order n
        n = visual.shape[1]
        rows = torch.arange(n, device=visual.device).expand_as(visual)
        order = torch.where(pivots, rows, n).sort(1).values[:, : self.image_pivots + self.text_pivots]
        candidates = visual & ~kept
        batch = torch.arange(visual.shape[0], device=visual.device)
        for step in range(order.shape[1]):
            pivot = order[:, step]
            similarity = torch.einsum("bnd,bd->bn", states, states[batch, pivot.clamp(max=n - 1)])
            chosen = top_k_mask(-similarity, candidates, torch.where(pivot < n, per_pivot, 0))
            kept |= chosen
            candidates &= ~chosen
        return kept
