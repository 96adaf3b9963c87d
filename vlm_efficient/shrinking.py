"""Sequence shrinking: the rows each decoder layer runs on once the methods' selections (pruning, merging) applied,
and what a layer on fewer rows needs of its own (rotary tables, position ids, masks).

Positions: every row and every cached key is identified by its ORIGINAL position in the prompt (the column of the
2-D attention mask). Pruned tokens keep their original positions, so rotary phases and decoding stay right
(methods that drop tokens before the LLM may ask for contiguous ones instead: `positions=renumber`).

The selections apply at two stages: BEFORE_LLM on the text model's inputs (`shrink_input`: every layer and the KV
cache see only the kept tokens), and at a decoder layer's input (`apply_selections`: that layer and the next ones).
`ShrunkLayerInputs` gives each layer on a shrunk sequence its keyword arguments, cached per row set in the run.
"""

from __future__ import annotations

import torch

from .adapters import ModelAdapter, kv_cache
from .method import BEFORE_LLM, Method, Selection
from .run_state import RunState, _gather_rows


# ---- row arithmetic ----------------------------------------------------------------------------------------------
def _gather_seq(tensor: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather `tensor` along `seq_dim` with index [B, n]; the batch dim is the one before seq_dim (it may be 1)."""
    seq_dim = seq_dim % tensor.dim()
    batch_dim = seq_dim - 1
    shape = list(tensor.shape)
    shape[batch_dim] = index.shape[0]
    tensor = tensor.expand(*shape)
    view = [1] * tensor.dim()
    view[batch_dim], view[seq_dim] = index.shape
    expand = list(tensor.shape)
    expand[seq_dim] = index.shape[1]
    return tensor.gather(seq_dim, index.to(tensor.device).view(view).expand(expand))


def causal_mask_at_positions(query_positions: torch.Tensor, key_positions: torch.Tensor,
                             attention_mask_2d: torch.Tensor):
    """Causal + padding mask [B, 1, q, kv] between rows identified by original positions (-1 = slot padding)."""
    key_valid = (key_positions >= 0) & attention_mask_2d.gather(1, key_positions.clamp(min=0))
    allowed = key_valid[:, None, :] & (key_positions[:, None, :] <= query_positions[:, :, None])
    # A slot-padding row attends to itself only, so no row is fully masked (0 * NaN would leak into real rows).
    q, kv = query_positions.shape[1], key_positions.shape[1]
    if q == kv:
        allowed |= (query_positions < 0)[:, :, None] & torch.eye(q, dtype=torch.bool, device=allowed.device)
    return allowed[:, None]


def renumbered(position_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Position ids [B, n] of a shrunk prompt made contiguous over its valid rows [B, n]: each sample's first valid
    row keeps its position and the next valid rows follow one by one (methods with positions=renumber)."""
    position_ids = position_ids.expand(valid.shape[0], -1)
    first = position_ids.gather(1, valid.long().argmax(1, keepdim=True))
    return torch.where(valid, first + valid.long().cumsum(1) - 1, position_ids)


def reordered(index: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The kept rows `index` [B, width] (left slots -1) of each sample sorted by their `order` keys [B, n] (>= 0; ties
    in position order), slots first (Selection.order)."""
    keys = torch.where(index >= 0, order.gather(1, index.clamp(min=0)), -1)
    return index.gather(1, keys.sort(dim=1, stable=True).indices)


def left_aligned_index(keep: torch.Tensor, host_counts: list[int] | None = None) -> tuple[torch.Tensor | None, bool]:
    """([B, width] indices of the kept rows of each sample, right-aligned (left slots -1) so the last prompt token
    stays last when samples keep different numbers of rows, or None when every row is kept; whether every sample
    keeps the same number of rows). The width sizes the tensors: one host read of the counts' extremes, unless the
    host knows each sample's count (`host_counts`, keep.sum(1) as a list)."""
    counts = keep.sum(1)
    if host_counts is None:
        low, width = torch.stack([counts.min(), counts.max()]).tolist()
    else:
        low, width = min(host_counts), max(host_counts)
    if low == keep.shape[1]:
        return None, True
    # a stable sort puts each sample's dropped rows first and its kept rows last, both in position order
    order = keep.to(torch.uint8).sort(dim=1, stable=True).indices[:, keep.shape[1] - width :]
    slot = torch.arange(width, device=keep.device)
    return torch.where(slot >= width - counts[:, None], order, -1), low == width


# ---- selections: pruning and merging -----------------------------------------------------------------------------
def select(methods: list[Method], stage: int, hidden: torch.Tensor, run: RunState):
    """Compose the selections of every method acting at `stage`: keeps intersect, merges apply in order; the one
    `order` a method may give -> (keep or None, hidden, order or None, each sample's kept rows where the host knows
    them or None). Updates run.visual_rows to the kept rows' visual counts where the host knows them."""
    keep = order = None
    selections = []
    for method in methods:
        if stage not in method.prune_layers():
            continue
        selected = method.select_tokens(stage, run, hidden)
        if selected is None:
            continue
        if isinstance(selected, torch.Tensor):
            selected = Selection(keep=selected)
        selections.append(selected)
        if selected.hidden is not None:
            hidden = selected.hidden
        keep = selected.keep if keep is None else keep & selected.keep
        if selected.order is not None:
            if order is not None:
                raise ValueError(f"{method.name}: two methods reorder the kept tokens at the same stage")
            order = selected.order
    if keep is None:
        return None, hidden, None, None
    # one selection that keeps every non-visual row and counts its visual ones: the kept rows are the current rows
    # less the visual ones it drops (slot-padding rows are not visual, so they count as kept, as in keep.sum(1))
    visual_kept = selections[0].visual_kept if len(selections) == 1 else None
    counts = None
    if visual_kept is not None and run.visual_rows is not None:
        counts = [hidden.shape[1] - rows + kept for rows, kept in zip(run.visual_rows, visual_kept)]
    run.visual_rows = visual_kept
    return keep, hidden, order, counts


def apply_selections(methods: list[Method], idx: int, hidden: torch.Tensor, run: RunState) -> torch.Tensor:
    """Layer idx's input rows after the selections of the methods pruning there; run.rows follows."""
    keep, hidden, order, counts = select(methods, idx, hidden, run)
    if order is not None:
        raise ValueError(f"layer {idx}: a selection's order applies before the LLM only")
    if keep is None:
        return hidden
    index, aligned = left_aligned_index(keep.to(hidden.device), counts)
    if index is None:
        return hidden
    run.aligned = run.aligned and aligned
    current = run.rows if run.rows is not None else torch.arange(hidden.shape[1], device=hidden.device).expand(
        hidden.shape[0], -1)
    run.rows = _gather_rows(current, index, fill=-1)
    run.layer_kwargs_cache.clear()
    return _gather_seq(hidden, index.clamp(min=0), seq_dim=1)


def shrink_input(methods: list[Method], kwargs: dict, run: RunState) -> None:
    """BEFORE_LLM: shrink the text model's inputs so every layer, layer 0 included, and the KV cache see only the
    kept tokens. The text model then builds its masks and rotary tables for the compact rows itself."""
    embeds = kwargs["inputs_embeds"]
    keep, embeds, order, counts = select(methods, BEFORE_LLM, embeds, run)
    index, run.aligned = (None, True) if keep is None else left_aligned_index(keep.to(embeds.device), counts)
    if index is None:
        kwargs["inputs_embeds"] = embeds
        return
    if order is not None:
        index = reordered(index, order.to(index.device))
    run.input_positions = index
    kwargs["inputs_embeds"] = _gather_seq(embeds, index.clamp(min=0), seq_dim=1)
    kwargs["attention_mask"] = _gather_rows(run.attention_mask_2d.to(embeds.device), index, fill=False).long()
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(run.prompt_length, device=embeds.device)[None]
    position_ids = _gather_seq(position_ids, index.clamp(min=0), seq_dim=-1)
    if any(getattr(m, "positions", "original") == "renumber" for m in methods if BEFORE_LLM in m.prune_layers()):
        position_ids = renumbered(position_ids, kwargs["attention_mask"].bool())
    kwargs["position_ids"] = position_ids
    run.last_position_ids = position_ids[..., -1]


def compact_decode_inputs(kwargs: dict, run: RunState) -> None:
    """Decoding after a BEFORE_LLM shrink: the cache holds the compact prompt, so position ids continue from the
    last prompt token's original ones (the model's own would count cached keys). Every layer gets its mask from
    ShrunkLayerInputs (the cached prompt keys of each layer are known), so the text model is given no mask to build:
    its own would not fit the cache, and building it reads the mask on the host (a GPU sync per step)."""
    step = kwargs["inputs_embeds"].shape[1]
    device = kwargs["inputs_embeds"].device
    kwargs["attention_mask"] = None
    offsets = torch.arange(run.fed - run.prompt_length + 1, run.fed - run.prompt_length + 1 + step, device=device)
    kwargs["position_ids"] = run.last_position_ids.to(device)[..., None] + offsets


# ---- per-layer kwargs for shrunk layers --------------------------------------------------------------------------
class ShrunkLayerInputs:
    """The keyword arguments of each decoder layer's call on a shrunk sequence: layers on fewer rows get sliced rotary
    tables and position ids and their own mask; layers that share rows and a device (several GPUs with device_map)
    share one computed copy (run.layer_kwargs_cache)."""

    def __init__(self, adapter: ModelAdapter, model, renumbers_inside: bool):
        self.adapter = adapter
        self.model = model
        # methods pruning inside the LLM with positions=renumber: every shrunk layer's rows get contiguous positions
        self.renumbers_inside = renumbers_inside

    def __call__(self, idx: int, kwargs: dict, run: RunState, device: torch.device) -> dict:
        # layers whose family mask has more than causality and padding (adapter.mask_group) get the engine's mask
        # whenever rows were dropped: the text model's own would be laid over the compact rows
        group = self.adapter.mask_group(self.model, idx)
        if run.prefill:
            if run.rows is None and (group is None or run.input_positions is None):
                return kwargs
            key = ("prefill", id(run.rows), group, device)
            if key not in run.layer_kwargs_cache:
                run.layer_kwargs_cache[key] = self._shrunk_prefill_kwargs(kwargs, run, device, idx)
            update = run.layer_kwargs_cache[key]
            if "position_shift" in update:
                run.position_shift[idx] = update["position_shift"]
                update = {k: v for k, v in update.items() if k != "position_shift"}
            return {**kwargs, **update}
        shift = run.position_shift.get(idx)
        if shift is None:
            return self._decode_kwargs(idx, kwargs, run, device, group)
        key = ("renumbered decode", id(shift), device)
        if key not in run.layer_kwargs_cache:
            position_ids = kwargs["position_ids"].to(device) - shift.to(device)[:, None]
            run.layer_kwargs_cache[key] = {"position_ids": position_ids,
                                           "position_embeddings": self._rotary(kwargs, position_ids)}
        return {**self._decode_kwargs(idx, kwargs, run, device, group), **run.layer_kwargs_cache[key]}

    def _rotary(self, kwargs: dict, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text model's rotary tables (cos, sin) at `position_ids`, in the dtype of the layer's own."""
        return self.adapter.text_model(self.model).rotary_emb(kwargs["position_embeddings"][0], position_ids)

    def _decode_kwargs(self, idx: int, kwargs: dict, run: RunState, device, group) -> dict:
        prompt_keys = run.layer_positions.get(idx)
        if prompt_keys is None:
            return kwargs
        # The text model found its whole 2-D mask all ones (no mask) and one token is fed: each sample's kept keys
        # all precede it and none is slot padding, so no mask is exact and keeps SDPA off its masked path. (After a
        # BEFORE_LLM shrink the text model is given no mask to check: there the engine's mask stays.)
        step = kwargs["position_embeddings"][0].shape[-2]
        if (step == 1 and run.aligned and run.input_positions is None and kwargs.get("attention_mask") is None
                and group is None):  # fmt: skip
            return kwargs
        key = ("decode", id(prompt_keys), group, device)
        if key not in run.layer_kwargs_cache:
            prompt_keys = prompt_keys.to(device)
            batch = prompt_keys.shape[0]
            new = torch.arange(run.prompt_length, run.fed + step, device=device).expand(batch, -1)
            queries = torch.arange(run.fed, run.fed + step, device=device).expand(batch, -1)
            keys = torch.cat([prompt_keys, new], dim=1)
            if group is not None:
                keys = keys[:, -self._cached_keys(kwargs, idx, step) :]
            run.layer_kwargs_cache[key] = {"attention_mask": self._rows_mask(idx, queries, keys, run, device)}
        return {**kwargs, **run.layer_kwargs_cache[key]}

    @staticmethod
    def _cached_keys(kwargs: dict, idx: int, step: int) -> int:
        """How many keys layer idx attends to in this decode step: its cached ones (a sliding-window layer keeps
        only its last window - 1 rows, of the kept ones) and the step's. Asked only for layers with a mask group:
        the per-head and ragged caches of the other families hold their keys otherwise."""
        cached = getattr(kv_cache(kwargs).layers[idx], "keys", None)
        return (0 if cached is None else cached.shape[-2]) + step

    def _rows_mask(self, idx: int, queries: torch.Tensor, keys: torch.Tensor, run: RunState, device) -> torch.Tensor:
        mask = causal_mask_at_positions(queries, keys, run.attention_mask_2d.to(device))
        return self.adapter.layer_mask(self.model, idx, mask, queries, keys, run.layout)

    def _shrunk_prefill_kwargs(self, kwargs: dict, run: RunState, device: torch.device, idx: int) -> dict:
        positions = run.positions.to(device)
        # no padding of either kind (known on the host) and a plain causal family mask: SDPA's flash path
        plain = run.aligned and not run.layout.padded and self.adapter.mask_group(self.model, idx) is None
        update = {"attention_mask": None if plain else self._rows_mask(idx, positions, positions, run, device)}
        if run.rows is None:  # shrunk before the LLM: the text model made the rotary tables of the compact rows
            return update
        index = run.rows.to(device).clamp(min=0)
        position_ids = kwargs.get("position_ids")
        if self.renumbers_inside:
            # contiguous positions for the current rows, as the authors' code feeds each stage's kept tokens
            if position_ids is None:
                position_ids = torch.arange(run.input_length, device=device)[None]
            position_ids = _gather_seq(position_ids.to(device), index, -1)
            renumbered_ids = renumbered(position_ids, run.current_valid().to(device))
            update["position_ids"] = renumbered_ids
            update["position_embeddings"] = self._rotary(kwargs, renumbered_ids)
            update["position_shift"] = position_ids[..., -1] - renumbered_ids[..., -1]
            return update
        # on the layer's device: layers there share this copy (the text model made the tables on its own device)
        cos, sin = kwargs["position_embeddings"]
        update["position_embeddings"] = (_gather_seq(cos, index, -2).to(device), _gather_seq(sin, index, -2).to(device))
        if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == run.input_length:
            update["position_ids"] = _gather_seq(position_ids, index, -1).to(device)
        return update
