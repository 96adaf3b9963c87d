"""Scores and key metrics from the vision tower's attention, for methods that choose visual tokens before the LLM from
the vision encoder's view (FasterVLM, VisionZip, VMTC).

One vision attention layer, which the model's adapter names (`vision_tower_attention`, with the tower's [CLS], tiles
and token order), is recorded through a registered attention implementation for the vision tower (the model computes
q and k itself, rotary and windows included; the layer's output still comes from SDPA):
- CLIP towers (LLaVA, LLaVA-NeXT): the layer that produces the LLM's features (vision_feature_layer, -2); score = the
  [CLS] row's attention to each patch (head mean); metric = the layer's keys averaged over heads (VisionZip's
  "metric"). One record per tile (LLaVA-NeXT: the base image and each high-resolution tile); each LLM row takes the
  decision of the tile row it is a copy of.
- Qwen towers (no [CLS]): the last block; score = the attention each patch receives, averaged over the image's query
  patches and the heads (the attention-mean variant VisionZip's authors use on Qwen); a merged LLM token (2x2
  patches) gets the mean of its patches' scores and keys. One record per image and per video frame (the tower
  attends within a frame), in the LLM's token order (Qwen2.5's window order is undone).

Methods that merge in the ViT feature space (VisionZip on CLIP towers) rewrite rows of the projector's input in a
forward pre-hook; elsewhere they merge the projected features at the BEFORE_LLM stage. The hooks' handles go into the
engine's handle list so `unwrap` removes them and restores the vision attention implementation.
"""

from __future__ import annotations

