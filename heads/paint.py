"""PAINT (Arefeen et al., 2025, "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large
Vision-Language Model").

The vision encoder's [CLS] attention (summed over heads) picks two groups of image tokens per image: the top 25% at
ViT layer 0 ("top"), and the outliers (> Q3 + 1.5 IQR) at the second-to-last ViT layer; top tokens that are also
outliers count as outliers. In the LLM, as in PAI (layers 2..L-1, the row that predicts the next token, all heads),
the scaled logits of the first group become a + 0.7|a| and those of the second a + 0.3|a|.

This follows the public code (modPAI): the paper also describes a head-specific modulation by each head's visual
sensitivity, which the code does not contain and is not implemented here. Needs a CLIP tower with a [CLS] token
whose patches map one to one onto the image tokens (the adapter's `cls_patch_tokens`: LLaVA-1.5). LLaVA-NeXT's
tiles and Qwen's towers (no [CLS]) are refused. The [CLS] attention is computed by hooks on the two ViT attention modules (q and k of
the [CLS] row only), whatever attention implementation the tower uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.adapters import families_with
from vlm_efficient.kernels.api import GroupSpec
from vlm_efficient.method import KernelEdit, Method, PerThread
from vlm_efficient.registry import register_method

from .common import has_image, last_position, parse_layers, per_run


def cls_attention(attention, hidden: torch.Tensor) -> torch.Tensor:
    """[images, tokens]: the [CLS] row of a CLIP attention module's probabilities on input `hidden`, summed over
    heads."""
    images, tokens, _ = hidden.shape
    query = attention.q_proj(hidden[:, :1]).view(images, 1, attention.num_heads, -1).transpose(1, 2)
    key = attention.k_proj(hidden).view(images, tokens, attention.num_heads, -1).transpose(1, 2)
    probs = ((query.float() @ key.float().transpose(-1, -2)) * attention.scale).softmax(-1)
    return probs[:, :, 0].sum(1)


def token_groups(first: torch.Tensor, late: torch.Tensor, top_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """From [CLS] attention to the patches at ViT layer 0 and at the second-to-last layer ([images, patches]): the top
    group (top_ratio by layer-0 attention, outliers removed) and the outliers (> Q3 + 1.5 IQR of the late attention)."""
    quartiles = torch.tensor([0.25, 0.75], dtype=late.dtype, device=late.device)
    q1, q3 = torch.quantile(late, quartiles, dim=1, keepdim=True)
    outliers = late > q3 + 1.5 * (q3 - q1)
    count = int(first.shape[1] * top_ratio)
    top = torch.zeros_like(outliers).scatter(1, first.topk(count, dim=1).indices, True)
    return top & ~outliers, outliers


@register_method
@dataclass
class PAINT(Method):
    name = "paint"
    summary = "PAI-style |a| boost on image tokens picked by ViT [CLS] attention (top 25% at layer 0, late outliers)"
    reported = "in-context hallucination (CHAIR) down (LLaVA-1.5)"
    prefill_edits_last_row_as_decoding = True
    captured = PerThread(dict)  # the calling thread's last vision-tower [CLS] attentions

    top: float = 0.7
    outlier: float = 0.3
    top_ratio: float = 0.25
    layers: str = ""  # default 2..L-1

    def bind(self, engine) -> None:
        if not engine.adapter.cls_patch_tokens:
            raise ValueError(
                "paint: needs a CLIP vision tower with a [CLS] token whose patches are the image tokens (families: "
                f"{families_with(lambda adapter: adapter.cls_patch_tokens)}); this model's tower has none or tiles "
                "its images"
            )
        if self.top < 0 or self.outlier < 0 or not 0 < self.top_ratio <= 1:
            raise ValueError("paint: top and outlier must be >= 0 and top_ratio in (0, 1]")
        self.chosen = parse_layers("paint", self.layers, engine.num_layers, range(2, engine.num_layers))
        # key groups: other, top, outlier
        self.groups = GroupSpec(engine.text_config.num_attention_heads, 3, logit_abs=[0.0, self.top, self.outlier])
        vit_layers = engine.adapter.vision_encoder_layers(engine.model)
        if len(vit_layers) < 2:
            raise ValueError("paint: the vision tower needs at least 2 layers (groups come from layer 0 and L-2)")

        def capture(key):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                with torch.no_grad():
                    self.captured[key] = cls_attention(module, hidden)[:, 1:]

            return hook

        for key, index in (("first", 0), ("late", len(vit_layers) - 2)):
            handle = vit_layers[index].self_attn.register_forward_pre_hook(capture(key), with_kwargs=True)
            engine.add_handle(handle)

    def _groups(self, run) -> torch.Tensor:
        """[B, N] each prompt position's group (0 other, 1 top, 2 outlier), from the last vision-tower call."""
        memory = run.memory(self)
        if "group" in memory:
            return memory["group"]
        layout = run.layout
        images = sum(len(items) for items in layout.images)
        if "first" not in self.captured or self.captured["first"].shape[0] != images:
            raise RuntimeError(f"paint: the vision tower's [CLS] attention for the {images} images was not captured")
        top, outliers = token_groups(self.captured["first"], self.captured["late"], self.top_ratio)
        group_per_image = top.long() + 2 * outliers.long()  # top excludes the outliers
        group = torch.zeros(layout.kind.shape, dtype=torch.long)
        image = 0
        for b, items in enumerate(layout.images):
            for item, tokens in enumerate(items):
                positions = (layout.image_index[b] == item).nonzero().flatten()
                coords = layout.coords[b, positions].cpu()
                cell = coords[:, 0] == 0  # grid cells of the image (not a [CLS] feature)
                patch = coords[cell, 1] * tokens.grid[1] + coords[cell, 2]
                group[b, positions[cell].cpu()] = group_per_image[image, patch].cpu()
                image += 1
        memory["group"] = group
        return group

    def kernel_edit(self, layer, run, prefill):
        if layer not in self.chosen or not has_image(run):
            return None
        return per_run(self, run, "kernel_edit", lambda: KernelEdit(spec=self.groups, groups=self._groups(run),
                                                                   rows=last_position(run.layout)))  # fmt: skip
