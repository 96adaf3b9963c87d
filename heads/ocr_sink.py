"""OCR-head sink redistribution (Baek et al., 2025, "How Do Large Vision-Language Models See Text in Image?
Unveiling the Distinctive Role of OCR Heads").

In the chosen OCR heads, every row keeps beta = 0.4 of the attention it pays token 0 (the sample's first token, the
attention sink) and the freed mass goes to the other tokens in proportion to their attention. The heads come from an
OCR-head ranking (`vlm-efficient inspect --ocr-box ...` reports a per-head OCR score): give them as heads=layer.head/...

Public code: github.com/baekingeol/OCR_Head, utils/models/qwenvl2_sink.py, redistribute_method_beta (beta 0.4), equal
here on every row but the first: the first token's own row has no other key to receive the mass, and the public code
then spreads it uniformly over the row's masked (future) keys; here that row stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.method import KernelEdit, Method
from vlm_efficient.registry import register_method

from .act import act_groups
from .common import check_range, example_heads, parse_heads


@register_method
@dataclass
class OCRSink(Method):
    name = "ocr_sink"
    summary = "in chosen OCR heads keep beta of token 0's attention, spread the rest in proportion"
    reported = "text-reading accuracy up; no hallucination benchmark"

    heads: str = ""  # layer.head/... (required)
    beta: float = 0.4

    def bind(self, engine) -> None:
        check_range("ocr_sink", "beta", self.beta, 0.0, 1.0)
        self.num_heads = engine.text_config.num_attention_heads
        if not self.heads:
            raise ValueError(
                "ocr_sink: give the OCR heads as heads=layer.head/... (e.g. heads="
                f"{example_heads(engine.num_layers, self.num_heads)}); "
                "`vlm-efficient inspect --ocr-box x0,y0,x1,y1` ranks heads by their OCR score"
            )
        self.heads_by_layer = parse_heads("ocr_sink", self.heads, engine.num_layers, self.num_heads)
        self.groups = {  # key groups: others, token 0 (the sink)
            layer: act_groups(self.num_heads, self.beta, sink_group=1, num_groups=2, heads=heads)
            for layer, heads in self.heads_by_layer.items()
        }

    def kernel_edit(self, layer, run, prefill):
        if layer not in self.heads_by_layer:
            return None
        valid = run.layout.valid
        first = torch.zeros_like(valid, dtype=torch.long)
        first.scatter_(1, valid.float().argmax(1, keepdim=True), 1)
        return KernelEdit(spec=self.groups[layer], groups=first)
