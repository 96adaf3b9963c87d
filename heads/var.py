"""VAR, visual attention redistribution (Kang et al., 2025, "See What You Are Told: Visual Attention Sink in Large
Multimodal Models", ICLR).

Sink tokens: the hidden state entering each layer, x = RMSNorm(h) without its weight (fp32, eps 1e-6); a token is a
sink in that layer if max over the sink dimensions of |x| > tau = 20. Image-centric rows (per head and query row):
attention to the image >= 0.2 and non-sink share of that image attention >= rho. In those rows the attention of the
visual sink tokens is multiplied by (1 - p) and the freed p * sum(sink attention) goes to the non-sink image tokens in
proportion to their attention, p = 0.6. Layers 2..L-2 (sinks are read from layer 2 on; the last layer is left out).
In prefill only the text rows after the image change; every decoding row may change. Sinks are fixed at prefill.

Sink dimensions: the paper uses fixed per-model lists (LLaMA-2-7B 2533/1415, 13B 2100/4743, Qwen2-VL 458/2570), the
dimensions in which the BOS token carries its massive activations (Sun et al., 2024). Automatic rule (sink_dims=""):
in each layer, the dimensions where the sample's first token (the BOS / chat-start token, the canonical sink) has
|x| > tau. They are the massive-activation dimensions of that layer, so no list per model is needed, and a sample's
sinks never depend on the rest of the batch. Give sink_dims=2533/1415 to use a fixed list.

variant=code follows the public code instead: sink attention (visual AND text sinks such as BOS) is multiplied by p
(moving 1 - p = 0.4 of it) and a row qualifies when the sink share of its image attention is <= rho.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.kernels.api import GroupSpec
from vlm_efficient.method import UNSTRUCTURED, AttentionEdit, KernelEdit, Method
from vlm_efficient.registry import register_method

from .common import check_range, redistribute, rows_after_image, scatter_positions, text_after_image


def rms_normalize(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm without weight, in fp32."""
    hidden = hidden.float()
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)


def first_token_dims(normed: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """[B, D]: the dimensions where each sample's first valid row has |x| > tau."""
    first = valid.float().argmax(1)
    row = normed.gather(1, first[:, None, None].expand(-1, 1, normed.shape[-1]))[:, 0]
    return row.abs() > tau


def sink_tokens(normed: torch.Tensor, dims: torch.Tensor, tau: float) -> torch.Tensor:
    """[B, n]: rows whose |x| exceeds tau in one of the sink dimensions `dims` ([D] or [B, D] boolean)."""
    dims = dims if dims.dim() == 2 else dims[None]
    return (normed.abs() * dims[:, None, :]).amax(-1) > tau


def var_groups(num_heads: int, p: float = 0.6, rho: float = 0.5, min_image_mass: float = 0.2, text_group: int = 0,
               image_group: int = 1, sink_group: int = 2, num_groups: int = 3, heads=None) -> GroupSpec:
    """VAR's redistribution as kernel 3's tables, groups text / non-sink image / visual sink: in image-centric rows
    (image mass >= min_image_mass and non-sink share of the image mass >= rho) keep (1-p) of the sink mass and give
    p * M_sink to the non-sink image tokens in proportion; in `heads` (None: all)."""
    keep = torch.ones(num_groups)
    keep[sink_group] = 1 - p
    receive = torch.zeros(num_groups)
    receive[image_group] = 1.0
    return GroupSpec(num_heads, num_groups, keep=keep, receive=receive, sink_group=sink_group,
                     cond_mass_groups=(image_group, sink_group), cond_mass_min=min_image_mass,
                     cond_ratio_groups=((image_group,), (image_group, sink_group)), cond_ratio_min=rho).on_heads(heads)


@register_method
@dataclass
class VAR(Method):
    name = "var"
    summary = "move p of the visual-sink attention to the other image tokens in image-centric heads"
    reported = "hallucination benchmarks (CHAIR, POPE) improve along with general and vision-centric VQA"

    p: float = 0.6
    rho: float = 0.5
    min_image: float = 0.2  # the code's `summ`: least attention to the image for a row to count
    tau: float = 20.0
    sink_dims: str = ""  # e.g. 2533/1415; empty = automatic (see the module docstring)
    variant: str = "paper"

    def bind(self, engine) -> None:
        for name in ("p", "rho", "min_image"):
            check_range("var", name, getattr(self, name), 0.0, 1.0)
        if self.tau <= 0:
            raise ValueError(f"var: tau={self.tau} must be > 0")
        if self.variant not in ("paper", "code"):
            raise ValueError(f"var: variant={self.variant!r} must be paper or code")
        hidden = engine.text_config.hidden_size
        try:
            dims = [int(d) for d in filter(None, self.sink_dims.split("/"))]
        except ValueError:
            raise ValueError(
                f"var: sink_dims={self.sink_dims!r}: write dimensions like {hidden // 2}/{hidden - 1}"
            ) from None
        if any(not 0 <= d < hidden for d in dims):
            raise ValueError(f"var: sink_dims {dims} must be in [0, {hidden - 1}] (hidden size {hidden})")
        self.dims = None
        if dims:
            self.dims = torch.zeros(hidden, dtype=torch.bool)
            self.dims[dims] = True
        self.chosen = range(2, engine.num_layers - 1)
        if not self.chosen:
            raise ValueError("var: needs at least 4 layers (sinks from layer 2, last layer excluded)")
        # key groups: text, non-sink image, visual sink (the paper's rule; the code's variant has no such form)
        self.groups = var_groups(engine.text_config.num_attention_heads, p=self.p, rho=self.rho,
                                 min_image_mass=self.min_image)

    def observes_hidden(self, layer: int) -> bool:
        return layer in self.chosen

    def observe_hidden(self, layer, run, hidden) -> None:
        if not run.prefill:
            return
        normed = rms_normalize(hidden)
        valid = run.current_valid().to(normed.device)
        dims = first_token_dims(normed, valid, self.tau) if self.dims is None else self.dims.to(normed.device)
        sinks = sink_tokens(normed, dims, self.tau) & valid
        positions = run.current_positions().to(normed.device)
        sinks = scatter_positions(sinks, positions, run.layout.length)
        if bool((sinks & run.layout.visual.to(sinks.device)).any()):  # else nothing to redistribute in this layer
            run.memory(self)[layer] = sinks

    def kernel_edit(self, layer, run, prefill):
        sinks = run.memory(self).get(layer)
        if layer not in self.chosen or sinks is None:
            return None
        if self.variant != "paper":
            return UNSTRUCTURED
        visual = run.layout.visual.to(sinks.device)
        groups = torch.where(visual & sinks, 2, visual.long())
        return KernelEdit(spec=self.groups, groups=groups, rows=text_after_image(run.layout))

    def attention_edit(self, layer, run, context):
        """variant=code only (the paper's rule is kernel_edit): the code's condition has no GroupSpec form."""
        sinks = run.memory(self).get(layer)
        visual = context.keys_where(run.layout.visual)[:, None, None, :]
        sink = context.keys_where(sinks)[:, None, None, :]
        visual_sink = visual & sink
        receivers = visual & ~sink

        def post_softmax(probs):
            image = (probs * visual).sum(-1)
            on_sinks = (probs * visual_sink).sum(-1)
            centric = (image >= self.min_image) & (on_sinks / (image + 1e-6) <= self.rho)
            return torch.where(centric[..., None], redistribute(probs, sink, receivers, self.p), probs)

        return AttentionEdit(post_softmax=post_softmax, rows=rows_after_image(run, context))