import weakref
from typing import ClassVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlm_efficient.layout import IMAGE, VIDEO
from vlm_efficient.method import BEFORE_LLM, EncoderRecord, Method, PerThread, Selection
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
    """Records the vision tower's attention (one layer, chosen by the model's adapter) for `method`, per thread."""

    calls: list[dict] = PerThread(list)  # per vision-tower call since the last forward: {"records", "grid", ...}

    def __init__(self, engine, method, merge_in_vit: bool):
        model, adapter = engine.model, engine.adapter
        self.model, self.adapter, self.method = model, adapter, method
        self._engine = weakref.ref(engine)
        self.vision = vision = adapter.vision_tower_attention(model, method.name)
        self.attention = vision.attention

        AttentionInterface.register(VISION_ATTENTION, _vision_attention)
        AttentionMaskInterface.register(VISION_ATTENTION, sdpa_mask)
        original = adapter.vision_attention_implementation(model)
        adapter.set_vision_attention_implementation(model, VISION_ATTENTION)
        _CAPTURE_OF[self.attention] = self
        handles = [
            _Handle(lambda target: adapter.set_vision_attention_implementation(target, original), model),
            _Handle(lambda _: _CAPTURE_OF.pop(self.attention, None)),
            vision.tower.register_forward_pre_hook(self._on_tower_call, with_kwargs=True),
            model.register_forward_hook(lambda *_: self._after_forward(), always_call=True),  # also after a raise
        ]
        vision_hooks = [handles[2]]  # the hooks on vision-side modules (EncoderRecord.hook_ids)
        self.merge_in_vit = merge_in_vit and vision.projector is not None  # else merged on the LLM-side features
        if self.merge_in_vit:
            vision_hooks.append(vision.projector.register_forward_pre_hook(self._on_projector_call))
        if vision.tiled:  # the projected tiles, to find each LLM token's tile row (tile_sources)
            vision_hooks.append(vision.projector.register_forward_hook(self._on_projector_output))
        for handle in handles + vision_hooks[1:]:
            engine.add_handle(handle)
        self.vision_hook_ids = frozenset(handle.id for handle in vision_hooks)

    # ---- recording ---------------------------------------------------------------------------------------------
    def _side_pass(self) -> bool:
        """Inside a plain block (a method's side pass, e.g. VHR's prefills with and without the image): the model runs
        as unwrapped, and the calls recorded for the coming prefill (generate() encodes the images before it) stay."""
        engine = self._engine()
        return engine is not None and engine.in_plain_block

    def _after_forward(self) -> None:
        if not self._side_pass():
            self.reset()

    def reset(self) -> None:
        """Vision calls belong to the next prefill (generate() encodes images before it) or to the current forward."""
        self.calls.clear()

    def encoder_record(self) -> EncoderRecord:
        """The tower calls one encoding leaves (records, decisions, merged tiles), for a captured encoding: every step
        of recording and choosing runs on the device with sizes known on the host (the records' grid_size)."""

        def copied(calls):  # new lists and dicts around the same tensors: a prefill may add to a call
            return [{**call, "records": list(call["records"])} for call in calls]

        def restore(calls):
            self.calls[:] = copied(calls)

        return EncoderRecord(self.vision_hook_ids, self.reset, lambda: copied(self.calls), restore)

    def _on_tower_call(self, module, args, kwargs):
        if self._side_pass():
            return
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.calls.append({"records": [], "grid": grid})

    def record(self, query, key, scaling) -> None:
        if not self.calls or self._side_pass():
            return
        records = self.calls[-1]["records"]
        metric = key.float().mean(1)  # [B, n, d]: head-averaged keys
        unit = self.vision.merge
        if self.vision.has_cls:
            cls = (query[:, :, :1].float() @ key.float().transpose(-1, -2) * scaling).softmax(-1)[:, :, 0].mean(1)
            start = 0 if self.vision.cls_feature else 1
            for tile in range(query.shape[0]):
                score = cls[tile, start:].clone()
                if start == 0:
                    score[0] = float("inf")  # the [CLS] feature itself, when the LLM gets it, always stays
                grid_size = query.shape[2] - 1  # every patch; the [CLS] is not one
                records.append({"score": score, "metric": metric[tile, start:], "grid_size": grid_size})
            return
        n = query.shape[2]
        received = torch.zeros(n, device=query.device)
        keys = key[0].float().transpose(-1, -2)
        for start in range(0, n, QUERY_BLOCK):
            probs = (query[0, :, start : start + QUERY_BLOCK].float() @ keys * scaling).softmax(-1)
            received += probs.sum(dim=(0, 1))
        received /= n * query.shape[1]
        records.append({
            "score": received.view(-1, unit).mean(1),
            "metric": metric[0].view(n // unit, unit, -1).mean(1),
            "grid_size": n // unit,
        })  # fmt: skip

    def _on_projector_output(self, module, args, output):
        if self.calls and not self._side_pass():
            self.calls[-1]["tiles"] = output  # [T, n, c]: the call's tiles as LLM features

    def _on_projector_call(self, module, args):
        if not self.calls or self._side_pass():
            return None
        features = args[0]
        call = self.calls[-1]
        records = call["records"]
        scores = torch.stack([record["score"] for record in records])
        metrics = torch.stack([record["metric"] for record in records])
        keep, merged = self.method.choose_tiles(scores, metrics, features[: len(records)], records[0]["grid_size"])
        call["keep"] = list(keep.unbind(0))
        if merged is None:
            return None
        features = features.clone()
        features[: len(records)] = merged
        return (features, *args[1:])

    # ---- decisions per LLM token --------------------------------------------------------------------------------
    def _first_call(self) -> dict:
        if not self.calls:
            raise RuntimeError(f"{self.method.name}: the vision tower did not run before this prefill")
        return self.calls[0]

    def _tile_keeps(self, call) -> list[torch.Tensor]:
        """Each tile's keep [n] (decided at the projector when the method merges in the ViT, else here)."""
        if "keep" in call:
            return call["keep"]
        return [self.method.choose(record["score"], record["metric"], None, record["grid_size"])[0]
                for record in call["records"]]  # fmt: skip

    def tile_keep(self, run, hidden: torch.Tensor) -> torch.Tensor | None:
        """CLIP towers: [B, n] keep of every prompt row at once (the decisions are per ViT tile, the merges, if any,
        already happened in the ViT), scattered over the image rows; None for the other towers (see
        image_decisions)."""
        if self.vision.projector is None:
            return None
        return self.tile_rows(run, self._tile_keeps(self._first_call()), hidden)

    def kept_per_sample(self, run) -> list[int] | None:
        """Untiled images (one tile each, as tile_keep scatters them): each sample's kept image rows, from the grid size
        the host knows, where the method can count them (tile_kept); None for tiled images and videos."""
        if self.vision.tiled or any(item.video for items in run.layout.images for item in items):
            return None
        record = self._first_call()["records"][0]
        kept = self.method.tile_kept(record["grid_size"])
        if kept is None:
            return None
        per_image = kept + record["score"].shape[0] - record["grid_size"]  # the always-kept [CLS] feature, if any
        return [per_image * len(items) for items in run.layout.images]

    def tile_rows(self, run, keeps: list[torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """Per-tile bool masks [n] of the first vision call scattered onto the current prompt rows [B, n_cur] (text
        rows and LLaVA-NeXT's newlines True), as tile_keep scatters the keeps. `hidden` are the rows as they enter
        the LLM. Untiled images are their tile's tokens in order (no host read); tiled ones are found by value."""
        device = hidden.device
        is_image = run.current(run.layout.kind, fill=0).to(device) == IMAGE
        if self.vision.tiled:
            return self._tiled_rows(run, torch.cat(keeps).to(device), hidden, is_image)
        if run.image_sources is not None:  # generate() repeated the encoded images (beam search)
            keeps = [keeps[source] for source in run.image_sources]
        return (~is_image).masked_scatter(is_image, torch.cat(keeps).to(device))

    def _tiled_rows(self, run, keep: torch.Tensor, hidden: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        """LLaVA-NeXT: the model packs each image's tiles (base image, then the high-resolution tiles unpadded, with
        row newlines) by its image size, which generate() passes to no hook point. Each LLM row is an exact copy of
        one projected tile row, so each image row takes the keep of the tile row it equals (one host read checks
        that every image row has one); newlines stay."""
        cell = is_image & (run.current(run.layout.coords[..., 0], fill=-1).to(hidden.device) >= 0)
        tiles = self._first_call()["tiles"]
        tiles = tiles.reshape(-1, tiles.shape[-1]).to(hidden.device, hidden.dtype)  # as the model casts them
        source, found = tile_sources(tiles, hidden)
        if not bool((found | ~cell).all()):
            raise RuntimeError(f"{self.method.name}: the image features entering the LLM are not the projected tiles "
                               "of the vision call before it: wrap no other method that changes them before "
                               f"{self.method.name}")  # fmt: skip
        return ~cell | keep[source]  # text rows and newlines stay

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
            orders = self.adapter.vision_token_order(self.model, self.vision, call["grid"])
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
                    keep, merged = self.method.choose(record["score"][order], record["metric"][order], hidden[b, rows],
                                                      record["grid_size"])  # fmt: skip
                    yield b, rows, keep, merged


class VisionTowerMethod(Method):
    """Base of the methods that pick (and merge) visual tokens before the LLM from the vision tower's attention.
    Subclasses define `choose(score [n], metric [n, d], features [n, c] or None) -> (keep [n], merged [n, c] or None)`
    over one tile's or image's tokens in LLM order; scores of +inf mark tokens that always stay ([CLS]). `grid_size`,
    the finite scores' count, is what the host knows of it (the tower's records); None: counted (one host read)."""

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

    def encoder_record(self) -> EncoderRecord:
        return self.capture.encoder_record()

    def choose(self, score, metric, features, grid_size: int | None = None):
        raise NotImplementedError

    def tile_kept(self, grid_size: int) -> int | None:
        """How many of a tile's `grid_size` grid tokens `choose` keeps, where the host can say without the scores."""
        return None

    def choose_tiles(self, scores, metrics, features, grid_size: int | None = None):
        """`choose` over tiles at once: scores [T, n], metrics [T, n, d], features [T, n, c] -> (keep [T, n], merged
        [T, n, c] or None); `grid_size`: every tile's, where the host knows it. This one loops over the tiles; a
        method may do them together."""
        merged = features.clone()
        keeps, any_merged = [], False
        for tile in range(scores.shape[0]):
            keep, tile_merged = self.choose(scores[tile], metrics[tile], features[tile], grid_size)
            keeps.append(keep)
            if tile_merged is not None:
                merged[tile], any_merged = tile_merged, True
        return torch.stack(keeps), merged if any_merged else None

    def select_tokens(self, layer, run, hidden) -> Selection:
        keep = self.capture.tile_keep(run, hidden)
        if keep is not None:
            return Selection(keep=keep, visual_kept=self.capture.kept_per_sample(run))
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        merged_hidden = None
        for b, rows, keep_rows, merged in self.capture.image_decisions(run, hidden):
            keep[b, rows] = keep_rows
            if merged is not None:
                merged_hidden = hidden.clone() if merged_hidden is None else merged_hidden
                merged_hidden[b, rows] = merged.to(hidden.dtype)
        return Selection(keep=keep, hidden=merged_hidden)


def grid_sizes(scores: torch.Tensor, grid_size: int | None) -> list[int]:
    """Each tile's grid tokens (finite scores) of scores [T, n]: `grid_size` for every tile where the host knows it,
    else counted (one host read)."""
    if grid_size is not None:
        return [grid_size] * scores.shape[0]
    return torch.isfinite(scores).sum(1).tolist()


def grid_counts(score: torch.Tensor, ratio: float, grid_size: int | None) -> tuple[torch.Tensor, int]:
    """(grid tokens [n] bool, how many of them survive dropping `ratio`)."""
    return torch.isfinite(score), keep_count(grid_sizes(score[None], grid_size)[0], ratio)


def top(score: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    return top_k_mask(score[None], candidates[None], torch.full((1,), count, device=score.device))[0]


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def row_fingerprints(rows: torch.Tensor) -> torch.Tensor:
    """[..., c] -> [...] int64, equal for rows of equal bits: a hash of the bits in integer arithmetic, which wraps and
    is associative, so a row's fingerprint does not depend on the tensor it sits in."""
    bits = rows.contiguous().view(_BITS[rows.element_size()]).long()
    generator = torch.Generator().manual_seed(0)
    weights = torch.randint(-(2**62), 2**62, (rows.shape[-1],), generator=generator, dtype=torch.long) | 1
    return (bits * weights.to(rows.device)).sum(-1)


def tile_sources(tiles: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows [..., c]: (the index of a row of tiles [R, c] equal to each, [...] long; whether it is equal)."""
    keys = row_fingerprints(tiles)
    order = keys.argsort()
    wanted = row_fingerprints(rows)
    at = torch.searchsorted(keys[order], wanted.flatten()).clamp(max=keys.shape[0] - 1).view_as(wanted)
    source = order[at]
    return source, (tiles[source] == rows).all(-1)
