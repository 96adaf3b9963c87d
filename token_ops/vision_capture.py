"""Scores and key metrics from the vision tower's attention, for methods that choose visual tokens before the LLM from
the vision encoder's view (FasterVLM, VisionZip, VMTC).

One vision attention layer is recorded through a registered attention implementation for the vision config (the model
computes q and k itself, rotary and windows included; the layer's output still comes from SDPA):
- CLIP towers (LLaVA, LLaVA-NeXT): the layer that produces the LLM's features (vision_feature_layer, -2); score = the
  [CLS] row's attention to each patch (head mean); metric = the layer's keys averaged over heads (VisionZip's
  "metric"). One record per tile (LLaVA-NeXT: the base image and each high-resolution tile).
- Qwen towers (no [CLS]): the last block; score = the attention each patch receives, averaged over the image's query
  patches and the heads (the attention-mean variant VisionZip's authors use on Qwen); a merged LLM token (2x2
  patches) gets the mean of its patches' scores and keys. One record per image and per video frame (the tower
  attends within a frame), in the LLM's token order (Qwen2.5's window order is undone).

Methods that merge in the ViT feature space (VisionZip on CLIP towers) rewrite rows of the projector's input in a
forward pre-hook; elsewhere they merge the projected features at the BEFORE_LLM stage. The hooks' handles go into the
engine's handle list so `unwrap` removes them and restores the vision attention implementation.
"""

from __future__ import annotations

import functools
import weakref
from typing import ClassVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlm_efficient.layout import IMAGE, VIDEO
from vlm_efficient.method import BEFORE_LLM, Method, PerThread, Selection
from vlm_efficient.selection import keep_count, top_k_mask

VISION_ATTENTION = "vlm_efficient_vision"
_CAPTURE_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> VisionCapture
QUERY_BLOCK = 1024  # query rows per softmax block for Qwen's received attention: never the full n x n per head


def _vision_attention(module, query, key, value, attention_mask=None, **kwargs):
    capture = _CAPTURE_OF.get(module)
    if capture is not None:
        capture.record(query, key, kwargs["scaling"])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class _Handle:
    """Undo action with the interface of a hook handle: the engine calls .remove() on unwrap, and remove_from_copy(memo)
    on a deep copy of the wrapped model. `undo(target)` undoes the change on `target`, a part of the model, or (target
    None) in a registry outside the model, which a copy does not share."""

    def __init__(self, undo, target=None):
        self.undo, self.target = undo, target

    def remove(self):
        if self.undo is not None:
            self.undo(self.target)
            self.undo = None

    def remove_from_copy(self, memo: dict) -> None:
        if self.undo is not None and self.target is not None:
            self.undo(memo[id(self.target)])


