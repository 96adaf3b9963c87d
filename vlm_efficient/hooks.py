"""The engine's hooks on a wrapped model: installed at wrap, removed at unwrap, left out of a deep copy.

No model's forward is replaced. The hooks use the hook points of transformers 5.x:
- a forward pre-hook on the top-level model sees input_ids and the cache: it builds the call's RunState (the
  modality layout) at prefill and moves it on at each decoding step;
- a pre-hook on the vision tower notes the image grids generate() encodes before the prefill;
- a pre-hook on the text model is the BEFORE_LLM stage: methods that act on the projected visual features (pruning,
  merging) shrink `inputs_embeds` there, before any decoder layer and before the KV cache exists; the adapter also
  takes over per-layer visual injection there (Qwen3-VL deepstack);
- a pre-hook on every decoder layer runs the "probe" attention requests of that layer, shrinks the sequence where a
  method prunes, and gives layers on fewer tokens their own rotary tables, position ids and masks (shrinking.py);
- a pre-hook on every layer's head-output projection scales the heads' outputs where a method asks;
- where a method needs logits without rotary position (`uses_unrotated`), forward hooks on the modules that output
  the pre-rotary query and key capture them for that layer's attention call (pre_rotary.py).

The attention calls themselves go through the attention implementation the engine registers (engine.py).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import attention_stats, shrinking
from .adapters import ModelAdapter, encoded_features, encoded_sources, kv_cache
from .layout import ModalityLayout, build_layout
from .method import BEFORE_LLM, PerThread
from .placement import execution_device
from .ragged_cache import store_per_head
from .run_state import RunState
from .static_cache import allocated_bytes, on_static_cache, padding_mask


STATIC_UNCOMPILED = (
    "a wrapped model decodes uncompiled on generate()'s static cache (unless the call passes disable_compile=False): "
    "wrap() sets generation_config.disable_compile (unwrap() restores it), because the engine's hooks keep per-call state in Python that torch.compile's traced, "
    "CUDA-graphed decoding step does not keep. For graph-captured decoding of a wrapped model use "
    "vlm_efficient.wrap(model, spec, fast=True) and the default cache"
)


def _new_tokens_only(kwargs: dict, fed: int) -> None:
    """A decoding call of generate(use_cache=False) holds the whole sequence: keep what the cache does not hold yet
    (the images are in the cache: their pre-encoded features are dropped)."""
    for name in ("input_ids", "inputs_embeds", "mm_token_type_ids", "token_type_ids"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name][:, fed:]
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"][..., fed:]
    kwargs.pop("mm_encoder_outputs", None)


def _identity(tensor: torch.Tensor | None) -> tuple | None:
    """What tells tensors apart without reading them: storage pointer, shape, strides, device and the version counter
    (which views share with their base and every in-place write advances)."""
    if tensor is None:
        return None
    return tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.device, tensor._version


def head_output_scale(methods, idx: int, run) -> torch.Tensor | None:
    """The product of the methods' head-output scales of layer idx in this call ([B, H] or [H]), or None."""
    scale = None
    for method in methods:
        factors = method.head_output_scale(idx, run)
        if factors is not None:
            scale = factors if scale is None else scale * factors
    return scale


class AttributeUndo:
    """Undoes an attribute the engine set on a config (the model's config or generation_config), with a hook handle's
    interface: remove() at unwrap, remove_from_copy(memo) on a deep copy of the wrapped model (the copy's config is
    memo's copy of this one)."""

    def __init__(self, config, name: str, original):
        self.config, self.name, self.original = config, name, original

    def remove(self) -> None:
        setattr(self.config, self.name, self.original)

    def remove_from_copy(self, memo: dict) -> None:
        setattr(memo[id(self.config)], self.name, self.original)


