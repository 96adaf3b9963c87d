"""AdaptVis (Chen et al., 2025, "Why Is Spatial Reasoning Hard for VLMs? An Attention Mechanism Perspective on Focus
Areas").

A probe forward of the plain model (attention weight 1) gives the first answer token's confidence, its largest
probability. Below 0.4 the model is unsure: image-key logits are multiplied by 0.5 (smoothing, look wider); otherwise
by 1.5 (sharpening, trust the focus). Per sample, all heads, all layers by default. The edit applies to the row that
predicts the next token: the last prompt row, as in the public code (it scores options with one cache-free forward
and edits the last row), and here also every decoding row. The probe is an extra prefill of the unwrapped model (no
other method acts in it), run before the real one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.engine import plain_calls
from vlm_efficient.kernels.api import GroupSpec
from vlm_efficient.method import KernelEdit, Method, PerThread
from vlm_efficient.registry import register_method

from .common import check_range, has_image, last_position, parse_layers, per_run, prompt_inputs, take_pending


@register_method
@dataclass
class AdaptVis(Method):
    name = "adaptvis"
    summary = "probe the first-token confidence; image-key logits x0.5 if < 0.4, else x1.5"
    reported = "spatial-reasoning accuracy up (WhatsUp, VSR); no hallucination benchmark"
    prefill_edits_last_row_as_decoding = True
    pending = PerThread()  # the key weights of the calling thread's next prefill

    threshold: float = 0.4
    smooth: float = 0.5
    sharpen: float = 1.5
    layers: str = ""  # default: all

    def bind(self, engine) -> None:
        check_range("adaptvis", "threshold", self.threshold, 0.0, 1.0)
        if self.smooth <= 0 or self.sharpen <= 0:
            raise ValueError(f"adaptvis: smooth={self.smooth} and sharpen={self.sharpen} must be > 0")
        self.chosen = parse_layers("adaptvis", self.layers, engine.num_layers, range(engine.num_layers))
        self.model = engine.model
        self.pending = None
        engine.before_prefill(self._probe)
        # key groups: other, image of an unsure sample, image of a sure one
        self.groups = GroupSpec(engine.text_config.num_attention_heads, 3,
                                logit_scale=[1.0, self.smooth, self.sharpen])

    def confidence(self, inputs: dict) -> torch.Tensor:
        """[B]: the plain model's largest next-token probability after the prompt."""
        with plain_calls(self.model):
            logits = self.model(**prompt_inputs(inputs)).logits[:, -1]
        return logits.float().softmax(-1).amax(-1)

    def _probe(self, inputs: dict) -> None:
        confidence = self.confidence(inputs)
        self.pending = torch.where(confidence < self.threshold, self.smooth, self.sharpen)

    def _weight(self, run) -> torch.Tensor:
        return take_pending(self, run, "weight", "adaptvis: no probe ran before this prefill")

    def kernel_edit(self, layer, run, prefill):
        weight = self._weight(run)
        if layer not in self.chosen or not has_image(run):
            return None
        def build():
            visual = run.layout.visual
            sure = (weight.to(visual.device) != self.smooth).long()[:, None]
            return KernelEdit(spec=self.groups, groups=torch.where(visual, 1 + sure, 0), rows=last_position(run.layout))

        return per_run(self, run, "kernel_edit", build)
