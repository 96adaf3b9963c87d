"""The per-forward modality layout: which prompt positions are text, image or padding, which image each visual token
belongs to, and each visual token's grid coordinates. Built once at prefill from input_ids and the adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import ImageTokens, ModelAdapter

PAD, TEXT, IMAGE, VIDEO = 0, 1, 2, 3


@dataclass
class ModalityLayout:
    """All tensors are indexed by ORIGINAL prompt position [B, N] and live on the input_ids device."""

    kind: torch.Tensor  # PAD / TEXT / IMAGE / VIDEO
    image_index: torch.Tensor  # index of the visual item within its sample, -1 elsewhere
    coords: torch.Tensor  # [B, N, 3] (part, row, col), -1 for text and padding
    images: list[list[ImageTokens]]  # per sample, its visual items in prompt order
    has_visual: bool  # any visual token in the batch (known on the host: asking the device would be a sync)
    padded: bool  # any padding position

    @property
    def batch_size(self) -> int:
        return self.kind.shape[0]

    @property
    def length(self) -> int:
        return self.kind.shape[1]

    @property
    def visual(self) -> torch.Tensor:
        return (self.kind == IMAGE) | (self.kind == VIDEO)

    @property
    def text(self) -> torch.Tensor:
        return self.kind == TEXT

    @property
    def valid(self) -> torch.Tensor:
        return self.kind != PAD

    @property
    def num_visual(self) -> torch.Tensor:
        return self.visual.sum(1)

    @property
    def last_visual_position(self) -> torch.Tensor:
        """[B] position of the last visual token (-1 where a sample has none)."""
        positions = torch.arange(self.length, device=self.kind.device).expand_as(self.kind)
        return torch.where(self.visual, positions, -1).amax(1)

    @property
    def after_visual_text(self) -> torch.Tensor:
        """Text after the last visual token: the instruction / question span."""
        positions = torch.arange(self.length, device=self.kind.device)
        return self.text & (positions[None, :] > self.last_visual_position[:, None])

    @property
    def before_visual_text(self) -> torch.Tensor:
        positions = torch.arange(self.length, device=self.kind.device)
        first = torch.where(self.visual, positions, self.length).amin(1)
        return self.text & (positions[None, :] < first[:, None])


def build_layout(
    adapter: ModelAdapter, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, inputs: dict
) -> ModalityLayout:
    """Assign every visual placeholder token to its image (or video) and grid cell.

    Visual tokens are matched to the adapter's per-image token lists in batch order; an image may not straddle two
    samples, and the counts must agree exactly: any mismatch is an error, never silently ignored."""
    batch, length = input_ids.shape
    device = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    kind = torch.where(valid, TEXT, PAD)
    image_index = torch.full_like(input_ids, -1)
    coords = torch.full((batch, length, 3), -1, dtype=torch.long, device=device)
    images: list[list[ImageTokens]] = [[] for _ in range(batch)]
    padded = attention_mask is not None and not bool(valid.all())
    has_visual = False

    streams = [(IMAGE, adapter.image_token_id(model), None)]
    video_id = adapter.video_token_id(model)
    if video_id is not None:
        streams.append((VIDEO, video_id, adapter.video_tokens(model, inputs)))
    for modality, token_id, items in streams:
        is_token = (input_ids == token_id) & valid
        total = int(is_token.sum())
        if items is None:
            items = adapter.image_tokens(model, inputs)
        expected = sum(item.num_tokens for item in items)
        if expected != total:
            name = "image" if modality == IMAGE else "video"
            raise ValueError(
                f"{total} {name} placeholder tokens in input_ids but the {name} inputs describe {expected} "
                f"({len(items)} {name}s). Build the inputs with the model's processor, one placeholder per {name}, "
                f"and pass every {name}'s pixel values."
            )
        if not total:
            continue
        has_visual = True
        batch_idx, pos_idx = is_token.nonzero(as_tuple=True)  # row-major: sample by sample, in prompt order
        start = 0
        for item in items:
            end = start + item.num_tokens
            b = batch_idx[start:end]
            if bool((b != b[0]).any()):
                raise ValueError(
                    f"A {item.num_tokens}-token {'image' if modality == IMAGE else 'video'} straddles two samples: "
                    "the number of placeholders per sample does not match the images given to that sample."
                )
            p = pos_idx[start:end]
            sample = int(b[0])
            kind[sample, p] = modality
            image_index[sample, p] = len(images[sample])
            coords[sample, p] = item.coords.to(device)
            images[sample].append(item)
            start = end
    return ModalityLayout(kind=kind, image_index=image_index, coords=coords, images=images, has_visual=has_visual,
                          padded=padded)
