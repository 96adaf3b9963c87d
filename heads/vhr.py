"""VHR, vision-aware head reinforcement (He et al., 2025, "Cracking the Code of Hallucination in LVLMs with
Vision-aware Head Divergence", ACL).

VHD(l, h) = || o_lh(with image) - o_lh(without image) ||_2, the distance between a head's output (the o_proj input)
at the position that predicts the first generated token, with the image and with the image tokens removed from the
prompt. Per layer, heads whose VHD AND no-image output norm both exceed the layer's mean + 1 std are discounted
(VHD set to 0: they differ because they are loud, not because they look); heads above the layer's median VHD get
their output multiplied by alpha = 2. Layers: the later half. Heads are fixed once per prompt, at the first
generated token, and reinforced from that token on: the last prompt row (an exact head-output scaling through the
attention probabilities of that row) and every decoding step (o_proj input scaling, any attention backend).

`vhr_head_factors(model, inputs)` is the head selection on its own: two extra prefills of the plain model (with and
without the image). The `vhr` method runs it before each prefill.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from vlm_efficient.adapters import get_adapter
from vlm_efficient.engine import plain_calls
from vlm_efficient.method import KernelEdit, Method, PerThread
from vlm_efficient.registry import register_method

from .common import last_position, parse_layers, prompt_inputs, take_pending, text_only_inputs


def _last_head_outputs(model, inputs: dict) -> torch.Tensor:
    """[B, L, H, d]: every layer's per-head attention output at the last prompt position, plain model."""
    adapter = get_adapter(model)
    heads = model.config.get_text_config().num_attention_heads
    captured = {}
    thread = threading.get_ident()  # other threads' calls of the same model pass these hooks too

    def capture(i):
        def hook(module, args):
            if threading.get_ident() == thread:
                captured[i] = args[0][:, -1].float()

        return hook

    hooks = [
        adapter.head_output_module(layer).register_forward_pre_hook(capture(i))
        for i, layer in enumerate(adapter.decoder_layers(model))
    ]
    try:
        with plain_calls(model), torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    outputs = torch.stack([captured[i] for i in range(len(captured))], dim=1)
    return outputs.view(*outputs.shape[:2], heads, -1)


def vision_head_divergence(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(VHD [B, L, H], no-image head-output norm [B, L, H]) for a prompt given as the processor's inputs (or a
    prefill's forward kwargs)."""
    with_image = _last_head_outputs(model, prompt_inputs(inputs))
    text = text_only_inputs(model, inputs["input_ids"], inputs.get("attention_mask"))
    without = _last_head_outputs(model, {**text, "use_cache": False})
    return (with_image - without).norm(dim=-1), without.norm(dim=-1)


def select_heads(vhd: torch.Tensor, norm: torch.Tensor, alpha: float, layers) -> torch.Tensor:
    """Factors [B, L, H] from VHD and no-image norms [B, L, H]: alpha for heads above their layer's median VHD after
    discounting the heads that are outliers in both VHD and norm; 1 elsewhere and outside `layers`."""
    factors = torch.ones_like(vhd)
    for layer in layers:
        v, n = vhd[:, layer], norm[:, layer]
        loud = (v > v.mean(-1, keepdim=True) + v.std(-1, keepdim=True)) & (
            n > n.mean(-1, keepdim=True) + n.std(-1, keepdim=True)
        )
        v = torch.where(loud, 0.0, v)
        factors[:, layer] = torch.where(v > v.median(-1, keepdim=True).values, alpha, 1.0)
    return factors


def vhr_head_factors(model, inputs: dict, alpha: float = 2.0, layers=None) -> torch.Tensor:
    """Per-sample, per-layer head factors [B, L, H] of VHR for this prompt (layers default: the later half)."""
    vhd, norm = vision_head_divergence(model, inputs)
    num_layers = vhd.shape[1]
    return select_heads(vhd, norm, alpha, range(num_layers // 2, num_layers) if layers is None else layers)


@register_method
@dataclass
class VHR(Method):
    name = "vhr"
    summary = "x alpha on heads whose output diverges most with vs without the image (later half)"
    reported = "CHAIR_S ~49 -> 33.3, CHAIR_I -> 9.71 (LLaVA-1.5-7B); POPE up"
    pending = PerThread()  # the head factors of the calling thread's next prefill
    # the prefill scales the last row's head outputs only, as every decoding step does (head_output_scale): the fast
    # path may run that row as a first decoding step
    prefill_edits_last_row_as_decoding = True

    alpha: float = 2.0
    layers: str = ""  # default: the later half

    def bind(self, engine) -> None:
        if self.alpha < 0:
            raise ValueError(f"vhr: alpha={self.alpha} must be >= 0")
        n = engine.num_layers
        self.chosen = parse_layers("vhr", self.layers, n, range(n // 2, n))
        self.model = engine.model
        self.pending = None
        engine.before_prefill(self._select)

    def _select(self, inputs: dict) -> None:
        if "input_ids" not in inputs:
            raise ValueError("vhr: the prefill needs input_ids to build the prompt without its image")
        self.pending = vhr_head_factors(self.model, inputs, self.alpha, self.chosen)

    def _factors(self, run) -> torch.Tensor:
        return take_pending(self, run, "factors", "vhr: no head selection ran before this prefill")

    def edits_head_outputs(self) -> bool:
        return True

    def kernel_edit(self, layer, run, prefill):
        factors = self._factors(run)
        if not prefill or layer not in self.chosen:
            return None
        return KernelEdit(head_scale=factors[:, layer], rows=last_position(run.layout))

    def head_output_scale(self, layer, run):
        if run.prefill or layer not in self.chosen:
            return None
        return self._factors(run)[:, layer]
