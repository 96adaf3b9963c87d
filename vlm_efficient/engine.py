"""The patching engine: hooks, the registered attention implementation and sequence shrinking.

No model's forward is replaced. The engine uses the hook points of transformers 5.x:
- a forward pre-hook on the top-level model sees input_ids and the cache: it builds the modality layout at prefill;
- a pre-hook on the text model is the BEFORE_LLM stage: methods that act on the projected visual features (pruning,
  merging) shrink `inputs_embeds` there, before any decoder layer and before the KV cache exists; the adapter also
  takes over per-layer visual injection there (Qwen3-VL deepstack);
- a pre-hook on every decoder layer runs the "probe" attention requests of that layer, shrinks the sequence where a
  method prunes, and gives layers on fewer tokens their own rotary tables, position ids and masks;
- one registered attention implementation delegates to SDPA, untouched, and computes the extra statistics a method
  asked for in that layer (only the query rows it needs); on CUDA (VLM_EFFICIENT_KERNELS) each call goes through the
  kernel router (kernel_plan.py), which runs edited layers and statistics on the Triton kernels where it can;
- where a method needs logits without rotary position (`uses_unrotated`), forward hooks on the modules that output
  the pre-rotary query and key (the adapter names them) capture them for that layer's attention call.

Every method decides once per generate(), at the prefill. generate(use_cache=False) feeds the whole sequence at every
step, which would re-decide each method on a different prompt: a wrapped model keeps the prefill's KV cache then and
feeds the model only the new tokens, so its tokens are those of the default, cached generate() (its memory too).

Positions: every row and every cached key is identified by its ORIGINAL position in the prompt (the column of the
2-D attention mask). Pruned tokens keep their original positions, so rotary phases and decoding stay right
(methods that drop tokens before the LLM may ask for contiguous ones instead: `positions=renumber`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .adapters import CACHE_KWARGS, ModelAdapter, encoded_features, encoded_sources, get_adapter, kv_cache
from .attention import edited_attention, received_attention
from .kernel_plan import KernelRouter
from .layout import build_layout
from .method import (BEFORE_LLM, AttentionContext, AttentionStats, Method, PerThread, Selection,
                     edits_attention)
from .placement import execution_device, head_shards
from .ragged_cache import store_per_head
from .run_state import RunState, _gather_rows
from .static_cache import allocated_bytes, on_static_cache, padding_mask, written_keys

ATTENTION_NAME = "vlm_efficient"

# attention module -> engine; weak so a deleted model leaves nothing behind.
_ENGINE_OF_ATTENTION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# wrapped model -> its engine (vlm_efficient.wrap / unwrap keep it); weak for the same reason
WRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def wrapped_engine(model: nn.Module) -> Engine | None:
    """The engine of a wrapped model, or None."""
    return WRAPPED.get(model)


@contextlib.contextmanager
def plain_calls(model: nn.Module, run: RunState | None = None):
    """Calls of `model` inside this block run as on the unwrapped model (no method acts) and leave the engine's state
    of the call in progress untouched (Engine.plain); on a model that is not wrapped, a plain block. `run` continues
    an earlier side generation; the yielded holder's `.run` is the state the block's calls left, to pass back."""
    engine = wrapped_engine(model)
    if engine is None:
        yield _SidePass(run)
        return
    with engine.plain(run) as holder:
        yield holder


def _engine_attention(module, query, key, value, attention_mask, **kwargs):
    engine = _ENGINE_OF_ATTENTION.get(module)
    run = engine.run if engine is not None else None
    if run is not None and run.static_cache:
        key, value, attention_mask = written_keys(engine, module.layer_idx, query.shape[2], key, value, attention_mask)
    if engine is None or (module.layer_idx in engine.plain_layers and engine.probing is None
                          and not engine.returns_weights):
        # no method acts in this layer: SDPA untouched, without the engine's per-call routing (host time that a
        # batch-1 prefill and every decoding step pay in full)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if engine.shards is not None:
        # tensor parallel: the methods see every rank's heads (placement.py); this rank keeps its own heads' output
        shards = engine.shards
        output, weights = _acting_attention(engine, module, *map(shards.gather, (query, key, value)), attention_mask,
                                            kwargs)
        return shards.local(output, 2), (None if weights is None else shards.local(weights, 1))
    return _acting_attention(engine, module, query, key, value, attention_mask, kwargs)


def _acting_attention(engine, module, query, key, value, attention_mask, kwargs: dict):
    """An attention call of a layer where a method acts (or a probe or output_attentions asks)."""
    if engine.probing is not None:
        # a probe wants this layer's attention statistics before the layer really runs: no output is needed
        engine.deliver_stats(engine.probing, module.layer_idx, query, key, attention_mask, kwargs.get("scaling"))
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    if engine.returns_weights:
        return engine.attend_with_weights(module, query, key, value, attention_mask, kwargs)
    return engine.attend(module, query, key, value, attention_mask, kwargs)


def register_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, _engine_attention)
    # Without the mask function under the same name create_causal_mask returns None and padding is ignored.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


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


def build_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, attention_mask_2d: torch.Tensor):
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


def left_aligned_index(keep: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """([B, width] indices of the kept rows of each sample, right-aligned (left slots -1) so the last prompt token
    stays last when samples keep different numbers of rows, or None when every row is kept; whether every sample
    keeps the same number of rows). One host read (the counts' extremes): the width sizes the tensors."""
    counts = keep.sum(1)
    low, width = torch.stack([counts.min(), counts.max()]).tolist()
    if low == keep.shape[1]:
        return None, True
    # a stable sort puts each sample's dropped rows first and its kept rows last, both in position order
    order = keep.to(torch.uint8).sort(dim=1, stable=True).indices[:, keep.shape[1] - width :]
    slot = torch.arange(width, device=keep.device)
    return torch.where(slot >= width - counts[:, None], order, -1), low == width


def _new_tokens_only(kwargs: dict, fed: int) -> None:
    """A decoding call of generate(use_cache=False) holds the whole sequence: keep what the cache does not hold yet
    (the images are in the cache: their pre-encoded features are dropped)."""
    for name in ("input_ids", "inputs_embeds", "mm_token_type_ids", "token_type_ids"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name][:, fed:]
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"][..., fed:]
    kwargs.pop("mm_encoder_outputs", None)


@dataclass
class _SidePass:
    run: RunState | None


class Engine:
    """Holds the hooks and per-call state of one wrapped model. The per-call state is per thread: concurrent
    generate() calls of one model (a server's threads) each see their own run."""

    run: RunState | None = PerThread()  # the calling thread's current (or last) call
    probing: Method | None = PerThread()  # the method whose probe request is being computed
    _captured_grids: list[torch.Tensor] = PerThread(list)  # grid_thw of vision-tower calls made before prefill
    _pre_rotary: dict[int, dict[str, torch.Tensor]] = PerThread(dict)  # this call's pre-rotary q / k, per layer
    _plain: bool = PerThread(bool)  # inside a plain() block: no method acts
    returns_weights: bool = PerThread(bool)  # the call asked for output_attentions

    def __init__(self, model: nn.Module, methods: list[Method]):
        self.model = model
        self.adapter: ModelAdapter = get_adapter(model)
        self._methods = methods
        self.layers = self.adapter.decoder_layers(model)
        self.num_layers = len(self.layers)
        self.text_config = self.adapter.text_config(model)
        self.latest_run: RunState | None = None  # the last call of any thread (stats() of a thread that made none)
        self.router = KernelRouter()  # attention calls on the Triton kernels (VLM_EFFICIENT_KERNELS)
        self._handles: list = []
        self._original_attention = self.text_config._attn_implementation
        self.fast_path = None  # vlm_efficient.fast_path.FastPath where wrap(..., fast=True)
        try:
            for method in methods:
                method.bind(self)
            self.shards = head_shards(self)  # tensor parallelism (tp_plan), or None
        except Exception:
            self.uninstall_handles()  # hooks a method's bind() added before a later one refused
            raise
        self._prune_layers = {layer for m in methods for layer in m.prune_layers()}
        self._shrinks = bool(self._prune_layers)
        self.per_head_cache = any(type(m).decode_cache_keep is not Method.decode_cache_keep for m in methods)
        # methods that may edit attention beside a per-head cache: asked at its decoding calls, refused if they do
        self.decode_editors = [m.name for m in methods if self.per_head_cache and edits_attention(m)
                               and type(m).decode_cache_keep is Method.decode_cache_keep]  # fmt: skip
        # methods pruning inside the LLM with positions=renumber: every shrunk layer's rows get contiguous positions
        self.renumbers_inside = any(getattr(m, "positions", "original") == "renumber" for m in methods
                                    if m.prune_layers() - {BEFORE_LLM})  # fmt: skip
        self.probe_layers = {
            idx for idx in range(self.num_layers)
            if any((r := m.attention_request(idx)) is not None and r.probe for m in methods)
        }  # fmt: skip
        self._acting_plain_layers = self._plain_layers()

    # what acts in the calling thread: nothing inside its plain() blocks
    @property
    def methods(self) -> list[Method]:
        return [] if self._plain else self._methods

    @property
    def prune_layers(self) -> set[int]:
        return set() if self._plain else self._prune_layers

    @property
    def shrinks(self) -> bool:
        return not self._plain and self._shrinks

    @property
    def plain_layers(self) -> frozenset[int]:
        return frozenset(range(self.num_layers)) if self._plain else self._acting_plain_layers

    def _plain_layers(self) -> frozenset[int]:
        """Layers whose attention calls no method acts on: no edit (no method edits attention anywhere), no statistics,
        no pre-rotary capture, no per-head cache. Their calls skip the engine's routing (_engine_attention)."""
        if self.per_head_cache or any(edits_attention(m) for m in self.methods):
            return frozenset()
        return frozenset(
            idx for idx in range(self.num_layers)
            if all(m.attention_request(idx) is None and not m.uses_unrotated(idx) for m in self.methods)
        )  # fmt: skip

    # ---- installation -------------------------------------------------------------------------------------------
    def install(self) -> None:
        register_attention()
        self.model.set_attn_implementation({"text_config": ATTENTION_NAME})
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        # grids seen inside a forward belong to that forward; only those seen between calls (generate() encodes
        # the images before prefill) are carried to the next prefill
        self._handles.append(self.model.register_forward_hook(lambda *_: self._captured_grids.clear()))
        vision = self.adapter.vision_capture_module(self.model)
        if vision is not None:
            self._handles.append(vision.register_forward_pre_hook(self._on_vision_call, with_kwargs=True))
        text_model = self.adapter.text_model(self.model)
        self._handles.append(text_model.register_forward_pre_hook(self._on_text_model_call, with_kwargs=True))
        for idx, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(idx), with_kwargs=True))
            if type(self.adapter).after_decoder_layer is not ModelAdapter.after_decoder_layer:
                self._handles.append(layer.register_forward_hook(self._layer_post_hook(idx)))
            if any(m.edits_head_outputs() for m in self.methods):
                o_proj = self.adapter.head_output_module(layer)
                self._handles.append(o_proj.register_forward_pre_hook(self._head_output_hook(idx)))
            if any(m.uses_unrotated(idx) for m in self.methods):
                modules = self.adapter.pre_rotary_modules(layer.self_attn)
                for part, module in zip(("query", "key"), modules):
                    self._handles.append(module.register_forward_hook(self._pre_rotary_hook(idx, part)))
            _ENGINE_OF_ATTENTION[layer.self_attn] = self

    def before_prefill(self, fn) -> None:
        """Call fn(forward kwargs) before each prefill of the wrapped model (not before decode steps, not inside plain
        side passes): a method's side pass on the prompt (a probe generation, the prompt without its image). The hook
        is removed with the engine's own hooks at unwrap."""

        def hook(module, args, kwargs):
            if self._plain:
                return None
            inputs = dict(kwargs)
            if args:
                inputs["input_ids"] = args[0]
            cache = kv_cache(inputs)
            if cache is not None and cache.get_seq_length() > 0:
                return None
            # on a static cache generate() passes a mask sized to the cache: the cache-free side pass needs the 2-D one
            inputs["attention_mask"] = padding_mask(inputs.get("attention_mask"), prefill=True)
            with torch.no_grad():
                fn(inputs)
            return None

        self.add_handle(self.model.register_forward_pre_hook(hook, with_kwargs=True))

    def add_handle(self, handle) -> None:
        """Register a hook handle (or anything with .remove()) that a method installed in bind(): unwrap removes it,
        and so does a failed wrap."""
        self._handles.append(handle)

    @contextlib.contextmanager
    def plain(self, run: RunState | None = None):
        """Calls of the model inside this block run as on the unwrapped model (no method acts) and leave the state of
        the call in progress untouched: side passes such as a text-only stream or a probe generation. `run`
        continues an earlier side pass; the yielded holder's `.run` is the state this block's calls left."""
        holder = _SidePass(run)
        saved = (self.run, self._plain, list(self._captured_grids))
        self.run, self._plain = run, True
        try:
            yield holder
        finally:
            holder.run = self.run
            self.run, self._plain, grids = saved
            self._captured_grids[:] = grids

    def copy_unwrapped(self, memo: dict) -> nn.Module:
        """copy.deepcopy of the model as it was before wrap(), under copy's protocol (memo): the hooks of this engine
        and of its methods are not copied, and what else they changed is undone on the copy."""
        for handle in self._handles:
            if isinstance(handle, RemovableHandle):
                hooks = handle.hooks_dict_ref()
                if hooks is not None and handle.id in hooks:
                    memo[id(hooks[handle.id])] = None  # the hook is not copied (it would copy this engine)
            elif not hasattr(handle, "remove_from_copy"):
                raise TypeError(f"copy.deepcopy of a wrapped model: {handle!r} cannot be undone on the copy; unwrap "
                                "the model, copy it, and wrap each copy")  # fmt: skip
        reductor = self.model.__reduce_ex__(4)
        copied = copy._reconstruct(self.model, memo, *reductor)
        for handle in self._handles:
            if isinstance(handle, RemovableHandle):
                for ref in (handle.hooks_dict_ref, *getattr(handle, "extra_dict_ref", ())):
                    original = ref()
                    if original is not None and id(original) in memo:
                        memo[id(original)].pop(handle.id, None)
            else:
                handle.remove_from_copy(memo)
        copied.set_attn_implementation({"text_config": self._original_attention})
        return copied

    def uninstall_handles(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()

    def uninstall(self) -> None:
        self.uninstall_handles()
        for layer in self.layers:
            _ENGINE_OF_ATTENTION.pop(layer.self_attn, None)
        self.model.set_attn_implementation({"text_config": self._original_attention})
        self.run = None

    # ---- hooks --------------------------------------------------------------------------------------------------
    def _on_model_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kv_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        attention_mask = padding_mask(kwargs.get("attention_mask"), prefill=past == 0)
        asked = kwargs.get("output_attentions") or getattr(self.model.config, "output_attentions", False)
        self.returns_weights = bool(asked)
        if past == 0:
            if input_ids is None:
                raise ValueError("a wrapped model needs input_ids at prefill to locate the image tokens")
            if kwargs.get("labels") is not None and self.shrinks:
                raise ValueError(
                    f"labels: {', '.join(m.name for m in self.methods if m.prune_layers())} drops prompt rows, so the "
                    "logits cover only the kept rows and the model's loss cannot pair them with the labels. Compute "
                    "the loss on the answer tokens yourself (generate, or a forward without labels), or wrap without "
                    "pruning."
                )
            encoded = kwargs.get("mm_encoder_outputs") or {}
            captured = iter(self._captured_grids)
            grids = {modality: next(captured, None) for modality in ("image", "video") if encoded.get(modality)}
            self._captured_grids.clear()
            inputs = {**kwargs, "captured_grid_thw": grids}
            static = on_static_cache(cache)
            if static and self.shrinks and any(self.adapter.mask_group(self.model, i) for i in range(self.num_layers)):
                raise ValueError(
                    f"token pruning with HF's static cache does not support {self.model.config.model_type}'s "
                    "sliding-window layers yet: use the default dynamic cache (no cache_implementation='static')"
                )
            layout = build_layout(self.adapter, self.model, input_ids, attention_mask, inputs)
            self.run = RunState(layout=layout, prompt_length=input_ids.shape[1], attention_mask_2d=layout.valid,
                                static_cache=static)  # fmt: skip
            features = encoded_features(kwargs)
            if features and len({id(feature) for feature in features}) < len(features):
                self.run.image_sources = encoded_sources(features)
            if not self._plain:
                self.latest_run = self.run
            if kwargs.get("use_cache") is False and kwargs.get("mm_encoder_outputs") and not self._plain:
                # generate(use_cache=False) (only generate() passes pre-encoded images): decode on this prefill's cache
                self.run.full_sequence = kwargs["use_cache"] = True
                return args, kwargs
            return None
        if self.run is None:
            raise RuntimeError("decode step without a prefill seen by the wrapped model: wrap before generating")
        run = self.run
        # The original length so far comes from the engine's own count: the cache may hold fewer keys.
        run.fed = run.attention_mask_2d.shape[1]
        if run.full_sequence:
            _new_tokens_only(kwargs, run.fed)
            input_ids = kwargs.get("input_ids")
        run.prefill = False
        run.decode_steps += 1
        run.rows = None
        run.layer_kwargs_cache.clear()
        if run.decode_steps == 1 and self.per_head_cache:
            store_per_head(self, run, cache)
        if run.decode_steps == 1 and run.static_cache:
            run.allocated_kv_bytes = allocated_bytes(cache)
        step = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
        if attention_mask is not None:
            run.attention_mask_2d = attention_mask.bool()
        else:
            ones = torch.ones(run.layout.batch_size, step, dtype=torch.bool, device=run.attention_mask_2d.device)
            run.attention_mask_2d = torch.cat([run.attention_mask_2d, ones], dim=1)
        return args, kwargs

    def _on_vision_call(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is not None:
            self._captured_grids.append(grid)

    def _on_text_model_call(self, module, args, kwargs):
        run = self.run
        if run is None:
            return None
        self.adapter.on_text_model_call(kwargs, run)
        if run.prefill:
            if BEFORE_LLM in self.prune_layers and run.layout.has_visual:
                self._shrink_input(kwargs, run)
        elif run.input_positions is not None:
            self._compact_decode_inputs(kwargs, run)
        return args, kwargs

    def _layer_pre_hook(self, idx: int):
        def hook(module, args, kwargs):
            run = self.run
            if run is None:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            # the layer's device under accelerate's dispatch: this layer's inputs are built there (placement.py)
            hidden = hidden.to(execution_device(module, hidden.device))
            if run.prefill:
                if self.probe_layers and idx in self.probe_layers:
                    self._run_probes(idx, module, hidden, self._layer_kwargs(idx, kwargs, run, hidden.device), run)
                if idx in self.prune_layers and run.layout.has_visual:
                    hidden = self._apply_selections(idx, hidden, run)
                run.layer_positions[idx] = run.positions
                tokens, visual = run.row_counts()
                run.tokens_per_layer.append(tokens)
                run.visual_per_layer.append(visual)
            for method in self.methods:
                if method.observes_hidden(idx):
                    method.observe_hidden(idx, run, hidden)
            kwargs = self._layer_kwargs(idx, kwargs, run, hidden.device)
            return (hidden, *args[1:]), kwargs

        return hook

    def _head_output_hook(self, idx: int):
        def hook(module, args):
            run = self.run
            if run is None:
                return None
            scale = None
            for method in self.methods:
                factors = method.head_output_scale(idx, run)
                if factors is not None:
                    scale = factors if scale is None else scale * factors
            if scale is None:
                return None
            heads_out = args[0]
            heads = self.text_config.num_attention_heads
            per_head = heads_out.view(*heads_out.shape[:-1], heads, -1)
            scale = scale.to(per_head.device, per_head.dtype)
            scale = scale.view(-1, 1, heads, 1) if scale.dim() == 2 else scale.view(1, 1, heads, 1)
            return ((per_head * scale).view_as(heads_out), *args[1:])

        return hook

    def _layer_post_hook(self, idx: int):
        def hook(module, args, output):
            if self.run is None:
                return None
            if isinstance(output, tuple):
                return (self.adapter.after_decoder_layer(idx, output[0], self.run), *output[1:])
            return self.adapter.after_decoder_layer(idx, output, self.run)

        return hook

    # ---- selections: pruning and merging ------------------------------------------------------------------------
    def _select(self, stage: int, hidden: torch.Tensor, run: RunState):
        """Compose the selections of every method acting at `stage`: keeps intersect, merges apply in order; the one
        `order` a method may give -> (keep or None, hidden, order or None)."""
        keep = order = None
        for method in self.methods:
            if stage not in method.prune_layers():
                continue
            selected = method.select_tokens(stage, run, hidden)
            if selected is None:
                continue
            if isinstance(selected, torch.Tensor):
                selected = Selection(keep=selected)
            if selected.hidden is not None:
                hidden = selected.hidden
            keep = selected.keep if keep is None else keep & selected.keep
            if selected.order is not None:
                if order is not None:
                    raise ValueError(f"{method.name}: two methods reorder the kept tokens at the same stage")
                order = selected.order
        return keep, hidden, order

    def _apply_selections(self, idx: int, hidden: torch.Tensor, run: RunState) -> torch.Tensor:
        keep, hidden, order = self._select(idx, hidden, run)
        if order is not None:
            raise ValueError(f"layer {idx}: a selection's order applies before the LLM only")
        if keep is None:
            return hidden
        index, aligned = left_aligned_index(keep.to(hidden.device))
        if index is None:
            return hidden
        run.aligned = run.aligned and aligned
        current = run.rows if run.rows is not None else torch.arange(hidden.shape[1], device=hidden.device).expand(
            hidden.shape[0], -1)
        run.rows = _gather_rows(current, index, fill=-1)
        run.layer_kwargs_cache.clear()
        return _gather_seq(hidden, index.clamp(min=0), seq_dim=1)

    def _shrink_input(self, kwargs: dict, run: RunState) -> None:
        """BEFORE_LLM: shrink the text model's inputs so every layer, layer 0 included, and the KV cache see only the
        kept tokens. The text model then builds its masks and rotary tables for the compact rows itself."""
        embeds = kwargs["inputs_embeds"]
        keep, embeds, order = self._select(BEFORE_LLM, embeds, run)
        index, run.aligned = (None, True) if keep is None else left_aligned_index(keep.to(embeds.device))
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
        if any(getattr(m, "positions", "original") == "renumber" for m in self.methods if BEFORE_LLM in m.prune_layers()):
            position_ids = renumbered(position_ids, kwargs["attention_mask"].bool())
        kwargs["position_ids"] = position_ids
        run.last_position_ids = position_ids[..., -1]

    def _compact_decode_inputs(self, kwargs: dict, run: RunState) -> None:
        """Decoding after a BEFORE_LLM shrink: the cache holds the compact prompt, so position ids continue from the
        last prompt token's original ones (the model's own would count cached keys). Every layer gets its mask from
        _layer_kwargs (the cached prompt keys of each layer are known), so the text model is given no mask to build:
        its own would not fit the cache, and building it reads the mask on the host (a GPU sync per step)."""
        step = kwargs["inputs_embeds"].shape[1]
        device = kwargs["inputs_embeds"].device
        kwargs["attention_mask"] = None
        offsets = torch.arange(run.fed - run.prompt_length + 1, run.fed - run.prompt_length + 1 + step, device=device)
        kwargs["position_ids"] = run.last_position_ids.to(device)[..., None] + offsets

    # ---- attention statistics -------------------------------------------------------------------------------------
    def _run_probes(self, idx: int, layer: nn.Module, hidden: torch.Tensor, kwargs: dict, run: RunState) -> None:
        """Requests marked `probe` see layer idx's attention on its input before the layer runs (and before this
        layer's pruning): the layer's own attention module computes q and k; the engine skips the softmax output."""
        for method in self.methods:
            request = method.attention_request(idx)
            if request is None or not request.probe:
                continue
            self.probing = method
            try:
                attention_kwargs = {k: v for k, v in kwargs.items() if k not in (*CACHE_KWARGS, "use_cache")}
                layer.self_attn(hidden_states=self.adapter.attention_input(layer, hidden), **attention_kwargs)
            finally:
                self.probing = None

    def attend(self, module, query, key, value, attention_mask, kwargs: dict):
        """One attention call of a layer: through the kernel router where VLM_EFFICIENT_KERNELS selects it for this
        call (kernel_plan.py), else SDPA untouched or, where a method edits the layer, the dense torch path; then the
        statistics the methods asked for (except those the router's fused kernel already delivered)."""
        idx, scaling = module.layer_idx, kwargs.get("scaling")
        if self.run is not None and not self.run.prefill and idx in self.run.ragged:
            return self.ragged_attention(idx, query, key, scaling)
        # the kernels know causality, padding and the methods' edits: a family mask with more (mask_group) stays dense
        routed = None
        if self.router.backend(self.run, query.device) is not None and self.adapter.mask_group(self.model, idx) is None:
            unrotated = self.pre_rotary(idx, query, key)
            routed, edits = self._routed_attention(module, query, key, value, attention_mask, kwargs)
        else:
            edits = self.attention_edits(idx, query, key)
            unrotated = self.pre_rotary(idx, query, key)
        if routed is None:
            output = self.dense_attention(module, query, key, value, attention_mask, kwargs, scaling, edits, unrotated)
            delivered = ()
        else:
            output, stats = routed
            for method, delivered_stats in stats:
                method.observe_attention(idx, self.run, delivered_stats)
            delivered = tuple(method for method, _ in stats)
        self.after_attention(module, query, key, attention_mask, scaling, delivered)
        return output

    def _routed_attention(self, module, query, key, value, attention_mask, kwargs: dict):
        """(the router's (output, statistics) or None, the dense edits for the engine's path where it is None). The
        router gets the layer's composed kernel edits and statistics requests; the methods without a structured form
        are asked here, and where one edits this call the layer takes the dense path."""
        idx, run = module.layer_idx, self.run
        layer_plan = self.router.layer_plan(idx, run, self.methods, query.shape[1])
        plan, unstructured, _ = layer_plan
        if plan is None:
            self.router.dense(run, idx)
            return None, self.attention_edits(idx, query, key)
        if unstructured:
            context = self.attention_context(idx, query)
            known = {id(method): self.method_edit(method, idx, context) for method in unstructured}
            if any(edit is not None for edit in known.values()):
                self.router.dense(run, idx)
                return None, self.attention_edits(idx, query, key, known)
        requests = [(m, r) for m in self.methods if (r := m.attention_request(idx)) is not None]
        routed = self.router.attend(module, query, key, value, attention_mask, kwargs, run, layer_plan, requests)
        return routed, (self.attention_edits(idx, query, key) if routed is None else [])

    def attend_with_weights(self, module, query, key, value, attention_mask, kwargs: dict):
        """A call under output_attentions: the dense torch path, which returns the attention probabilities after the
        methods' edits (before any head-output scaling), over the layer's current rows and cached keys: a pruned
        layer's rows are the original positions in run.layer_positions."""
        idx, scaling = module.layer_idx, kwargs.get("scaling")
        if self.run is not None and not self.run.prefill and idx in self.run.ragged:
            raise ValueError(
                f"output_attentions: layer {idx} decodes on a per-head pruned KV cache (plphp:cache=ragged), whose "
                "heads hold different keys. Use plphp:cache=mask (dense cache) to read the attention weights."
            )
        edits = self.attention_edits(idx, query, key)
        unrotated = self.pre_rotary(idx, query, key)
        dense_scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        output, weights = edited_attention(query, key, value, attention_mask, dense_scaling, edits, unrotated,
                                           weights=True)  # fmt: skip
        self.after_attention(module, query, key, attention_mask, scaling)
        return output, weights

    def ragged_attention(self, idx: int, query: torch.Tensor, key: torch.Tensor, scaling):
        """A decoding call of a layer on a per-head pruned cache: each query head attends to its KV head's kept keys
        (the cache layer already appended this step's token); kernel 4 where the router runs Triton, else the same
        computation in torch ops."""
        from .kernels import api as kernels

        if self.decode_editors and self.attention_edits(idx, query, key):
            raise ValueError(
                f"layer {idx} decodes on a per-head pruned KV cache (plphp:cache=ragged, kernel 4, which applies no "
                f"attention edit), and {', '.join(self.decode_editors)} edits its decoding attention. Use "
                "plphp:cache=mask (dense cache, decode mask) to combine them."
            )
        cache = self.run.ragged[idx].ragged
        scaling = kernels.default_scaling(query) if scaling is None else scaling
        self.router.routes(self.run)[("decode", idx)] = "ragged"
        if self.router.backend(self.run, query.device) == "triton":
            return kernels.ragged_decode_attention(query, cache, scaling=scaling, backend="triton"), None
        return kernels.ragged_decode_attention_torch(query, cache, scaling=scaling), None

    @staticmethod
    def dense_attention(module, query, key, value, attention_mask, kwargs, scaling, edits, unrotated):
        """The path with the kernels off: SDPA untouched, or the dense torch attention where `edits` edit the call."""
        if not edits:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return edited_attention(query, key, value, attention_mask, scaling, edits, unrotated), None

    def attention_context(self, idx: int, query: torch.Tensor, kv_len: int | None = None) -> AttentionContext:
        """What attention_edit gets: original positions of this call's query rows and of layer idx's cached keys."""
        queries, keys = self.run.attention_positions(idx, query.shape[2], query.device, kv_len)
        return AttentionContext(queries, keys, self.run.prefill, query.shape[1])

    def attention_edits(self, idx: int, query: torch.Tensor, key: torch.Tensor, known: dict | None = None) -> list:
        """The methods' AttentionEdits of this call of layer idx, in method order. `known`: {id(method): edit} of
        methods already asked in this call (the kernel router), not asked again."""
        run = self.run
        if run is None:
            return []
        context = None
        edits = []
        for method in self.methods:
            if not edits_attention(method):
                continue
            if known is not None and id(method) in known:
                edit = known[id(method)]
            else:
                if context is None:
                    grouped = self.adapter.mask_group(self.model, idx) is not None
                    context = self.attention_context(idx, query, key.shape[2] if grouped else None)
                edit = self.method_edit(method, idx, context)
            if edit is not None:
                edits.append(edit)
        return edits

    def method_edit(self, method: Method, idx: int, context: AttentionContext):
        """One method's AttentionEdit for this call (or None), as the dense path takes it."""
        edit = method.attention_edit(idx, self.run, context)
        if edit is not None and edit.allow is not None:  # added pairs never reach padding or slot-padding keys
            valid = self.run.valid_keys(context.key_positions)
            edit = dataclasses.replace(edit, allow=edit.allow & valid[:, None, None])
        return edit

    def _pre_rotary_hook(self, idx: int, part: str):
        def hook(module, args, output):
            if self.run is not None:
                self._pre_rotary.setdefault(idx, {})[part] = output

        return hook

    def pre_rotary(self, idx: int, query: torch.Tensor, key: torch.Tensor):
        """(query [B, Hq, q, d], key [B, Hkv, m, d]) before rotary position for this call of layer idx, or None where
        no method declared uses_unrotated(idx). The adapter names the modules whose outputs they are (q_proj / k_proj,
        or Qwen3's q_norm / k_norm, which act before rotary). The prefill keeps the prompt's pre-rotary keys of the
        rows this layer caches (after any pruning, so they stay aligned with the cache); decoding gets them back as the
        first m = (cached prompt keys) of the layer's keys. Keys of generated tokens are not kept: the base logit of
        a pair on them stays rotated (generated tokens are text; no method needs them unrotated)."""
        captured = self._pre_rotary.pop(idx, None)
        run = self.run
        if captured is None or run is None or not any(m.uses_unrotated(idx) for m in self.methods):
            return None
        batch, _, q_len, dim = query.shape
        plain_query = captured["query"].reshape(batch, q_len, -1, dim).transpose(1, 2)
        if run.prefill:
            plain_key = captured["key"].reshape(batch, q_len, -1, dim).transpose(1, 2)
            if plain_key.shape[2] != key.shape[2]:
                raise ValueError(
                    f"layer {idx}: the cache handed the attention {key.shape[2]} keys for a prefill of {q_len} rows. "
                    "Pre-rotary keys are kept beside the KV cache, aligned with the keys it holds: feed the prompt in "
                    "one call, on an empty cache."
                )
            run.pre_rotary_keys[idx] = plain_key
            return plain_query, plain_key
        plain_key = run.pre_rotary_keys.get(idx)
        if plain_key is None or plain_key.shape[2] > key.shape[2]:
            raise RuntimeError(f"layer {idx}: decoding without the prefill's pre-rotary keys of this layer's cache")
        return plain_query, plain_key

    def after_attention(self, module, query, key, attention_mask, scaling, delivered=()) -> None:
        run = self.run
        if run is None or not run.prefill:
            return
        for method in self.methods:
            request = method.attention_request(module.layer_idx)
            if request is not None and not request.probe and not any(method is m for m in delivered):
                self.deliver_stats(method, module.layer_idx, query, key, attention_mask, scaling)

    def deliver_stats(self, method: Method, idx: int, query, key, attention_mask, scaling) -> None:
        run = self.run
        request = method.attention_request(idx)
        received = None
        if request.queries is not None:
            rows = run.query_rows(request).to(query.device)
            received = received_attention(query, key, attention_mask, scaling, rows, per_head=request.per_head)
        method.observe_attention(idx, run, AttentionStats(received=received, keys=key if request.keys else None))

    # ---- per-layer kwargs for shrunk layers --------------------------------------------------------------------
    def _layer_kwargs(self, idx: int, kwargs: dict, run: RunState, device: torch.device) -> dict:
        """Layers on a shrunk sequence get sliced rotary tables and position ids and their own mask; layers that
        share rows and a device (several GPUs with device_map) share one computed copy."""
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
        mask = build_mask(queries, keys, run.attention_mask_2d.to(device))
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
