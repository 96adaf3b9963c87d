"""The fast path's attention: SDPA, or where a layer has decoding edits, kernel 3's decoding form (a GroupRoute: the
layer's structured edits composed into one group edit) or the dense edited attention, and in the static decoding
step's other layers kernel 5 (a MaskedDecodeRoute) or kernel 4 on a per-head pruned cache (a RaggedRoute); and the
helpers that keep a captured graph's edits in buffers reloaded per call. Used by the static decoding step
(fast_path.py) and by the prefill segments whose last row is edited as a decoding row (fast_prefill.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import edited_attention, received_attention
from .kernel_plan import compose
from .method import UNSTRUCTURED, at_positions

EDIT_TENSORS = ("logit_scale", "logit_abs", "logit_bias", "mask", "rows")  # AttentionEdit fields a step can reload
ATTENTION_NAME = "vlm_efficient_fast"  # the attention implementation while layers with edits run (routed)
# attention module -> its layer's decoding edits (a list of AttentionEdits: the dense edited attention; or a GroupRoute:
# kernel 3's decoding form), while they run (routed)
_DECODE_EDITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class GroupRoute:
    """A layer whose decoding edits compose into one group edit (kernel_plan.compose): kernel 3's decoding form over
    the whole static buffer, as the dynamic path's router runs it, or over a prefill's keys for its last row.
    `groups` / `key_bias` [B, capacity] hold the kept prompt keys' groups then group 0 for the generated slots;
    `valid` [B, capacity] the keys that count: in the decoding step a view of the step's mask of the layer, in a
    prefill segment the prompt's padding mask."""

    spec: object  # kernels.GroupSpec; its folded tables are the ones the graph reads
    groups: torch.Tensor
    key_bias: torch.Tensor | None
    valid: torch.Tensor | None = None
    spec_id: int = dataclasses.field(init=False, default=-1)  # the spec's number for the operator (group_decode)

    def __post_init__(self):
        self.spec_id = next(_spec_ids)
        _SPECS[self.spec_id] = self.spec

    def tensors(self) -> dict:
        return {"groups": self.groups, "key_bias": self.key_bias, "valid": self.valid}


@dataclasses.dataclass
class MaskedDecodeRoute:
    """A layer of the static decoding step without decoding edits: kernel 5 (kernels/split_decode.py, split-KV with
    the key mask applied to its loads) over the whole buffer. SDPA with the step's boolean mask is transformers' slow
    case: it repeats the KV heads for grouped-query attention and runs SDPA's memory-efficient backend (Qwen2-VL-7B
    at 2,329 keys on an H100: 55 us per call, for under 2 us of key and value reads). `valid` [B, capacity]: a view
    of the step's mask of the layer, updated in place per step. A layer whose decoding edits only mask keys and
    observe the attention (observed_mask_route) runs here too: its edits' `masks` [B, 1, 1, capacity] are ANDed with
    `valid`, and the `observers` are handed kernel 5's head-averaged probabilities."""

    valid: torch.Tensor
    masks: tuple = ()
    observers: tuple = ()


def observed_mask_route(layer_edits, valid: torch.Tensor) -> MaskedDecodeRoute | None:
    """A MaskedDecodeRoute for decoding edits (a list of AttentionEdits) that only mask keys and observe, else None."""
    if not isinstance(layer_edits, list) or not any(edit.observe is not None for edit in layer_edits):
        return None
    others = ("logit_scale", "logit_abs", "logit_bias", "post_softmax", "rows", "allow", "unrotated")
    if any(getattr(edit, name) is not None for edit in layer_edits for name in others):
        return None
    return MaskedDecodeRoute(valid, masks=tuple(edit.mask for edit in layer_edits if edit.mask is not None),
                             observers=tuple(edit.observe for edit in layer_edits if edit.observe is not None))


@dataclasses.dataclass
class RaggedRoute:
    """A layer of the static decoding step on a per-head pruned cache (PLPHP; `cache` a kernels.RaggedKVCache laid
    out per call): each query head attends to its KV head's kept keys and the generated ones, kernel 4 where the
    kernels run (`kernel`), else the same computation in torch ops."""

    cache: object
    kernel: bool
    cache_id: int = dataclasses.field(init=False, default=-1)  # the cache's number for the operator (ragged_decode)

    def __post_init__(self):
        self.cache_id = next(_cache_ids)
        _RAGGED[self.cache_id] = self.cache


