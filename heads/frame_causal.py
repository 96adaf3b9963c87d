"""Frame-wise block-causal attention (TC-LLaVA: Gao et al., 2024, "TC-LLaVA: Rethinking the Transfer from Image to
Video Understanding with Temporal Considerations", arXiv 2409.03206): a visual token attends to every token of its
own frame, the later ones too, and, causally, to everything before its frame (earlier frames and text). Text rows stay
causal, so the blocks are the frames and the prompt stays causal between them.

Frames: each image is one frame (all its tokens: a LLaVA-NeXT base image, its high-resolution tiles and row newlines
together); a video's frame is its temporal index (layout coords part). Prefill only (AttentionEdit.allow): decoding
rows are generated text, after every frame, and read the frames' keys and values as the prefill computed them.

TC-LLaVA trains with this mask (and with its temporal-aware dual RoPE, not implemented here); training-free it changes
what the model was trained on: measure it.

Kernels: where every sample has at most one frame made of one image grid (LLaVA-1.5, Qwen images, a one-frame video)
the rule is kernel 1's neighbour window with a window wider than any grid and no causality inside it (MaskSpec); with
several frames per sample (earlier frames visible, which the window rule blocks) or a LLaVA-NeXT image (several grid
parts, each its own id for the kernel) the layer runs the dense path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.kernels.api import MaskSpec
from vlm_efficient.layout import VIDEO
from vlm_efficient.method import AttentionEdit, at_positions

from .common import PrefillMask, has_image
from vlm_efficient.registry import register_method

WHOLE_GRID = 1 << 20  # a window radius wider than any grid: the window is the whole image


def frame_ids(layout) -> torch.Tensor:
    """[B, N] one id per frame (-1 for text and padding): the visual item, and for videos its frame index."""
    frame = torch.where(layout.kind == VIDEO, layout.coords[..., 0].clamp(min=0) + 1, 0)
    return torch.where(layout.visual, layout.image_index * WHOLE_GRID + frame, -1)


@register_method
@dataclass
class FrameCausal(PrefillMask):
    name = "frame_causal"
    summary = "mask: visual tokens see every token of their own frame and everything before it (TC-LLaVA)"

    def attention_edit(self, layer, run, context):
        """Where mask_spec has no form (several frames, or grid parts, in a sample): the frames as added pairs."""
        if not context.prefill or layer not in self.chosen or not has_image(run):
            return None
        memory = run.memory(self)
        if "frames" not in memory:
            memory["frames"] = frame_ids(run.layout)
        q_frame = at_positions(memory["frames"], context.query_positions, -1)[:, :, None]
        k_frame = at_positions(memory["frames"], context.key_positions, -1)[:, None, :]
        later = context.key_positions[:, None, :] > context.query_positions[:, :, None]
        return AttentionEdit(allow=((q_frame == k_frame) & (q_frame >= 0) & later)[:, None])

    def mask_spec(self, run):
        one_grid = all(
            len(items) <= 1 and all(item.coords[:, 0].min() == item.coords[:, 0].max() >= 0 for item in items)
            for items in run.layout.images
        )
        return MaskSpec.neighbor_window(WHOLE_GRID, WHOLE_GRID, causal_window=False) if one_grid else None
