"""Model adapters: everything that differs between VLM families, in one table keyed by `config.model_type`.

An adapter answers: where the decoder layers are, which token ids are visual, how the visual tokens of each image
are laid out on a 2-D grid, and how the vision tower is read (its attention, [CLS] token, tiles and token order).
Methods never look at `model_type`; they ask the adapter, and its capability flags say which families can serve them
(`families_with` names those in a refusal).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ImageTokens:
    """The LLM tokens of one image, in the order they appear in the prompt.

    `coords` is [n, 3] (part, row, col): part 0 is the image (LLaVA-NeXT: its base thumbnail), part 1 the LLaVA-NeXT
    high-resolution grid, part -1 a token with no grid cell (a LLaVA-NeXT newline, a [CLS] feature). For videos
    (`video`) part is the frame index (one frame per temporal patch) and (row, col) the cell in that frame's grid."""

    coords: torch.Tensor
    grid: tuple[int, int]  # (rows, cols) of part 0 (of every frame of a video)
    video: bool = False

    @property
    def units(self) -> list[int]:
        """The parts that methods choosing "per image" treat as one image each: every frame of a video; an image is
        one unit whatever its parts (LLaVA-NeXT's base and high-resolution grid are one image)."""
        return sorted(set(self.coords[:, 0].tolist()) - {-1}) if self.video else [-1]

    @property
    def num_tokens(self) -> int:
        return self.coords.shape[0]


def _row_major(rows: int, cols: int, part: int = 0) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.full_like(r, part), r, c], dim=-1).reshape(-1, 3)


@dataclass(frozen=True)
class VisionTower:
    """The vision tower as the methods that read its attention see it (ModelAdapter.vision_tower_attention).

    CLIP towers (`projector` set): the tower encodes tiles (an image, or LLaVA-NeXT's base image and high-resolution
    tiles), each a [CLS] token and patches; the projector maps each tile's ViT features one to one onto LLM features,
    which the model then packs into the image's LLM tokens. Qwen towers (`projector` None): the tower attends within
    each image or video frame and merges `merge` patches into each LLM token itself."""

    tower: nn.Module  # a forward pre-hook on it sees each encoding call (Qwen: its grid_thw argument)
    attention: nn.Module  # the attention layer whose scores the methods read
    has_cls: bool  # the rows start with a [CLS] token: scores are its attention row; else the attention received
    cls_feature: bool  # the LLM gets the [CLS] feature too (vision_feature_select_strategy 'full')
    merge: int  # patches per LLM token
    projector: nn.Module | None  # ViT features -> LLM features, per tile [T, n, d]; None: the tower projects itself
    tiled: bool  # an image's LLM tokens are several tiles' features packed (unpadded, with row newlines)


