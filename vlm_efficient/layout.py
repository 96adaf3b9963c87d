"""The per-forward modality layout: which prompt positions are text, image or padding, which image each visual token
belongs to, and each visual token's grid coordinates. Built once at prefill from input_ids and the adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import ImageTokens, ModelAdapter

PAD, TEXT, IMAGE, VIDEO = 0, 1, 2, 3


def host_to(values: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the device's queue (pinned memory, an asynchronous copy): a
    copy from pageable memory waits for the stream's earlier work, which at batch 1 is the host's whole lead."""
    if torch.device(device).type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def at_positions(per_position: torch.Tensor, positions: torch.Tensor, fill) -> torch.Tensor:
    """per_position [B, N, ...] (a prompt property, e.g. layout.visual) at original positions [B, n] -> [B, n, ...] on
    positions' device; positions outside the prompt (-1 slot padding, generated tokens) get `fill`."""
    per_position = per_position.to(positions.device)
    length = per_position.shape[1]
    trailing = [1] * (per_position.dim() - 2)
    index = positions.clamp(0, length - 1).view(*positions.shape, *trailing)
    values = per_position.gather(1, index.expand(*positions.shape, *per_position.shape[2:]))
    inside = (positions >= 0) & (positions < length)
    return torch.where(inside.view(*positions.shape, *trailing), values, fill)


@dataclass
class ModalityLayout:
    """All tensors are indexed by ORIGINAL prompt position [B, N] and live on the input_ids device."""

    kind: torch.Tensor  # PAD / TEXT / IMAGE / VIDEO
    image_index: torch.Tensor  # index of the visual item within its sample, -1 elsewhere
    coords: torch.Tensor  # [B, N, 3] (part, row, col), -1 for text and padding
    images: list[list[ImageTokens]]  # per sample, its visual items in prompt order
    has_visual: bool  # any visual token in the batch (known on the host: asking the device would be a sync)
    padded: bool  # any padding position
    after_visual_text_counts: list[int] | None = None  # per sample, after_visual_text's positions, known on the host

    @property
    def batch_size(self) -> int:
        return self.kind.shape[0]

    @property
    def length(self) -> int:
        return self.kind.shape[1]

    @property
    def visual(self) -> torch.Tensor:
        return (self.kind == IMAGE) | (self.kind == VIDEO)

    def image_index_at(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, n]: the image index of the image tokens at original positions [B, n], -1 for every other position."""
        return at_positions(torch.where(self.kind == IMAGE, self.image_index, -1), positions, -1)

    @property
    def frame(self) -> torch.Tensor:
        """[B, N] frame index of each video token within its video, -1 elsewhere."""
        return torch.where(self.kind == VIDEO, self.coords[..., 0], -1)

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
    def visual_counts(self) -> list[int]:
        """Each sample's visual tokens, known on the host (its items' token counts)."""
        return [sum(item.num_tokens for item in items) for items in self.images]

    @property
    def last_visual_position(self) -> torch.Tensor:
        """[B] position of the last visual token (-1 where a sample has none)."""
        positions = torch.arange(self.length, device=self.kind.device).expand_as(self.kind)
        return torch.where(self.visual, positions, -1).amax(1)

    @property
    def after_visual_text(self) -> torch.Tensor:
        """Text after the last visual token: the instruction / question span."""
        return text_after_last_visual(self.text, self.visual)

    @property
    def before_visual_text(self) -> torch.Tensor:
        positions = torch.arange(self.length, device=self.kind.device)
        first = torch.where(self.visual, positions, self.length).amin(1)
        return self.text & (positions[None, :] < first[:, None])


def text_after_last_visual(text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """[B, N]: the `text` positions after each sample's last `visual` one (every text position where it has none)."""
    positions = torch.arange(text.shape[1], device=text.device)
    last = torch.where(visual, positions, -1).amax(1, keepdim=True)
    return text & (positions > last)


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
    has_visual = False

    streams = [(IMAGE, adapter.image_token_id(model), None)]
    video_id = adapter.video_token_id(model)
    if video_id is not None:
        streams.append((VIDEO, video_id, adapter.video_tokens(model, inputs)))
    is_tokens = [(input_ids == token_id) & valid for _, token_id, _ in streams]
    visual = torch.stack(is_tokens).any(0)
    after_visual_text = text_after_last_visual(valid & ~visual, visual)
    # the layout's one host read: each stream's placeholders, the text after the last visual token and the real
    # tokens, per sample
    *stream_counts, after_visual_counts, valid_counts = torch.stack(
        [*(is_token.sum(1) for is_token in is_tokens), after_visual_text.sum(1), valid.sum(1)]).tolist()
    padded = attention_mask is not None and min(valid_counts) < length
    for (modality, token_id, items), is_token, per_sample in zip(streams, is_tokens, stream_counts):
        total = sum(per_sample)
        if items is None:
            items = adapter.image_tokens(model, inputs)
        expected = sum(item.num_tokens for item in items)
        name = "image" if modality == IMAGE else "video"
        if expected != total:
            raise ValueError(
                f"{total} {name} placeholder tokens in input_ids but the {name} inputs describe {expected} "
                f"({len(items)} {name}s). Build the inputs with the model's processor, one placeholder per {name}, "
                f"and pass every {name}'s pixel values."
            )
        if not total:
            continue
        has_visual = True
        # items take the placeholders in batch order, sample by sample; each must fit in what its sample has left
        number = []  # each item's index within its sample
        sample, left = 0, per_sample[0]
        for item in items:
            while left == 0:
                sample += 1
                left = per_sample[sample]
            if item.num_tokens > left:
                raise ValueError(
                    f"A {item.num_tokens}-token {name} straddles two samples: the number of placeholders per sample "
                    "does not match the images given to that sample."
                )
            number.append(len(images[sample]))
            images[sample].append(item)
            left -= item.num_tokens
        # the k-th placeholder of the batch (row-major) is token k of the items' concatenation
        sizes = torch.tensor([item.num_tokens for item in items])
        token_number = torch.repeat_interleave(torch.tensor(number), sizes)
        token_coords = torch.cat([item.coords for item in items])
        rank = (is_token.flatten().long().cumsum(0) - 1).clamp(min=0).view(batch, length)
        on_device = host_to(torch.cat([token_number[:, None], token_coords], dim=1), device)  # one copy, no wait
        kind = torch.where(is_token, modality, kind)
        image_index = torch.where(is_token, on_device[rank, 0], image_index)
        coords = torch.where(is_token[..., None], on_device[rank, 1:], coords)
    return ModalityLayout(kind=kind, image_index=image_index, coords=coords, images=images, has_visual=has_visual,
                          padded=padded, after_visual_text_counts=after_visual_counts)