@dataclasses.dataclass
class StatsRoute:
    """A layer of a lean prefill's segment whose methods asked for the last row's attention statistics: SDPA for the
    layer, and the attention each key receives from the last row (attention.received_attention, as
    attention_stats.deliver_stats computes it), per head and / or head-averaged as `per_head` lists; the layer's call
    leaves them in `received` {per_head: tensor} (inside a captured graph: its outputs, which every replay
    rewrites)."""

    per_head: tuple[bool, ...]
    received: dict = dataclasses.field(default_factory=dict)


def routed_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA, or where the layer is routed (`routed`): kernel 3 (a GroupRoute) or the dense edited attention for its
    decoding edits, kernel 5 for a decoding step's layer without edits (a MaskedDecodeRoute), kernel 4 for one on a
    per-head pruned cache (a RaggedRoute), SDPA and the last row's statistics for a lean prefill's layer (a
    StatsRoute). A GroupRoute in a call of several rows (a prefill whose edits act on its last row only,
    Method.prefill_edits_last_row_as_decoding) runs SDPA for all rows and kernel 3's decoding form for the last."""
    edits = _DECODE_EDITS.get(module)
    if not edits:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    if isinstance(edits, StatsRoute):
        last = torch.full((query.shape[0], 1), query.shape[2] - 1, device=query.device)
        for per_head in edits.per_head:
            edits.received[per_head] = received_attention(query, key, attention_mask, scaling, last,
                                                          per_head=per_head)  # fmt: skip
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if isinstance(edits, MaskedDecodeRoute):
        valid = edits.valid
        for mask in edits.masks:
            valid = valid & mask.view(valid.shape)
        if not edits.observers:
            return masked_decode(query, key, value, valid, scaling), None
        output, head_mean = masked_decode_head_mean(query, key, value, valid, scaling)
        for observe in edits.observers:
            observe(head_mean[:, None])
        return output, None
    if isinstance(edits, RaggedRoute):
        cache = edits.cache
        output = ragged_decode(query, cache.k_buf, cache.v_buf, cache.lengths, edits.cache_id, scaling, edits.kernel)
        return output, None
    if not isinstance(edits, GroupRoute):
        return edited_attention(query, key, value, attention_mask, scaling, edits), None
    if query.shape[2] == 1:
        return group_decode(query, key, value, edits.valid, edits.groups, edits.key_bias, scaling, edits.spec_id), None
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    last = group_decode(query[:, :, -1:], key, value, edits.valid, edits.groups, edits.key_bias, scaling, edits.spec_id)
    return torch.cat([output[:, :-1], last.to(output.dtype)], dim=1), None


# a compiled step sees kernel 3's decoding form as one operator (no graph break; the CUDA graph records its launch);
# its GroupSpec (tables and conditions, not tensors an operator can take) is found by the number GroupRoute gives it
_SPECS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_spec_ids = itertools.count()


def decode_output_like(query: torch.Tensor) -> torch.Tensor:
    """The decoding operators' output for a compiled step's tracing: [B, rows, H, d] for query [B, H, rows, d]."""
    batch, heads, rows, head_dim = query.shape
    return query.new_empty(batch, rows, heads, head_dim)


@torch.library.custom_op("vlm_efficient::fast_group_decode", mutates_args=())
def group_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                 groups: torch.Tensor, key_bias: torch.Tensor | None, scaling: float, spec_id: int) -> torch.Tensor:
    from .kernels import api as kernels

    return kernels.group_decode_attention(query, key, value, key_group=groups, spec=_SPECS[spec_id], key_valid=valid,
                                          scaling=scaling, key_bias=key_bias)  # fmt: skip


@group_decode.register_fake
def _(query, key, value, valid, groups, key_bias, scaling, spec_id):
    return decode_output_like(query)


# a RaggedKVCache is found by number as a GroupSpec is; the operator takes the buffers it reads (the step's write
# to them comes first in a compiled graph)
_RAGGED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_cache_ids = itertools.count()


@torch.library.custom_op("vlm_efficient::fast_ragged_decode", mutates_args=())
def ragged_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, cache_id: int,
                  scaling: float, kernel: bool) -> torch.Tensor:
    from .kernels import api as kernels

    cache = _RAGGED[cache_id]
    if kernel:
        return kernels.ragged_decode_attention(query, cache, scaling=scaling, backend="triton")
    return kernels.ragged_decode_attention_torch(query, cache, scaling=scaling)


@ragged_decode.register_fake
def _(query, keys, values, lengths, cache_id, scaling, kernel):
    return decode_output_like(query)


@torch.library.custom_op("vlm_efficient::fast_masked_decode", mutates_args=())
def masked_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    from .kernels import api as kernels

    return kernels.masked_decode_attention(query, key, value, key_valid=valid, scaling=scaling)