class ModelHooks:
    """The hooks of one engine (vlm_efficient.engine.Engine) on its model, and those its methods add in bind(). The
    callbacks read and move the engine's per-call state (engine.run); everything they do beyond that is delegated
    to shrinking.py, attention_stats.py and pre_rotary.py."""

    captured_grids: list[torch.Tensor] = PerThread(list)  # grid_thw of vision-tower calls made before prefill
    prebuilt_layout: tuple | None = PerThread()  # (input_ids' and the mask's identity, layout): prebuild_layout
    confirmed_layout: ModalityLayout | None = PerThread()  # the next prefill's layout: confirm_prebuilt_layout
    # {layer: head-output scale [B, H]} that the fast path's decoding step applies (scaled_heads): the step runs the
    # layers with no call in progress, where the methods are not asked
    step_head_scales: dict = PerThread(dict)

    def __init__(self, engine):
        self.engine = engine
        self.handles: list = []
        self.own_ids: set[int] = set()  # the hooks install() put on the model: the engine's bookkeeping and routing

    # ---- installation -------------------------------------------------------------------------------------------
    def install(self) -> None:
        engine, model, adapter = self.engine, self.engine.model, self.engine.adapter
        first = len(self.handles)
        self.add(model.register_forward_pre_hook(self.on_model_call, with_kwargs=True))
        # grids seen inside a forward belong to that forward; only those seen between calls (generate() encodes
        # the images before prefill) are carried to the next prefill; also after a forward that raised (the fast
        # path's lean prefill stops the forward at the first decoder layer)
        self.add(model.register_forward_hook(lambda *_: self.captured_grids.clear(), always_call=True))
        vision = adapter.vision_capture_module(model)
        if vision is not None:
            self.add(vision.register_forward_pre_hook(self.on_vision_call, with_kwargs=True))
        self.add(adapter.text_model(model).register_forward_pre_hook(self.on_text_model_call, with_kwargs=True))
        for idx, layer in enumerate(engine.layers):
            self.add(layer.register_forward_pre_hook(self.layer_pre_hook(idx), with_kwargs=True))
            if type(adapter).after_decoder_layer is not ModelAdapter.after_decoder_layer:
                self.add(layer.register_forward_hook(self.layer_post_hook(idx)))
            if any(m.edits_head_outputs() for m in engine.methods):
                self.add(adapter.head_output_module(layer).register_forward_pre_hook(self.head_output_hook(idx)))
            if any(m.uses_unrotated(idx) for m in engine.methods):
                modules = adapter.pre_rotary_modules(layer.self_attn)
                for part, module in zip(("query", "key"), modules):
                    capture = engine.pre_rotary_capture.hook(idx, part, lambda: engine.run)
                    self.add(module.register_forward_hook(capture))
        self.own_ids = {h.id for h in self.handles[first:] if isinstance(h, RemovableHandle)}
        generation = getattr(model, "generation_config", None)
        if generation is not None and not generation.disable_compile:
            # generate() compiles the decoding forward on a static cache (GPU) unless told not to: see STATIC_UNCOMPILED
            self.add(AttributeUndo(generation, "disable_compile", generation.disable_compile))
            generation.disable_compile = True

    def add(self, handle) -> None:
        """Keep a hook handle (or anything with .remove()): remove() removes it."""
        self.handles.append(handle)

    def prebuild_layout(self, inputs: dict) -> None:
        """Build the layout of a coming prefill now, from generate()'s inputs (input_ids and the images' own inputs).
        The fast path calls this before it queues the image encoding, so that the layout's one host read does not wait
        for the encoding on the GPU, and confirm_prebuilt_layout() at its prefill."""
        input_ids, attention_mask = inputs.get("input_ids"), inputs.get("attention_mask")
        self.prebuilt_layout = self.confirmed_layout = None
        if not isinstance(input_ids, torch.Tensor) or not isinstance(attention_mask, (torch.Tensor, type(None))):
            return
        engine = self.engine
        layout = build_layout(engine.adapter, engine.model, input_ids, padding_mask(attention_mask, prefill=True),
                              {**inputs, "captured_grid_thw": {}})  # fmt: skip
        self.prebuilt_layout = (_identity(input_ids), _identity(attention_mask), layout)

    def confirm_prebuilt_layout(self, input_ids: torch.Tensor, attention_mask) -> None:
        """The prefill's forward takes the prebuilt layout where generate() hands its decoding loop the tensors it was
        built from (or views with the same shape and contents: data pointer, shape, strides and version counter
        equal), or the same input_ids and no mask where the prebuilt one had no padding (generate() drops a mask of
        ones). Asked there, not in the forward: generate() gives the forward a copy of input_ids."""
        prebuilt, self.prebuilt_layout = self.prebuilt_layout, None
        if prebuilt is None:
            return
        ids, mask, layout = prebuilt
        if ids == _identity(input_ids) and (mask == _identity(attention_mask)
                                            or (attention_mask is None and not layout.padded)):  # fmt: skip
            self.confirmed_layout = layout

    def before_prefill(self, fn) -> None:
        """Call fn(forward kwargs) before each prefill of the model (not before decode steps, not inside plain side
        passes)."""
        engine = self.engine

        def hook(module, args, kwargs):
            if engine.in_plain_block:
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

        self.add(engine.model.register_forward_pre_hook(hook, with_kwargs=True))

    def copy_unwrapped(self, memo: dict) -> nn.Module:
        """copy.deepcopy of the model under copy's protocol (memo) without these hooks: they are not copied, and what
        else they changed is undone on the copy (the attention implementation is the engine's to restore)."""
        model = self.engine.model
        for handle in self.handles:
            if isinstance(handle, RemovableHandle):
                hooks = handle.hooks_dict_ref()
                if hooks is not None and handle.id in hooks:
                    memo[id(hooks[handle.id])] = None  # the hook is not copied (it would copy this engine)
            elif not hasattr(handle, "remove_from_copy"):
                raise TypeError(f"copy.deepcopy of a wrapped model: {handle!r} cannot be undone on the copy; unwrap "
                                "the model, copy it, and wrap each copy")  # fmt: skip
        reductor = model.__reduce_ex__(4)
        copied = copy._reconstruct(model, memo, *reductor)
        for handle in self.handles:
            if isinstance(handle, RemovableHandle):
                for ref in (handle.hooks_dict_ref, *getattr(handle, "extra_dict_ref", ())):
                    original = ref()
                    if original is not None and id(original) in memo:
                        memo[id(original)].pop(handle.id, None)
            else:
                handle.remove_from_copy(memo)
        return copied

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles.clear()

    # ---- the callbacks --------------------------------------------------------------------------------------------
    def on_model_call(self, module, args, kwargs):
        engine = self.engine
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kv_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        attention_mask = padding_mask(kwargs.get("attention_mask"), prefill=past == 0)
        asked = kwargs.get("output_attentions") or getattr(engine.model.config, "output_attentions", False)
        engine.returns_weights = bool(asked)
        if past == 0:
            if input_ids is None:
                raise ValueError("a wrapped model needs input_ids at prefill to locate the image tokens")
            if kwargs.get("labels") is not None and engine.shrinks:
                raise ValueError(
                    f"labels: {', '.join(m.name for m in engine.methods if m.prune_layers())} drops prompt rows, so "
                    "the logits cover only the kept rows and the model's loss cannot pair them with the labels. "
                    "Compute the loss on the answer tokens yourself (generate, or a forward without labels), or wrap "
                    "without pruning."
                )
            encoded = kwargs.get("mm_encoder_outputs") or {}
            captured = iter(self.captured_grids)
            grids = {modality: next(captured, None) for modality in ("image", "video") if encoded.get(modality)}
            self.captured_grids.clear()
            inputs = {**kwargs, "captured_grid_thw": grids}
            static = on_static_cache(cache)
            if static and input_ids.device.type != "cpu":
                warnings.warn(STATIC_UNCOMPILED, RuntimeWarning, stacklevel=2)
            if static and engine.shrinks and any(engine.adapter.mask_group(engine.model, i)
                                                 for i in range(engine.num_layers)):  # fmt: skip
                raise ValueError(
                    f"token pruning with HF's static cache does not support {engine.model.config.model_type}'s "
                    "sliding-window layers yet: use the default dynamic cache (no cache_implementation='static')"
                )
            layout = None
            if not engine.in_plain_block:  # a side pass of a method builds its own
                layout, self.confirmed_layout = self.confirmed_layout, None
            if layout is None:
                layout = build_layout(engine.adapter, engine.model, input_ids, attention_mask, inputs)
            engine.run = run = RunState(layout=layout, prompt_length=input_ids.shape[1],
                                        attention_mask_2d=layout.valid, static_cache=static,
                                        visual_rows=layout.visual_counts)  # fmt: skip
            features = encoded_features(kwargs)
            if features and len({id(feature) for feature in features}) < len(features):
                run.image_sources = encoded_sources(features)
            if not engine.in_plain_block:
                engine.latest_run = run
            if kwargs.get("use_cache") is False and kwargs.get("mm_encoder_outputs") and not engine.in_plain_block:
                # generate(use_cache=False) (only generate() passes pre-encoded images): decode on this prefill's cache
                run.full_sequence = kwargs["use_cache"] = True
                return args, kwargs
            return None
        if engine.run is None:
            raise RuntimeError("decode step without a prefill seen by the wrapped model: wrap before generating")
        run = engine.run
        # The original length so far comes from the engine's own count: the cache may hold fewer keys.
        run.fed = run.attention_mask_2d.shape[1]
        if run.full_sequence:
            _new_tokens_only(kwargs, run.fed)
            input_ids = kwargs.get("input_ids")
        run.prefill = False
        run.decode_steps += 1
        run.rows = None
        run.layer_kwargs_cache.clear()
        if run.decode_steps == 1 and engine.per_head_cache:
            store_per_head(engine, run, cache)
        if run.decode_steps == 1 and run.static_cache:
            run.allocated_kv_bytes = allocated_bytes(cache)
        step = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
        if attention_mask is not None:
            run.attention_mask_2d = attention_mask.bool()
        else:
            ones = torch.ones(run.layout.batch_size, step, dtype=torch.bool, device=run.attention_mask_2d.device)
            run.attention_mask_2d = torch.cat([run.attention_mask_2d, ones], dim=1)
        return args, kwargs

    def on_vision_call(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is not None:
            self.captured_grids.append(grid)

    def on_text_model_call(self, module, args, kwargs):
        engine, run = self.engine, self.engine.run
        if run is None:
            return None
        engine.adapter.on_text_model_call(kwargs, run)
        if run.prefill:
            if BEFORE_LLM in engine.prune_layers and run.layout.has_visual:
                shrinking.shrink_input(engine.methods, kwargs, run)
        elif run.input_positions is not None:
            shrinking.compact_decode_inputs(kwargs, run)
        return args, kwargs

    def layer_pre_hook(self, idx: int):
        engine = self.engine

        def hook(module, args, kwargs):
            run = engine.run
            if run is None:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            # the layer's device under accelerate's dispatch: this layer's inputs are built there (placement.py)
            hidden = hidden.to(execution_device(module, hidden.device))
            if run.prefill:
                if engine.probe_layers and idx in engine.probe_layers:
                    layer_kwargs = engine.layer_inputs(idx, kwargs, run, hidden.device)
                    attention_stats.run_probes(engine, idx, module, hidden, layer_kwargs)
                hidden = engine.select_before(idx, hidden, run)
                run.enter_layer(idx)
            for method in engine.methods:
                if method.observes_hidden(idx):
                    method.observe_hidden(idx, run, hidden)
            kwargs = engine.layer_inputs(idx, kwargs, run, hidden.device)
            return (hidden, *args[1:]), kwargs

        return hook

    def head_output_hook(self, idx: int):
        engine = self.engine

        def hook(module, args):
            run = engine.run
            scale = self.step_head_scales.get(idx) if run is None else head_output_scale(engine.methods, idx, run)
            if scale is None:
                return None
            heads_out = args[0]
            heads = engine.text_config.num_attention_heads
            per_head = heads_out.view(*heads_out.shape[:-1], heads, -1)
            scale = scale.to(per_head.device, per_head.dtype)
            scale = scale.view(-1, 1, heads, 1) if scale.dim() == 2 else scale.view(1, 1, heads, 1)
            return ((per_head * scale).view_as(heads_out), *args[1:])

        return hook

    @contextlib.contextmanager
    def scaled_heads(self, scales: dict):
        """While it lasts, calls with no call in progress (the fast path's decoding step) scale layer idx's head
        outputs by scales[idx] [B, H] (the methods' head_output_scale, asked once per call)."""
        saved, self.step_head_scales = self.step_head_scales, scales
        try:
            yield
        finally:
            self.step_head_scales = saved

    def layer_post_hook(self, idx: int):
        engine = self.engine

        def hook(module, args, output):
            if engine.run is None:
                return None
            if isinstance(output, tuple):
                return (engine.adapter.after_decoder_layer(idx, output[0], engine.run), *output[1:])
            return engine.adapter.after_decoder_layer(idx, output, engine.run)

        return hook
