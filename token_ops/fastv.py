"""FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2").

After layer K, drop R of the image tokens, ranked by the head-averaged attention they receive in layer K-1. The
public code ranks by the LAST prompt token's attention row (default, `scoring="last"`); the paper's text averages
over query tokens (`scoring="all"`: every token; `scoring="text"`: text tokens only). Pruning happens once, at
prefill; kept tokens keep their original positions and the KV cache of layers >= K holds the kept tokens only.
Only the needed attention rows are computed in layer K-1; every other layer stays on SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_efficient.method import AttentionRequest, Method, Selection
from vlm_efficient.registry import register_method
from vlm_efficient.selection import check_drop_ratio, keep_top_visual


@register_method
@dataclass
class FastV(Method):
    name = "fastv"
    summary = "drop R of the image tokens after layer K, ranked by attention received in layer K-1"

    layer: int = 2
    ratio: float = 0.5
    scoring: str = "last"

    def bind(self, engine) -> None:
        check_drop_ratio("fastv", self.ratio)
        if not 1 <= self.layer < engine.num_layers:
            raise ValueError(
                f"fastv: layer={self.layer} must be in [1, {engine.num_layers - 1}] for this "
                f"{engine.num_layers}-layer model (scores come from layer K-1, pruning happens before layer K)"
            )
        if self.scoring not in ("last", "all", "text"):
            raise ValueError(f"fastv: scoring={self.scoring!r} must be last, all or text")

    def prune_layers(self) -> set[int]:
        return {self.layer}

    def attention_request(self, layer: int) -> AttentionRequest | None:
        return AttentionRequest(queries=self.scoring) if layer == self.layer - 1 and self.ratio > 0 else None

    def observe_attention(self, layer, run, stats) -> None:
        run.memory(self)["scores"] = stats.received

    def select_tokens(self, layer, run, hidden) -> Selection | None:
        scores = run.memory(self).pop("scores", None)
        if scores is None:
            return None
        return keep_top_visual(run, scores, self.ratio)