class VisionCapture:
    calls: list[dict] = PerThread(list)  # per vision-tower call since the last forward: {"records", "grid", "keep"}
    sizes: list = PerThread(list)  # LLaVA-NeXT: per get_image_features call, the image sizes
    def __init__(self, engine, method, merge_in_vit: bool):
        model = engine.model
        self.model = model
        self.method = method
        self.family = model.config.model_type
        if self.family in ("llava", "llava_next"):
            tower = model.model.vision_tower
            layers = getattr(tower, "vision_model", tower).encoder.layers
            feature_layer = model.config.vision_feature_layer
            if not isinstance(feature_layer, int):
                raise ValueError(f"{method.name}: needs a single vision_feature_layer, this model uses {feature_layer}")
            index = feature_layer + len(layers) if feature_layer < 0 else feature_layer - 1
            if not 0 <= index < len(layers):
                raise ValueError(f"{method.name}: vision_feature_layer={feature_layer} has no attention layer")
            self.attention = layers[index].self_attn
            self.strategy = model.config.vision_feature_select_strategy
            if self.family == "llava_next" and self.strategy != "default":
                raise ValueError(f"{method.name}: LLaVA-NeXT with vision_feature_select_strategy='full' is unsupported")
            self.tower = tower
        elif self.family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            visual = model.model.visual
            last = len(visual.blocks) - 1
            if self.family == "qwen2_5_vl" and last not in visual.fullatt_block_indexes:
                raise ValueError(f"{method.name}: the last Qwen2.5-VL vision block uses window attention")
            self.attention = visual.blocks[last].attn
            self.tower = visual
            self.unit = visual.spatial_merge_size**2
        else:
            raise ValueError(f"{method.name}: no vision-tower attention capture for model_type {self.family!r}")

        AttentionInterface.register(VISION_ATTENTION, _vision_attention)
        AttentionMaskInterface.register(VISION_ATTENTION, sdpa_mask)
        original = model.config.vision_config._attn_implementation
        model.set_attn_implementation({"vision_config": VISION_ATTENTION})
        _CAPTURE_OF[self.attention] = self
        handles = [
            _Handle(lambda target: target.set_attn_implementation({"vision_config": original}), model),
            _Handle(lambda _: _CAPTURE_OF.pop(self.attention, None)),
            self.tower.register_forward_pre_hook(self._on_tower_call, with_kwargs=True),
            model.register_forward_hook(lambda *_: self.reset()),
        ]
        self.merge_in_vit = merge_in_vit and self.family.startswith("llava")  # Qwen: merged after the merger
        if self.merge_in_vit:
            handles.append(model.model.multi_modal_projector.register_forward_pre_hook(self._on_projector_call))
        if self.family == "llava_next":
            handles.append(self._watch_image_sizes(model.model))
        for handle in handles:
            engine.add_handle(handle)

    # ---- recording ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Vision calls belong to the next prefill (generate() encodes images before it) or to the current forward."""
        self.calls.clear()
        self.sizes.clear()

    def _watch_image_sizes(self, inner):
        """LLaVA-NeXT tiles map to LLM tokens through the image sizes, which only get_image_features sees (generate()
        encodes the images before the prefill): record them on the instance's method, restored on unwrap."""
        original = inner.get_image_features

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
            self.sizes.append([tuple(int(v) for v in size) for size in sizes])
            return original(*args, **kwargs)

        inner.get_image_features = get_image_features
        return _Handle(lambda target: target.__dict__.pop("get_image_features", None), inner)

    def _on_tower_call(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.calls.append({"records": [], "grid": grid})

    def record(self, query, key, scaling) -> None:
        if not self.calls:
            return
        records = self.calls[-1]["records"]
        metric = key.float().mean(1)  # [B, n, d]: head-averaged keys
        if self.family.startswith("llava"):
            cls = (query[:, :, :1].float() @ key.float().transpose(-1, -2) * scaling).softmax(-1)[:, :, 0].mean(1)
            start = 0 if self.strategy == "full" else 1
            for tile in range(query.shape[0]):
                score = cls[tile, start:].clone()
                if start == 0:
                    score[0] = float("inf")  # the [CLS] feature itself, when the LLM gets it, always stays
                records.append({"score": score, "metric": metric[tile, start:]})
            return
        n = query.shape[2]
        received = torch.zeros(n, device=query.device)
        keys = key[0].float().transpose(-1, -2)
        for start in range(0, n, QUERY_BLOCK):
            probs = (query[0, :, start : start + QUERY_BLOCK].float() @ keys * scaling).softmax(-1)
            received += probs.sum(dim=(0, 1))
        received /= n * query.shape[1]
        records.append({
            "score": received.view(-1, self.unit).mean(1),
            "metric": metric[0].view(n // self.unit, self.unit, -1).mean(1),
        })  # fmt: skip

    def _on_projector_call(self, module, args):
        if not self.calls:
            return None
        features = args[0]
        call = self.calls[-1]
        records = call["records"]
        scores = torch.stack([record["score"] for record in records])
        metrics = torch.stack([record["metric"] for record in records])
        keep, merged = self.method.choose_tiles(scores, metrics, features[: len(records)])
        call["keep"] = list(keep.unbind(0))
        if merged is None:
            return None
        features = features.clone()
        features[: len(records)] = merged
        return (features, *args[1:])

    # ---- decisions per LLM token --------------------------------------------------------------------------------
    def _qwen_order(self, grid: torch.Tensor) -> list[torch.Tensor]:
        """Per frame of each grid row (an image is one frame), the block-order index of each merged token in LLM
        order (identity except Qwen2.5's windows, which never cross a frame)."""
        frames = [(int(t), int(h * w) // self.unit) for t, h, w in grid.tolist()]
        if self.family != "qwen2_5_vl":
            return [torch.arange(n) for t, n in frames for _ in range(t)]
        visual = self.tower
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
        for t, n in frames:
            for _ in range(t):
                block = window_index[start : start + n].cpu() - start
                orders.append(torch.argsort(block))
                start += n
        return orders

    def _first_call(self) -> dict:
        if not self.calls:
            raise RuntimeError(f"{self.method.name}: the vision tower did not run before this prefill")
        return self.calls[0]

    def _tile_keeps(self, call) -> list[torch.Tensor]:
        """Each tile's keep [n] (decided at the projector when the method merges in the ViT, else here)."""
        if "keep" in call:
            return call["keep"]
        return [self.method.choose(**self._args(record))[0] for record in call["records"]]

    def llava_keep(self, run, hidden: torch.Tensor) -> torch.Tensor | None:
        """LLaVA families: [B, n] keep of every prompt row at once (the decisions are per ViT tile, the merges, if
        any, already happened in the ViT), scattered over the image rows in prompt order with no host read; None
        for the other families (see image_decisions)."""
        if not self.family.startswith("llava"):
            return None
        return self.llava_rows(run, self._tile_keeps(self._first_call()), hidden.device)

    def llava_rows(self, run, keeps: list[torch.Tensor], device) -> torch.Tensor:
        """Per-tile bool masks [n] of the first vision call scattered onto the current prompt rows [B, n_cur] (text
        rows and LLaVA-NeXT's newlines True), as llava_keep scatters the keeps."""
        if self.family == "llava_next":
            per_image, tile = [], 0
            for size in self.sizes[0]:
                tiles = self._tiles_of(size)
                per_image.append(self._pack(torch.stack(keeps[tile : tile + tiles]), size))
                tile += tiles
            keeps = per_image
        if run.image_sources is not None:  # generate() repeated the encoded images (beam search)
            keeps = [keeps[source] for source in run.image_sources]
        is_image = run.current(run.layout.kind, fill=0).to(device) == IMAGE
        return (~is_image).masked_scatter(is_image, torch.cat(keeps).to(device))

    def image_decisions(self, run, hidden: torch.Tensor):
        """Qwen families: yield (sample, rows [n] of one image's or one video frame's LLM tokens, keep [n] bool,
        merged [n, d] or None): the tower attends within each frame (one record per frame), and the merge happens
        on the LLM-side features. generate() encodes the images, then the videos: one tower call each."""
        kind = run.current(run.layout.kind, fill=0).to(hidden.device)
        image_index = run.current(run.layout.image_index, fill=-1).to(hidden.device)
        frame = run.current(run.layout.frame, fill=-1).to(hidden.device)
        calls = iter(self.calls)
        for modality in (IMAGE, VIDEO):
            items = [(b, k, tokens) for b in range(image_index.shape[0])
                     for k, tokens in enumerate(run.layout.images[b]) if tokens.video == (modality == VIDEO)]  # fmt: skip
            items = [(b, k, tokens) for b, k, tokens in items if bool(((kind[b] == modality) & (image_index[b] == k)).any())]
            if not items:
                continue
            call = next(calls, None)
            if call is None:
                raise RuntimeError(f"{self.method.name}: the vision tower did not run before this prefill")
            orders = self._qwen_order(call["grid"])
            first = [0] + torch.cumsum(call["grid"][:, 0], 0).tolist()  # each grid row's first record
            sources = run.image_sources if modality == IMAGE else None
            if sources is None and len(items) != call["grid"].shape[0]:
                raise ValueError(f"{self.method.name}: {len(items)} videos in the prompts but the tower encoded "
                                 f"{call['grid'].shape[0]}: repeated videos (beam search) are not supported")  # fmt: skip
            for g, (b, k, tokens) in enumerate(items):
                source = g if sources is None else sources[g]  # generate() repeated the images
                for f, unit in enumerate(tokens.units):
                    rows = ((kind[b] == modality) & (image_index[b] == k) & (frame[b] == unit)).nonzero().flatten()
                    order = orders[first[source] + f].to(hidden.device)
                    record = call["records"][first[source] + f]
                    keep, merged = self.method.choose(record["score"][order], record["metric"][order], hidden[b, rows])
                    yield b, rows, keep, merged

    @staticmethod
    def _args(record):
        return {"score": record["score"], "metric": record["metric"], "features": None}

    def _tiles_of(self, size) -> int:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        return image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)

    def _pack(self, keeps: torch.Tensor, size) -> torch.Tensor:
        """Per-tile keep masks [tiles, n] -> the image's LLM tokens, through the model's own packing (unpadding and
        row newlines, which always stay)."""
        packed, _ = self.model.model.pack_image_features(
            [keeps.float()[..., None]], torch.tensor([size]), self.strategy, image_newline=torch.ones(1)
        )
        packed = packed[0] if isinstance(packed, (list, tuple)) else packed
        return packed[:, 0] > 0.5


class VisionTowerMethod(Method):
    """Base of the methods that pick (and merge) visual tokens before the LLM from the vision tower's attention.
    Subclasses define `choose(score [n], metric [n, d], features [n, c] or None) -> (keep [n], merged [n, c] or None)`
    over one tile's or image's tokens in LLM order; scores of +inf mark tokens that always stay ([CLS])."""

    merge_in_vit: ClassVar[bool] = False
    reads_vision_tower: ClassVar[bool] = True

    def bind(self, engine) -> None:
        # checked before anything is installed: a later bind failing would leave these hooks behind (no unbind)
        others = [m.name for m in engine.methods if getattr(m, "reads_vision_tower", False) and m is not self]
        if others:
            raise ValueError(f"{self.name}: one vision-tower method per wrap; {', '.join(others)} is one as well")
        self.capture = VisionCapture(engine, self, self.merge_in_vit)

    def prune_layers(self) -> set[int]:
        return {BEFORE_LLM}

    def choose(self, score, metric, features):
        raise NotImplementedError

    def choose_tiles(self, scores, metrics, features) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`choose` over equal-sized tiles at once: scores [T, n], metrics [T, n, d], features [T, n, c] ->
        (keep [T, n], merged [T, n, c] or None). This one loops over the tiles; a method may do them together."""
        merged = features.clone()
        keeps, any_merged = [], False
        for tile in range(scores.shape[0]):
            keep, tile_merged = self.choose(scores[tile], metrics[tile], features[tile])
            keeps.append(keep)
            if tile_merged is not None:
                merged[tile], any_merged = tile_merged, True
        return torch.stack(keeps), merged if any_merged else None

    def select_tokens(self, layer, run, hidden) -> Selection:
        keep = self.capture.llava_keep(run, hidden)
        if keep is not None:
            return Selection(keep=keep)
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        merged_hidden = None
        for b, rows, keep_rows, merged in self.capture.image_decisions(run, hidden):
            keep[b, rows] = keep_rows
            if merged is not None:
                merged_hidden = hidden.clone() if merged_hidden is None else merged_hidden
                merged_hidden[b, rows] = merged.to(hidden.dtype)
        return Selection(keep=keep, hidden=merged_hidden)


def grid_counts(score: torch.Tensor, ratio: float) -> tuple[torch.Tensor, int]:
    """(grid tokens [n] bool, how many of them survive dropping `ratio`)."""
    grid = torch.isfinite(score)
    return grid, int(keep_count(grid.sum()[None], ratio))


def top(score: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    return top_k_mask(score[None], candidates[None], torch.tensor([count]))[0]
