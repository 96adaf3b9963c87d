"""PyramidDrop (Xing et al., 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction").

The LLM is split into stages; at the start of each stage boundary layer the image tokens are ranked by the
head-averaged attention that the last instruction token pays them, computed with that boundary layer's own
attention on its input (a light probe: no extra layer runs), and only lambda^s of the ORIGINAL image tokens stay
after the s-th boundary (public code: layers 8/16/24 of 32, ratio list 1, 0.5, 0.25, 0.125, counts truncated).
Pruning happens once per boundary at prefill. Positions: the public code (llava/model/modeling_llama_pdrop.py,
pdrop_rank_drop and pdrop_forward) re-numbers the kept tokens contiguously after each drop, so later stages rank with
those positions, and moves each decoded token's position back by the tokens dropped before its layer;
`positions=renumber` does the same. The default keeps the original positions (`positions=original`), chosen by
measurement: on the testbed (CPU, 50 POPE + 50 VQA questions, ratio 0.5, results/testbed_positions_staged_cpu/)
VQA accuracy is 0.78 with original positions and 0.74 renumbered (POPE F1 0.939 in both).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_efficient.method import AttentionRequest, Method, Selection
from vlm_efficient.registry import register_method
from vlm_efficient.selection import check_positions, top_k_mask


@register_method
@dataclass
class PyramidDrop(Method):
    name = "pdrop"
    summary = "staged: at each boundary layer keep lambda of the image tokens, ranked by last-token attention"

    layers: tuple[int, ...] = ()  # boundary layers; empty = L/4, L/2, 3L/4
    ratio: float = 0.5  # lambda: the share of image tokens each stage keeps
    positions: str = "original"  # or renumber: contiguous positions after each stage, as the authors' code

    def bind(self, engine) -> None:
        check_positions("pdrop", self.positions, engine, inside=True)
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"pdrop: ratio={self.ratio} must be in (0, 1]: the share each stage keeps")
        depth = engine.num_layers
        layers = self.layers or tuple(depth * s // 4 for s in (1, 2, 3))
        if list(layers) != sorted(set(layers)) or not all(1 <= l < depth for l in layers):
            valid = sorted({min(max(1, depth * s // 4), depth - 1) for s in (1, 2, 3)})  # L/4, L/2, 3L/4 where they fit
            example = f"e.g. layers={'/'.join(map(str, valid))}" if depth >= 2 else "this model has too few layers"
            raise ValueError(
                f"pdrop: layers={'/'.join(map(str, layers))} must be increasing layer indices in [1, {depth - 1}] "
                f"for this {depth}-layer model ({example})"
            )
        self.boundaries = layers

    def prune_layers(self) -> set[int]:
        return set(self.boundaries)

    def attention_request(self, layer: int) -> AttentionRequest | None:
        return AttentionRequest(queries="last", probe=True) if layer in self.boundaries else None

    def observe_attention(self, layer, run, stats) -> None:
        run.memory(self)["scores"] = stats.received

    def select_tokens(self, layer, run, hidden) -> Selection:
        scores = run.memory(self).pop("scores")
        stage = self.boundaries.index(layer) + 1
        visual = run.current(run.layout.visual, fill=False).to(scores.device)
        share = self.ratio**stage
        keep = (run.layout.num_visual.to(scores.device).double() * share).long()
        kept = None  # the same counts on the host (float64, truncated), capped by the visual rows left
        if run.visual_rows is not None:
            kept = [min(int(total * share), rows) for total, rows in zip(run.layout.visual_counts, run.visual_rows)]
        return Selection(keep=~visual | top_k_mask(scores, visual, keep), visual_kept=kept)