@masked_decode.register_fake
def _(query, key, value, valid, scaling):
    return decode_output_like(query)


@torch.library.custom_op("vlm_efficient::fast_masked_decode_head_mean", mutates_args=())
def masked_decode_head_mean(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor,
                            scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    from .kernels import api as kernels

    return kernels.masked_decode_attention(query, key, value, key_valid=valid, scaling=scaling, head_mean=True)


@masked_decode_head_mean.register_fake
def _(query, key, value, valid, scaling):
    return decode_output_like(query), query.new_empty(query.shape[0], key.shape[2], dtype=torch.float32)


AttentionInterface.register(ATTENTION_NAME, routed_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


PACKED_VISION_ATTENTION = "vlm_efficient_flash_packed"  # the fast path's packed vision towers (why "flash": below)


def packed_vision_attention(module, query, key, value, attention_mask, scaling=None, cu_seq_lens_q=None,
                            max_length_q=None, **kwargs):  # fmt: skip
    """A packed vision tower's attention (Qwen-VL: query [1, H, N, d] over every image and frame of the call, cut into
    sequences at cu_seq_lens_q) without the host read per layer that transformers' SDPA route makes to cut it
    (`lengths.tolist()` in every layer: 96 synchronizing calls per 32-frame Qwen2-VL prefill, each waiting for the
    GPU). Where every sequence has the longest one's length (the frames of a clip, images of one size: then
    max_length_q x count == N, known on the host), one SDPA over [count, H, L, d]; else the same cut as transformers',
    read once per layer. transformers gives a tower this packed call (cu_seq_lens_q, max_length_q, read once per tower
    call) only where the implementation's name contains "flash" (utils.generic.is_flash_attention_requested): hence
    the name."""
    heads, length, head_dim = query.shape[1:]
    count = cu_seq_lens_q.shape[0] - 1
    if max_length_q is not None and max_length_q * count == length:
        q, k, v = (t[0].reshape(t.shape[1], count, max_length_q, head_dim).transpose(0, 1) for t in (query, key, value))
        output = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)  # [count, H, L, d]
        return output.transpose(0, 1).reshape(heads, length, head_dim).transpose(0, 1)[None], None
    sizes = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    parts = [sdpa_attention_forward(module, q, k, v, None, scaling=scaling, is_causal=False)[0]
             for q, k, v in zip(*(t.split(sizes, dim=2) for t in (query, key, value)))]  # fmt: skip
    return torch.cat(parts, dim=1), None


AttentionInterface.register(PACKED_VISION_ATTENTION, packed_vision_attention)
AttentionMaskInterface.register(PACKED_VISION_ATTENTION, sdpa_mask)


def edit_tensors(layer_edits) -> list[dict]:
    """The tensors a kept step reloads at each call: per AttentionEdit its EDIT_TENSORS, or a GroupRoute's buffers."""
    if isinstance(layer_edits, GroupRoute):
        return [layer_edits.tensors()]
    if isinstance(layer_edits, StatsRoute):
        return []
    return [{name: getattr(edit, name) for name in EDIT_TENSORS} for edit in layer_edits]


def empty_like_edits(layer_edits):
    """Edits of the same structure as `layer_edits` whose tensors are new buffers (filled by load_edits)."""
    def empty(tensors: dict) -> dict:
        return {name: torch.empty_like(t) for name, t in tensors.items() if t is not None}

    if isinstance(layer_edits, GroupRoute):
        return dataclasses.replace(layer_edits, **empty(layer_edits.tensors()))
    if isinstance(layer_edits, StatsRoute):
        return StatsRoute(layer_edits.per_head)
    return [dataclasses.replace(edit, **empty(tensors)) for edit, tensors in zip(layer_edits, edit_tensors(layer_edits))]


def reloadable(layer_edits) -> bool:
    """Whether a kept step can serve these edits by reloading tensors: no post-softmax or observing function (it
    holds this call's tensors) and every edit field a tensor."""
    if isinstance(layer_edits, (GroupRoute, StatsRoute)):
        return True
    return all(edit.post_softmax is None and edit.observe is None
               and all(isinstance(t, (torch.Tensor, type(None))) for t in tensors.values())
               for edit, tensors in zip(layer_edits, edit_tensors(layer_edits)))  # fmt: skip


def edit_structure(layer_edits) -> tuple:
    """What a captured step depends on besides the reloaded tensors: their shapes and dtypes, and a GroupRoute's spec
    values (the graph reads the folded tables of the spec it was captured with)."""
    shapes = tuple(tuple((name, tuple(t.shape), t.dtype) for name, t in tensors.items() if t is not None)
                   for tensors in edit_tensors(layer_edits))  # fmt: skip
    if isinstance(layer_edits, StatsRoute):
        return "stats", layer_edits.per_head
    if not isinstance(layer_edits, GroupRoute):
        return shapes
    spec = layer_edits.spec
    if "fast_path" not in spec._cache:
        tables = torch.cat([t.flatten() for t in spec.tables()]).tolist()
        spec._cache["fast_path"] = (spec.num_heads, spec.num_groups, spec.cond_mass_groups, spec.cond_mass_min,
                                    spec.cond_ratio_groups, spec.cond_ratio_min, tuple(tables))  # fmt: skip
    return shapes, spec._cache["fast_path"]


@contextlib.contextmanager
def routed(config, layers, edits: dict):
    """While it lasts, the attention calls of layers[idx] for idx in `edits` run with those edits (routed_attention);
    the other layers stay on SDPA."""
    if not edits:
        yield
        return
    saved = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    for idx, layer_edits in edits.items():
        _DECODE_EDITS[layers[idx].self_attn] = layer_edits
    try:
        yield
    finally:
        config._attn_implementation = saved
        for idx in edits:
            _DECODE_EDITS.pop(layers[idx].self_attn, None)


def group_route(parts: list, keys_at: torch.Tensor | None, capacity: int, heads: int) -> GroupRoute | None:
    """A layer's structured edits `parts` (each editing method's Method.kernel_edit, None where it does not edit) as
    kernel 3's decoding form over keys at original positions `keys_at` [B, n] (None: every prompt position, in order)
    then capacity - n generated slots (group 0), where they compose into one group edit; else None (the dense edited
    attention)."""
    from .kernels import api as kernels

    if any(part is UNSTRUCTURED for part in parts):
        return None
    plan = compose([part for part in parts if part is not None], heads)
    if plan is None or plan.group is None or plan.mask is not None or plan.scale is not None:
        return None
    edit = plan.group
    if edit.spec.num_groups > kernels.MAX_DECODE_GROUPS:
        return None
    def at_keys(per_position: torch.Tensor, fill) -> torch.Tensor:
        found = per_position if keys_at is None else at_positions(per_position, keys_at, fill)
        return torch.nn.functional.pad(found, (0, capacity - found.shape[1]))

    bias = None if edit.key_bias is None else at_keys(edit.key_bias.float(), 0.0)
    return GroupRoute(edit.spec, at_keys(edit.groups, 0).to(torch.int32), bias)


def edits_key(edits: dict) -> tuple:
    """What a graph captured with these layer edits ({layer: edits}) depends on: per layer the structure of its edits
    (edit_structure) and the first layer that shares them (layers given one edits object share one set of buffers)."""
    structure, first = {}, {}
    for idx, layer_edits in sorted(edits.items()):
        if id(layer_edits) not in structure:
            structure[id(layer_edits)], first[id(layer_edits)] = edit_structure(layer_edits), idx
    return tuple((idx, first[id(layer_edits)], structure[id(layer_edits)]) for idx, layer_edits in sorted(edits.items()))


def edit_buffers(edits: dict) -> dict:
    """{layer: edits of the same structure as `edits`' whose tensors are new buffers}, which a captured graph reads and
    load_edit_buffers fills for each call; layers given one edits object share one set of buffers (edits_key)."""
    made = {}
    for layer_edits in edits.values():
        if id(layer_edits) not in made:
            made[id(layer_edits)] = empty_like_edits(layer_edits)
    return {idx: made[id(layer_edits)] for idx, layer_edits in edits.items()}


def load_edit_buffers(buffers: dict, edits: dict) -> None:
    """Copy this call's edits into the buffers edit_buffers made, once per shared set."""
    loaded = set()
    for idx, layer_edits in edits.items():
        if id(buffers[idx]) in loaded:
            continue
        loaded.add(id(buffers[idx]))
        for targets, tensors in zip(edit_tensors(buffers[idx]), edit_tensors(layer_edits)):
            for name, tensor in tensors.items():
                if tensor is not None:
                    targets[name].copy_(tensor)


def shared_group_route(made: dict, parts: list, keys_at: torch.Tensor | None, capacity: int, heads: int):
    """group_route, made once per (edit objects, keys_at object, capacity) in `made`, a dict kept for one call: layers
    given the same edit objects over the same keys share one route. `made` holds the parts and keys, so no id is
    reused while it lives."""
    key = (*map(id, parts), id(keys_at), capacity)
    if key not in made:
        made[key] = (parts, keys_at, group_route(parts, keys_at, capacity, heads))
    return made[key][2]