class ModelAdapter:
    """Base adapter for HF `*ForConditionalGeneration` VLMs whose text model sits at `model.model.language_model`."""

    model_types: tuple[str, ...] = ()
    vision_cls_token: bool = False  # the vision tower has a [CLS] token whose attention methods can read
    cls_patch_tokens: bool = False  # ... and each image's LLM tokens are its patches one to one, row-major (no tiles)
    # the vision tower attends over every image and frame of a call as one packed sequence cut at cu_seqlens, which
    # transformers' SDPA route cuts with a host read per layer (the fast path gives it packed_vision_attention)
    packed_vision_tower: bool = False

    def text_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.text_model(model).layers

    def text_config(self, model: nn.Module):
        return model.config.get_text_config()

    def attention_input(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """What a decoder layer feeds its attention (pre-norm decoders: the input layer norm of the residual)."""
        return layer.input_layernorm(hidden_states)

    def head_output_module(self, layer: nn.Module) -> nn.Module:
        """The module whose input is the per-head attention output (heads concatenated)."""
        return layer.self_attn.o_proj

    def pre_rotary_modules(self, attention: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are the query and key right before rotary position is applied, [B, n, H * d]
        or [B, n, H, d] (Llama-style attention: the projections)."""
        return attention.q_proj, attention.k_proj

    def pre_rotary_heads(self, output: torch.Tensor, rows: int, head_dim: int) -> torch.Tensor:
        """An output of `pre_rotary_modules` (`rows` tokens) as [B, H, rows, d]."""
        return output.reshape(output.shape[0], rows, -1, head_dim).transpose(1, 2)

    def rotary_tables(self, model: nn.Module, layer_idx: int, like: torch.Tensor, positions: torch.Tensor):
        """(cos, sin) [B, n, d] of layer `layer_idx`'s 1-D rotary position at `positions` [B, n], in `like`'s dtype
        (the text model's rotary module, as its forward computes them). Families without a 1-D rotary position
        raise ValueError saying why."""
        return self.text_model(model).rotary_emb(like, positions)

    def image_token_id(self, model: nn.Module) -> int:
        config = model.config
        token_id = getattr(config, "image_token_id", None)
        return token_id if token_id is not None else config.image_token_index

    def video_token_id(self, model: nn.Module) -> int | None:
        return getattr(model.config, "video_token_id", None)

    def image_tokens(self, model: nn.Module, inputs: dict) -> list[ImageTokens]:
        """The token layout of every image of the batch, in batch order.

        `inputs` are the forward kwargs: either raw pixels (pixel_values, image_sizes / image_grid_thw) or, as
        transformers >= 5.2x's generate() passes them, pre-encoded `mm_encoder_outputs` (then the engine adds what
        its vision-tower hook captured under "captured_grid_thw")."""
        raise NotImplementedError

    def video_tokens(self, model: nn.Module, inputs: dict) -> list[ImageTokens]:
        return []

    def mask_group(self, model: nn.Module, layer_idx: int) -> str | None:
        """None where the layer's mask is causality and padding only; else a name shared by the layers whose masks
        are alike (they share one computed mask)."""
        return None

    def layer_mask(self, model: nn.Module, layer_idx: int, allowed: torch.Tensor, queries: torch.Tensor,
                   keys: torch.Tensor, layout) -> torch.Tensor:  # fmt: skip
        """The mask [B, 1, q, kv] of layer layer_idx for rows at original positions queries [B, q] and keys [B, kv]
        (-1: slot padding), given its causal + padding part `allowed`: families whose masks have more structure
        (mask_group not None) add it here."""
        return allowed

    def vision_tower_attention(self, model: nn.Module, reader: str) -> VisionTower:
        """The vision tower's attention layer that `reader` (a method's name, for errors) scores tokens by."""
        raise ValueError(f"{reader}: no vision-tower attention capture for this model's family; families with one: "
                         f"{families_with(_reads_vision_attention)}")  # fmt: skip

    def vision_encoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The vision tower's encoder layers (CLIP towers)."""
        raise ValueError(f"this model's vision tower has no CLIP encoder layers; families with them: "
                         f"{families_with(lambda adapter: adapter.vision_cls_token)}")  # fmt: skip

    def vision_token_order(self, model: nn.Module, vision: VisionTower, grid: torch.Tensor) -> list[torch.Tensor]:
        """Per frame of each grid row (t, h, w) of a call of the tower `vision` (an image is one frame): for each LLM
        token of the frame, in LLM order, its row in the tower's (merged) output of the frame."""
        return [torch.arange(int(h * w) // vision.merge) for t, h, w in grid.tolist() for _ in range(int(t))]

    def vision_attention_implementation(self, model: nn.Module) -> str:
        """The attention implementation the vision tower runs (its config's)."""
        return model.config.vision_config._attn_implementation

    def set_vision_attention_implementation(self, model: nn.Module, name: str) -> None:
        """Run the vision tower's attention through the registered implementation `name` (the text model's stays)."""
        model.set_attn_implementation({"vision_config": name})

    def vision_capture_module(self, model: nn.Module) -> nn.Module | None:
        """A module whose call reveals per-image grid sizes (its `grid_thw` argument), or None."""
        return None

    def on_text_model_call(self, kwargs: dict, run) -> None:
        """Take over any per-layer visual injection the text model would do on full-length tensors."""

    def after_decoder_layer(self, layer_idx: int, hidden_states: torch.Tensor, run) -> torch.Tensor:
        return hidden_states

    def acts_after_layer(self, layer_idx: int, run) -> bool:
        """Whether after_decoder_layer changes layer `layer_idx`'s output in this call."""
        return False


# transformers 5.25 renamed the forward kwarg `past_key_values` (and the outputs' field) to `cache`; the old name
# stays a deprecated alias until 5.40. Both ends of the supported range are read through these two.
CACHE_KWARGS = ("cache", "past_key_values")


def kv_cache(inputs: dict):
    """The KV cache a forward call received, under whichever name the caller used (None if none)."""
    return next((inputs[name] for name in CACHE_KWARGS if inputs.get(name) is not None), None)


def cache_kwarg(model: nn.Module) -> str:
    """The name `model.forward` takes its KV cache by (and its output returns it as) in the installed transformers."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def encoded_features(inputs: dict, modality: str = "image") -> list[torch.Tensor] | None:
    """Per-image feature tensors that generate() computed before prefill, if any."""
    encoded = (inputs.get("mm_encoder_outputs") or {}).get(modality)
    if encoded is None:
        return None
    features = encoded.pooler_output
    return list(features) if isinstance(features, (list, tuple)) else None


def encoded_sources(features: list[torch.Tensor]) -> list[int]:
    """For each pre-encoded image feature, the index of the image the vision tower encoded. generate() repeats each
    sample's list of per-image tensors (the same tensor objects again) for beam search and num_return_sequences, so
    the first occurrences of the tensors, in order, are the encoded images."""
    first: dict[int, int] = {}
    return [first.setdefault(id(feature), len(first)) for feature in features]


def _expanded_grid(grid: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
    """The vision tower's grid rows for features that generate() repeated (encoded_sources)."""
    sources = encoded_sources(features)
    if max(sources) + 1 != grid.shape[0]:
        raise ValueError(
            f"{len(features)} encoded images reached the prefill but the vision tower encoded {grid.shape[0]}: pass "
            "the image grids with the pixel values, as the model's processor builds them"
        )
    return grid[sources]


def _clip_encoder_layers(model: nn.Module) -> nn.ModuleList:
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers  # transformers 5.17 nests it


def _clip_tower_attention(model: nn.Module, reader: str, tiled: bool) -> VisionTower:
    """LLaVA's CLIP tower: the layer that produces the LLM's features (vision_feature_layer)."""
    layers = _clip_encoder_layers(model)
    feature_layer = model.config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(f"{reader}: needs a single vision_feature_layer, this model uses {feature_layer}")
    index = feature_layer + len(layers) if feature_layer < 0 else feature_layer - 1
    if not 0 <= index < len(layers):
        raise ValueError(f"{reader}: vision_feature_layer={feature_layer} has no attention layer")
    return VisionTower(tower=model.model.vision_tower, attention=layers[index].self_attn, has_cls=True,
                       cls_feature=model.config.vision_feature_select_strategy == "full", merge=1,
                       projector=model.model.multi_modal_projector, tiled=tiled)  # fmt: skip


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5: every image gives the same square grid of patch features (after [CLS] with strategy 'full')."""

    model_types = ("llava",)
    vision_cls_token = True
    cls_patch_tokens = True

    def vision_encoder_layers(self, model):
        return _clip_encoder_layers(model)

    def vision_tower_attention(self, model, reader):
        return _clip_tower_attention(model, reader, tiled=False)

    def image_tokens(self, model, inputs):
        pixel_values = inputs.get("pixel_values")
        encoded = encoded_features(inputs)
        if pixel_values is not None:
            num_images = pixel_values.shape[0]
        else:
            num_images = 0 if encoded is None else len(encoded)
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        coords = _row_major(side, side)
        if model.config.vision_feature_select_strategy == "full":  # the [CLS] feature comes first
            coords = torch.cat([torch.tensor([[-1, -1, -1]]), coords])
        return [ImageTokens(coords, (side, side)) for _ in range(num_images)]


class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT (anyres): a base thumbnail grid, then the unpadded high-resolution grid with a newline token
    closing each row. The layout is read off the model's own `pack_image_features` applied to coordinate
    "features", so it follows the installed transformers exactly."""

    model_types = ("llava_next",)
    vision_cls_token = True

    def vision_encoder_layers(self, model):
        return _clip_encoder_layers(model)

    def vision_tower_attention(self, model, reader):
        if model.config.vision_feature_select_strategy != "default":
            raise ValueError(f"{reader}: LLaVA-NeXT with vision_feature_select_strategy='full' is unsupported")
        return _clip_tower_attention(model, reader, tiled=True)

    def image_tokens(self, model, inputs):
        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        if inputs.get("pixel_values") is not None and inputs.get("image_sizes") is not None:
            return self._from_image_sizes(model, inputs["image_sizes"], side)
        encoded = encoded_features(inputs)
        return [] if encoded is None else [self._from_features(model, f, side) for f in encoded]

    def _from_image_sizes(self, model, image_sizes, side: int) -> list[ImageTokens]:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        config = model.config
        base = _row_major(side, side).float()
        features = []
        for size in image_sizes:
            num_patches = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            _, patch_cols = get_anyres_image_grid_shape(
                size, config.image_grid_pinpoints, config.vision_config.image_size
            )
            tiles = [base]
            for p in range(num_patches - 1):
                pr, pc = divmod(p, patch_cols)
                tile = base.clone()
                tile[:, 0] = 1
                tile[:, 1] += pr * side
                tile[:, 2] += pc * side
                tiles.append(tile)
            features.append(torch.stack(tiles))
        newline = torch.full((3,), -1.0)
        packed, lengths = model.model.pack_image_features(
            features, image_sizes, config.vision_feature_select_strategy, image_newline=newline
        )
        # transformers returns one tensor (older) or a list of per-image tensors (newer)
        chunks = packed if isinstance(packed, (list, tuple)) else torch.split(packed, list(map(int, lengths)))
        return [ImageTokens(chunk.round().long(), (side, side)) for chunk in chunks]

    def _from_features(self, model, feature: torch.Tensor, side: int) -> ImageTokens:
        """Pre-encoded features carry no image size; the rows of the unpadded high-resolution grid are found from
        the model's newline embedding, which closes each row."""
        base = _row_major(side, side)
        rest = feature[side * side :]
        newline = model.model.image_newline.to(rest.device, rest.dtype)
        is_newline = (rest == newline).all(-1)
        rows = int(is_newline.sum())
        if rows == 0:
            if rest.shape[0]:
                raise ValueError("LLaVA-NeXT features without newline tokens: pass image_sizes with pixel_values")
            return ImageTokens(base, (side, side))
        cols = rest.shape[0] // rows - 1
        expected = torch.zeros(rows, cols + 1, dtype=torch.bool, device=rest.device)
        expected[:, -1] = True
        if rest.shape[0] != rows * (cols + 1) or not torch.equal(is_newline, expected.flatten()):
            raise ValueError("LLaVA-NeXT features do not form rows closed by newlines: pass image_sizes instead")
        high = _row_major(rows, cols + 1, part=1)
        high[high[:, 2] == cols] = -1
        return ImageTokens(torch.cat([base, high]), (side, side))


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: LLaVA-NeXT's anyres layout (base grid, then the unpadded high-resolution grid with a newline
    closing each row, bilinearly shrunk when larger than anyres_max_N tiles) for a sample's single image; in a sample
    with several images each image is its base grid and one newline. A video is every frame's grid pooled 2x2
    (bilinear, ceil(side / 2) per side), frame after frame, then one newline.

    The image layout is read off the model's own `pack_image_features` applied to zero "features" with a ones
    newline (the shrinking mixes cells, so the rows are found from the newlines, as for pre-encoded features)."""

    model_types = ("llava_onevision",)
    vision_cls_token = False  # a SigLIP tower: no [CLS], and no attention capture wired (LLaVA-NeXT's CLIP access does not apply)
    vision_encoder_layers = ModelAdapter.vision_encoder_layers
    vision_tower_attention = ModelAdapter.vision_tower_attention

    def image_tokens(self, model, inputs):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        sizes = inputs.get("image_sizes")
        if inputs.get("pixel_values") is None or sizes is None:
            encoded = encoded_features(inputs)
            return [] if encoded is None else [self._from_features(model, f, side) for f in encoded]
        per_sample = inputs.get("batch_num_images")
        tiled = [True] * len(sizes) if per_sample is None else [n == 1 for n in per_sample.tolist() for _ in range(n)]
        tile = config.vision_config.image_size
        features = [torch.zeros(image_size_to_num_patches(size, config.image_grid_pinpoints, tile) if tiles else 1,
                                side * side, 1) for size, tiles in zip(sizes, tiled)]  # fmt: skip
        packed, _ = model.model.pack_image_features(
            features, sizes, image_newline=torch.ones(1), vision_aspect_ratio=config.vision_aspect_ratio
        )
        return [self._from_newlines(chunk[:, 0] == 1, side) for chunk in packed]

    def _from_features(self, model, feature, side):
        newline = model.model.image_newline.to(feature.device, feature.dtype)
        return self._from_newlines((feature == newline).all(-1).cpu(), side)

    @staticmethod
    def _from_newlines(is_newline: torch.Tensor, side: int) -> ImageTokens:
        """The base grid, then rows of the high-resolution grid each closed by a newline (a single newline when the
        image has no high-resolution grid)."""
        base = _row_major(side, side)
        rest = is_newline[side * side :]
        rows = int(rest.sum())
        cols = rest.shape[0] // max(rows, 1) - 1
        expected = torch.zeros(rows, cols + 1, dtype=torch.bool)
        expected[:, -1] = True
        if rows == 0 or rest.shape[0] != rows * (cols + 1) or not torch.equal(rest, expected.flatten()):
            raise ValueError("LLaVA-OneVision image features do not form rows closed by newlines: pass image_sizes "
                             "and batch_num_images with pixel_values, as the processor builds them")  # fmt: skip
        high = _row_major(rows, cols + 1, part=1)
        high[high[:, 2] == cols] = -1
        return ImageTokens(torch.cat([base, high]), (side, side))

    def video_tokens(self, model, inputs):
        vision = model.config.vision_config
        pooled = math.ceil(vision.image_size // vision.patch_size / 2)
        pixels = inputs.get("pixel_values_videos")
        if pixels is not None:
            clips = [pixels.shape[1]] * pixels.shape[0]
        else:
            encoded = (inputs.get("mm_encoder_outputs") or {}).get("video")
            if encoded is None:
                return []
            features = encoded.pooler_output  # [videos, frames * pooled^2 + 1, d]
            clips = [(features.shape[1] - 1) // (pooled * pooled)] * features.shape[0]
        newline = torch.tensor([[-1, -1, -1]])
        return [ImageTokens(torch.cat([_row_major(pooled, pooled, part=f) for f in range(frames)] + [newline]),
                            (pooled, pooled), video=True) for frames in clips]  # fmt: skip


class Gemma3Adapter(ModelAdapter):
    """Gemma3: each image is the SigLIP grid average-pooled to mm_tokens_per_image tokens (a square grid) between
    begin- and end-of-image tokens. Its decoder alternates sliding-window and full-attention layers (one mask per
    layer type, each passed to its layers), and image tokens attend to their whole image (a bidirectional block in
    the mask, from token_type_ids): the engine works on whichever mask a layer receives."""

    model_types = ("gemma3",)

    def pre_rotary_modules(self, attention):
        """Gemma3 normalises each head's query and key (q_norm / k_norm) after the projection and BEFORE rotary."""
        return attention.q_norm, attention.k_norm

    def pre_rotary_heads(self, output, rows, head_dim):
        """Gemma3's q_norm / k_norm run on the heads-first layout [B, H, n, d] already."""
        return output

    def mask_group(self, model, layer_idx):
        return self.text_config(model).layer_types[layer_idx]

    def rotary_tables(self, model, layer_idx, like, positions):
        """Sliding-window and full-attention layers rotate with their own bases (one table per layer type)."""
        layer_type = self.text_config(model).layer_types[layer_idx]
        return self.text_model(model).rotary_emb(like, positions, layer_type)

    def layer_mask(self, model, layer_idx, allowed, queries, keys, layout):
        """As Gemma3's create_masks_for_vision_model: full layers OR(causal, same image), sliding layers
        AND(window, OR(causal, same image)), padding masked; the window counts original positions."""
        image_q, image_k = layout.image_index_at(queries), layout.image_index_at(keys)
        same_image = (image_q[:, :, None] == image_k[:, None, :]) & (image_q[:, :, None] >= 0)
        allowed = allowed | same_image[:, None]
        if self.text_config(model).layer_types[layer_idx] == "sliding_attention":
            window = self.text_config(model).sliding_window
            allowed = allowed & (keys[:, None, :] > queries[:, :, None] - window)[:, None]
        return allowed

    def image_tokens(self, model, inputs):
        side = math.isqrt(model.config.mm_tokens_per_image)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            num_images = pixel_values.shape[0]
        else:
            encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
            num_images = 0 if encoded is None else len(encoded.pooler_output)
        return [ImageTokens(_row_major(side, side), (side, side)) for _ in range(num_images)]


class Idefics3Adapter(ModelAdapter):
    """Idefics3 (SmolVLM's architecture): a large image is split into rows x cols tiles plus the global (downscaled)
    image; each is encoded alone and pixel-shuffled into a side x side grid of LLM tokens. In the prompt each tile is
    `<fake_token_around_image><row_r_col_c>` + its tokens, a newline closes each row of tiles, and the global image
    comes last: `<fake_token_around_image><global-img>` + its tokens + `<fake_token_around_image>` (a small image has
    the global image only). Layout: part 0 is the global image, part 1 the tiles' joint grid (LLaVA-NeXT's
    convention: row r*side + i, column c*side + j).

    The config names neither marker token, so the tiles are read off input_ids by the processor's pattern: every
    token run is preceded by the fake token and a marker; a tile is followed by the next tile's (fake, marker, image
    token) or by a row's newline; the global image by a fake token that no (marker, image token) follows."""

    model_types = ("idefics3",)

    def text_model(self, model):
        return model.model.text_model

    def image_tokens(self, model, inputs):
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError("Idefics3: the image layout is read off input_ids; pass input_ids")
        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
        items = []
        for ids in input_ids.tolist():
            runs = _token_runs(ids, config.image_token_id)
            fake = ids[runs[0][0] - 2] if runs else None
            tiles = []
            for start, end in runs:
                if end - start != side * side or ids[start - 2] != fake:
                    raise ValueError(f"Idefics3: image tokens at {start}..{end} do not follow the processor's pattern "
                                     f"(runs of {side * side} tokens after <fake_token_around_image> and a marker): "
                                     "build the prompt with the model's processor")  # fmt: skip
                follow = ids[end : end + 3]
                is_tile = follow[:1] != [fake] or (len(follow) == 3 and follow[2] == config.image_token_id)
                if is_tile:
                    tiles.append(end)
                    continue
                items.append(self._image(tiles, ids, side, fake))
                tiles = []
            if tiles:
                raise ValueError("Idefics3: image tiles without their global image: build the prompt with the processor")
        return items

    @staticmethod
    def _image(tiles: list[int], ids: list[int], side: int, fake: int) -> ImageTokens:
        """The tiles (their runs' ends, in prompt order), then the global image."""
        cols = next((k + 1 for k, end in enumerate(tiles) if ids[end] != fake), len(tiles))
        parts = []
        for k in range(len(tiles)):
            tile = _row_major(side, side, part=1)
            tile[:, 1] += (k // cols) * side
            tile[:, 2] += (k % cols) * side
            parts.append(tile)
        return ImageTokens(torch.cat(parts + [_row_major(side, side)]), (side, side))


def _token_runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of `token` in ids."""
    runs, start = [], None
    for i, value in enumerate(ids + [None]):
        if value == token and start is None:
            start = i
        elif value != token and start is not None:
            runs.append((start, i))
            start = None
    return runs


class QwenVLAdapter(ModelAdapter):
    """Qwen2-VL: dynamic resolution; each image is a (t, h, w) patch grid merged spatial_merge_size^2 patches to one
    LLM token."""

    model_types = ("qwen2_vl",)
    packed_vision_tower = True

    def _merge(self, model) -> int:
        return model.config.vision_config.spatial_merge_size

    def _grid_tokens(self, model, grid_thw, video: bool) -> list[ImageTokens]:
        if grid_thw is None:
            return []
        merge = self._merge(model)
        out = []
        for t, h, w in grid_thw.tolist():
            rows, cols = h // merge, w // merge
            coords = torch.cat([_row_major(rows, cols, part=frame) for frame in range(t)])
            out.append(ImageTokens(coords, (rows, cols), video=video))
        return out

    def image_tokens(self, model, inputs):
        return self._grid_tokens(model, self._grid(inputs, "image"), video=False)

    def rotary_tables(self, model, layer_idx, like, positions):
        raise ValueError(
            "Qwen's M-RoPE is 3-D: its position is (time, height, width) with the time axis already on its own "
            "rotary channels, so there is no 1-D rotary position to add a second one to"
        )

    def video_tokens(self, model, inputs):
        return self._grid_tokens(model, self._grid(inputs, "video"), video=True)

    def _grid(self, inputs: dict, modality: str) -> torch.Tensor | None:
        grid = inputs.get(f"{modality}_grid_thw")
        features = encoded_features(inputs, modality)
        if grid is None and features is not None:
            grid = inputs.get("captured_grid_thw", {}).get(modality)
            if grid is not None and len(features) != grid.shape[0]:
                grid = _expanded_grid(grid, features)
        return grid

    def vision_capture_module(self, model):
        return model.model.visual

    def vision_tower_attention(self, model, reader):
        """The last block; the tower has no [CLS] token, so scores are the attention each patch receives."""
        visual = model.model.visual
        return VisionTower(tower=visual, attention=visual.blocks[-1].attn, has_cls=False, cls_feature=False,
                           merge=visual.spatial_merge_size**2, projector=None, tiled=False)  # fmt: skip


class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: Qwen2-VL's layout; its vision tower attends within windows in most blocks, on tokens it reorders
    window by window."""

    model_types = ("qwen2_5_vl",)

    def vision_tower_attention(self, model, reader):
        visual = model.model.visual
        if len(visual.blocks) - 1 not in visual.fullatt_block_indexes:
            raise ValueError(f"{reader}: the last Qwen2.5-VL vision block uses window attention")
        return super().vision_tower_attention(model, reader)

    def vision_token_order(self, model, vision, grid):
        """The tower's window order undone (windows never cross a frame)."""
        visual = model.model.visual
        if hasattr(visual, "get_window_index"):  # transformers < 5.2x
            window_index, _ = visual.get_window_index(grid)
        else:
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size,
            )  # fmt: skip
        # window_index[i] = LLM-order token at block row i; each frame's tokens are contiguous in both orders
        orders, start = [], 0
        for t, h, w in grid.tolist():
            n = int(h * w) // vision.merge
            for _ in range(int(t)):
                block = window_index[start : start + n].cpu() - start
                orders.append(torch.argsort(block))
                start += n
        return orders


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL adds deepstack: visual features from several ViT layers are added to the visual tokens' hidden states
    after the first decoder layers. The text model does this on full-length tensors, so the engine takes the
    injection over and applies it to whichever visual tokens are still present."""

    model_types = ("qwen3_vl",)

    def pre_rotary_modules(self, attention):
        """Qwen3 normalises each head's query and key (q_norm / k_norm) after the projection and BEFORE rotary."""
        return attention.q_norm, attention.k_norm

    def on_text_model_call(self, kwargs, run):
        memory = run.memory(self)
        memory["embeds"] = kwargs.pop("deepstack_visual_embeds", None)
        memory["mask"] = kwargs.pop("visual_pos_masks", None)

    def acts_after_layer(self, layer_idx, run):
        embeds = run.memory(self).get("embeds")
        return embeds is not None and layer_idx < len(embeds)

    def after_decoder_layer(self, layer_idx, hidden_states, run):
        if not self.acts_after_layer(layer_idx, run):
            return hidden_states
        memory = run.memory(self)
        embeds, mask = memory["embeds"], memory["mask"].to(hidden_states.device)
        # Row of each original visual token inside the deepstack tensor (visual tokens in row-major order).
        visual_row = torch.cumsum(mask.flatten().long(), 0).view_as(mask) - 1
        positions = run.positions  # original position of each current row, -1 for slot padding
        if positions is not None:
            safe = positions.to(mask.device).clamp(min=0)
            visual_row = visual_row.gather(1, safe)
            mask = mask.gather(1, safe) & (positions.to(mask.device) >= 0)
        rows, present = visual_row[mask], mask
        hidden_states = hidden_states.clone()
        add = embeds[layer_idx].to(hidden_states.device, hidden_states.dtype)[rows]
        hidden_states[present, :] = hidden_states[present, :] + add
        return hidden_states


ADAPTERS: dict[str, ModelAdapter] = {
    model_type: adapter
    for adapter in (LlavaAdapter(), LlavaNextAdapter(), LlavaOnevisionAdapter(), Gemma3Adapter(), Idefics3Adapter(),
                    QwenVLAdapter(), Qwen25VLAdapter(), Qwen3VLAdapter())
    for model_type in adapter.model_types
}


def families_with(capability) -> str:
    """The model types whose adapter has `capability` (a predicate on adapters), for refusals: "llava, llava_next"."""
    return ", ".join(model_type for model_type, adapter in ADAPTERS.items() if capability(adapter))


def _reads_vision_attention(adapter: ModelAdapter) -> bool:
    return type(adapter).vision_tower_attention is not ModelAdapter.vision_tower_attention


def get_adapter(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"vlm_efficient does not support model_type {model_type!r}. Supported: {', '.join(sorted(ADAPTERS))}. "
            "Pass the *ForConditionalGeneration model (not its text or vision part)."
        )
    if not hasattr(model, "lm_head"):
        name = type(model).__name__
        raise ValueError(
            f"{name} has no language-model head: wrap the {name.removesuffix('Model')}ForConditionalGeneration model "
            "(AutoModelForImageTextToText.from_pretrained loads it), whose generate() and logits the methods act on"
        )
    return ADAPTERS[model_type]
