"""YOPO (Zhang et al., 2024, "Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See"), the
training-free application of its three prunings of visual computation (the paper fine-tunes after pruning):

- neighbour-aware visual attention: an image token attends to the image tokens within a `window` x `window` patch of
  its grid (layout.coords; the `window` method's mask). The public code replaces the causal mask inside the image by
  this window, so an image token also sees its later neighbours; an attention edit can only remove pairs, so here the
  window stays causal (the bidirectional version needs an engine feature: an edit that may unblock pairs).
- inactive visual heads: in each layer a share `heads` of the heads is pruned for vision: their attention to image
  keys is zeroed (not renormalised, as in the public code) for every query, and their output for image rows is zero.
  The public code loads per-layer head masks found offline (`head_mask=<.npy/.pt file>`, [layers, heads], 1 =
  active); without a file the heads whose image rows pay the least attention to image keys in this prefill are pruned.
- skipped visual computation: from layer `skip_from` on, no head attends to image keys (`skip="zero"`: the public
  code's zeroing without renormalisation, exact but saving nothing), or the visual tokens leave the sequence there
  (`skip="drop"`: renormalised, with real savings).
- image rows use only the first `mlp` share of each FFN's neurons (public code: 1 / mlpcut_ratio).

Defaults follow the public fine-tuning script (LLaVA-1.5-13B: attncut_w 5, layercut_num 20 of 40 layers, mlpcut_ratio
2) and its 7B head masks (16 of 32 heads pruned); skip_from=None is half the depth, -1 turns skipping off.

Head pruning and the window only change attention probabilities here (dense reference attention in the edited
layers); they save compute only with a kernel that skips the pruned (row, head) pairs.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch

from vlm_efficient.heads.window import NeighbourWindow
from vlm_efficient.edits import dense_edit
from vlm_efficient.method import AttentionEdit, KernelEdit, Method
from vlm_efficient.registry import register_method


def load_head_mask(path: str, num_layers: int, num_heads: int) -> torch.Tensor:
    if not os.path.isfile(path):
        raise ValueError(f"yopo: head_mask={path!r} is not a file ([layers, heads] array, 1 = active head)")
    if path.endswith(".npy"):
        import numpy as np

        mask = torch.from_numpy(np.load(path))
    else:
        mask = torch.load(path, map_location="cpu", weights_only=True)
    if tuple(mask.shape) != (num_layers, num_heads):
        raise ValueError(f"yopo: head_mask has shape {tuple(mask.shape)}, this model needs ({num_layers}, {num_heads})")
    return mask != 0


@register_method
@dataclass
class YOPO(Method):
    name = "yopo"
    summary = "prune visual computation: 2-D neighbour window, inactive visual heads, skipped layers, FFN share"

    window: int = 5
    heads: float = 0.5
    head_mask: str = ""
    skip_from: int | None = None
    skip: str = "zero"
    mlp: float = 0.5

    def bind(self, engine) -> None:
        depth, num_heads = engine.num_layers, engine.text_config.num_attention_heads
        if self.window < 0 or (self.window and self.window % 2 == 0):
            raise ValueError(f"yopo: window={self.window} must be an odd patch width (0 = off)")
        if not 0 <= self.heads < 1 or not 0 < self.mlp <= 1:
            raise ValueError("yopo: heads must be in [0, 1) (share of heads pruned) and mlp in (0, 1]")
        if self.skip_from is None:
            self.skip_from = depth // 2
        if self.skip not in ("zero", "drop") or not (self.skip_from == -1 or 1 <= self.skip_from < depth):
            raise ValueError(f"yopo: skip must be zero or drop and skip_from -1 (off) or in [1, {depth - 1}]")
        self.window_mask = NeighbourWindow(size=(self.window - 1) // 2) if self.window else None
        self.fixed_heads = load_head_mask(self.head_mask, depth, num_heads) if self.head_mask else None
        self.num_heads = num_heads
        if self.mlp < 1:
            engine_ref = weakref.ref(engine)
            for layer in engine.layers:
                engine.add_handle(layer.mlp.down_proj.register_forward_pre_hook(self._mlp_hook(engine_ref)))

    def _mlp_hook(self, engine_ref):
        def hook(module, args):
            engine = engine_ref()
            run = engine.run if engine is not None else None
            if run is None or not run.prefill or not run.layout.has_visual:
                return None
            neurons = args[0]
            visual = run.current(run.layout.visual, fill=False).to(neurons.device)
            cut = int(neurons.shape[-1] * self.mlp)
            return (neurons.masked_fill(visual[..., None] & (torch.arange(neurons.shape[-1], device=neurons.device)
                                                             >= cut), 0.0),)  # fmt: skip

        return hook

    def prune_layers(self) -> set[int]:
        return {self.skip_from} if self.skip == "drop" and self.skip_from > 0 else set()

    def select_tokens(self, layer, run, hidden) -> torch.Tensor:
        return ~run.current(run.layout.visual, fill=False).to(hidden.device)

    def attention_edit(self, layer, run, context):
        if not run.layout.has_visual:
            return None
        skipped = self.skip == "zero" and 0 < self.skip_from <= layer
        if not (self.window_mask and context.prefill) and not self.heads and self.fixed_heads is None and not skipped:
            return None
        memory = run.memory(self)
        image_keys = context.keys_where(run.layout.visual)[:, None, None, :]
        image_rows = context.queries_where(run.layout.visual)[:, None, :, None]
        mask = None
        if self.window_mask and context.prefill:
            mask = dense_edit(KernelEdit(mask=self.window_mask.mask_spec(run)), run, context).mask

        def post_softmax(probs):
            inactive = None
            if self.fixed_heads is not None:
                inactive = ~self.fixed_heads[layer].to(probs.device)[None].expand(probs.shape[0], -1)
            elif self.heads:
                if context.prefill:
                    mass = (probs * image_keys).sum(-1)  # [B, H, q]
                    rows = image_rows[..., 0].float()
                    activity = (mass * rows).sum(-1) / rows.sum(-1).clamp(min=1)
                    order = activity.sort(dim=1, stable=True).indices
                    memory[layer] = torch.zeros_like(activity, dtype=torch.bool).scatter_(
                        1, order[:, : int(self.heads * self.num_heads + 0.5)], True
                    )
                inactive = memory.get(layer)
            if inactive is not None:
                heads = inactive[:, :, None, None]
                probs = probs.masked_fill(heads & image_keys, 0.0)
                if context.prefill:
                    probs = probs.masked_fill(heads & image_rows, 0.0)
            if skipped:
                probs = probs.masked_fill(image_keys, 0.0)
            return probs

        return AttentionEdit(mask=mask, post_softmax=post_softmax)
