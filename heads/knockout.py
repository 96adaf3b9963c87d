"""Attention knockout between token spans in chosen layers, the information-flow analysis of Zhang et al., 2025,
"Cross-modal Information Flow in Multimodal Large Language Models" (CVPR): block every edge from a span of query
rows to a span of keys, e.g. question-image (question tokens may not read the image), image-last, question-last.

Spans: image, before (text before the first image: system prompt), question (text after the last image, without
the last position), last (the last prompt position, which predicts the answer), text, all. The analysis measures
the answer's first token, so the knockout applies to the prefill; decoding rows are unchanged.
    knockout:edges=question-image/image-last,layers=10-15
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.kernels.api import ROLE_IMAGE, ROLE_LAST, ROLE_MIDDLE, ROLE_PREFIX, ROLE_QUESTION, MaskSpec
from vlm_efficient.method import AttentionEdit
from vlm_efficient.registry import register_method

from .common import PrefillMask

SPANS = ("image", "before", "question", "last", "text", "all")
_TEXT_ROLES = (ROLE_PREFIX, ROLE_MIDDLE, ROLE_QUESTION, ROLE_LAST)
SPAN_ROLES = {  # the spans as kernel_plan.token_roles (kernel 1's knockout rule)
    "image": (ROLE_IMAGE,),
    "before": (ROLE_PREFIX,),
    "question": (ROLE_QUESTION,),
    "last": (ROLE_LAST,),
    "text": _TEXT_ROLES,
    "all": (ROLE_IMAGE, *_TEXT_ROLES),
}


def span_positions(layout, span: str) -> torch.Tensor:
    """[B, N] positions of a span of the prompt."""
    last = torch.zeros_like(layout.valid)
    last[:, -1] = layout.valid[:, -1]  # left padding: the last column is every sample's last token
    return {
        "image": layout.visual,
        "before": layout.before_visual_text,
        "question": layout.after_visual_text & ~last,
        "last": last,
        "text": layout.text,
        "all": layout.valid,
    }[span]


@register_method
@dataclass
class Knockout(PrefillMask):
    name = "knockout"
    summary = "mask: block attention from one token span to another in chosen layers (information-flow analysis)"

    edges: str = "question-image"  # rows-keys pairs joined by /

    def bind(self, engine) -> None:
        self.pairs = []
        for edge in filter(None, self.edges.split("/")):
            rows, dash, keys = edge.partition("-")
            if not dash or rows not in SPANS or keys not in SPANS:
                raise ValueError(
                    f"knockout: edge {edge!r} must be rows-keys with spans from {', '.join(SPANS)} "
                    "(e.g. edges=question-image/image-last)"
                )
            self.pairs.append((rows, keys))
        if not self.pairs:
            raise ValueError("knockout: give at least one edge, e.g. edges=question-image")
        super().bind(engine)

    def attention_edit(self, layer, run, context):
        """Where some sample has no image (mask_spec's roles cannot tell its spans apart): the edges as a dense mask."""
        blocked = torch.zeros(
            (*context.query_positions.shape, context.key_positions.shape[1]),
            dtype=torch.bool,
            device=context.query_positions.device,
        )
        for rows, keys in self.pairs:
            rows_in = context.queries_where(span_positions(run.layout, rows))
            keys_in = context.keys_where(span_positions(run.layout, keys))
            blocked |= rows_in[:, :, None] & keys_in[:, None, :]
        return AttentionEdit(mask=~blocked[:, None])

    def mask_spec(self, run):
        memory = run.memory(self)
        if "every_sample_has_image" not in memory:  # else "before" and "question" overlap: no role per token
            memory["every_sample_has_image"] = bool(run.layout.visual.any(1).all())
        if not memory["every_sample_has_image"]:
            return None
        edges = {(q, k) for rows, keys in self.pairs for q in SPAN_ROLES[rows] for k in SPAN_ROLES[keys]}
        return MaskSpec(knockout=tuple(sorted(edges)))
