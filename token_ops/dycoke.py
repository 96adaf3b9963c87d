"""DyCoke's temporal token merging (Tao et al., CVPR 2025, "DyCoke: Dynamic Compression of Tokens for Fast Video
Large Language Models"; code github.com/KD-TAO/DyCoke, `dycole_ttm` in llava/model/llava_arch.py), training-free, on
videos before the LLM.

Per video, frames in windows of four: in each pair of frames (0, 1), (2, 3), ... the second frame keeps only the
int((1 - R) * n) of its n tokens least similar (cosine) to the token at the same grid cell of the first frame, and
the first frame stays whole; then in each window starting at frame i (i = 0, 4, ... < frames - 4, the code's loop
bounds) frame i + 2 is instead pruned the same way against frame i. Dropped tokens repeat what the earlier frame
already shows ("merged" into it). Images and tokens outside every frame (LLaVA-OneVision's closing newline) stay.
The second stage of DyCoke (dynamic KV-cache pruning while decoding) is not part of this method.

A frame is one temporal step of the LLM's grid (Qwen: a temporal patch of two frames), as `layout.frame` counts
them. `frames=images`: the images of a sample are the frames of one clip, in prompt order (an image-only model such as
LLaVA-1.5 reading a clip frame by frame, as the testbed's video suite feeds it); each image is one frame, all of one
token count (one grid, no LLaVA-NeXT tiles). The default ratio 0.7 is the code's `merging_ratio`. `variant=code`: the public code's first loop ranks the
tokens of pair i by the similarities of the previous pair (`similarities[(i - 2) // 2]`, the last pair's for the
first); the default uses each pair's own, as the paper describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.method import BEFORE_LLM, Method, Selection
from vlm_efficient.selection import check_drop_ratio, unit_rows
from vlm_efficient.registry import register_method

VARIANTS = ("paper", "code")
FRAMES = ("video", "images")


def least_similar(earlier: torch.Tensor, later: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` cells whose `later` token [n, d] is least cosine-similar to the `earlier` one; ties go
    to the earlier cell."""
    similarity = torch.nn.functional.cosine_similarity(earlier.float(), later.float(), dim=-1)
    return similarity.sort(stable=True).indices[:count]


@register_method
@dataclass
class DyCoke(Method):
    name = "dycoke"
    summary = "video: drop the tokens of a frame that repeat the frame before (DyCoke's temporal merging) before the LLM"

    ratio: float = 0.7
    variant: str = "paper"
    frames: str = "video"  # or "images": a sample's images are the frames of one clip

    def bind(self, engine) -> None:
        check_drop_ratio("dycoke", self.ratio)
        if self.variant not in VARIANTS:
            raise ValueError(f"dycoke: variant={self.variant!r}: use one of {', '.join(VARIANTS)}")
        if self.frames not in FRAMES:
            raise ValueError(f"dycoke: frames={self.frames!r}: use video (a video's frames) or images (a sample's "
                             "images as the frames of one clip)")  # fmt: skip

    def prune_layers(self) -> set[int]:
        return {BEFORE_LLM}

    def select_tokens(self, layer, run, hidden) -> Selection:
        image_index = run.current(run.layout.image_index, fill=-1).to(hidden.device)
        frame = run.current(run.layout.frame, fill=-1).to(hidden.device)
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        visual_kept = None if run.visual_rows is None else list(run.visual_rows)  # counted on the host
        for b, rows in self.clips(run, image_index, frame):
            for f, kept in self.kept_cells([hidden[b, r] for r in rows]).items():
                # index_fill_: an assignment of a Python bool would copy it from the host and wait for the device
                keep[b].index_fill_(0, rows[f], False).index_fill_(0, rows[f][kept], True)
                if visual_kept is not None:
                    visual_kept[b] -= rows[f].numel() - kept.numel()
        return Selection(keep=keep, visual_kept=visual_kept)

    def clips(self, run, image_index, frame) -> list[tuple[int, list[torch.Tensor]]]:
        """[(sample, its frames' token rows (current indices))], one per clip."""
        clips: dict[tuple[int, int], list] = {}
        for b, item, rows in unit_rows(run, image_index, frame):
            tokens = run.layout.images[b][item]
            if tokens.video == (self.frames == "video"):  # frames=images: a sample's images make one clip
                clips.setdefault((b, item if tokens.video else -1), []).append((tokens, rows))

        def one_grid(frames) -> bool:  # one token count, one part (no LLaVA-NeXT tiles)
            return len({t.num_tokens for t, _ in frames}) == 1 and all(len(set(t.coords[:, 0].tolist())) == 1
                                                                      for t, _ in frames)  # fmt: skip

        if self.frames == "images" and not all(one_grid(frames) for frames in clips.values()):
            raise ValueError("dycoke: frames=images needs images of one grid and one size (one token count "
                             "each); give the clip's frames at one resolution, or pass it as a video "
                             "(frames=video)")  # fmt: skip
        return [(b, [rows for _, rows in frames]) for (b, _), frames in clips.items() if len(frames) > 1]

    def kept_cells(self, frames: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """{frame: kept cell indices} for the pruned frames of one video, frames [F] x [n, d]."""
        count = int((1.0 - self.ratio) * frames[0].shape[0])
        pairs = range(0, len(frames) - 1, 2)
        ranked_by = {i: (i if self.variant == "paper" else pairs[(i - 2) // 2]) for i in pairs}
        kept = {i + 1: least_similar(frames[j], frames[j + 1], count) for i, j in ranked_by.items()}
        for i in range(0, len(frames) - 4, 4):
            kept[i + 2] = least_similar(frames[i], frames[i + 2], count)
        return kept
