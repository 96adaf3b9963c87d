"""The fast decoding path: plan once after the prefill, then decode on static buffers (one CUDA graph on CUDA).

    model = vlm_efficient.wrap(model, "fastv:layer=2,ratio=0.5", fast=True)   # or wrap(model, "", fast=True)
    model.generate(**inputs, max_new_tokens=32)   # the dynamic path's greedy tokens

One generate() call:
- the prefill makes every decision the dynamic path makes, through the wrapped model, and the kept keys land in the
  generate() cache; but layers where nothing acts run as captured segments, and on transformers 5.25 the image
  encoding too (vlm_efficient/fast_prefill.py);
- the plan: each layer's kept prompt keys and values are copied into static buffers [B, Hkv, kept + new tokens
  (rounded up to BUCKET), d]; samples that keep different numbers of keys are padded and masked. Keys a method says
  decoding never attends again (Method.decode_prompt_keep: A-VL's deleted image keys) are left out. Layers that cache
  the same prompt keys share one boolean mask and one device-side write index; a device-side offset continues each
  sample's positions from its last prompt token (pruned tokens keep their original positions);
- a decoding step embeds the last token, runs the decoder layers directly (no text-model forward, so no mask building
  and no engine routing: it runs inside Engine.plain()), attention over the static buffers with the masks (where the
  kernels run, kernel 5 in every layer without a decoding edit: split-KV with the mask applied to its loads; else
  SDPA), the final norm and the LM head, and advances the write indices and the offset on the device. It makes no
  decision that depends on the step and reads nothing back to the host. On CUDA the step is captured once per (batch
  size, buffer sizes) in a torch.cuda.CUDAGraph and replayed per token; on CPU the same step runs eagerly;
- between steps the logits processors, greedy or sampled choice and the stopping criteria run as in generate(). The
  "all finished" flag is read one step late (on CUDA through pinned memory), so the host never waits for the step it
  just launched.

Decoding edits (head methods): after the prefill every method that may edit attention is asked, layer by layer, as at
the first decoding step. Where it edits and declares a decoding form that stays the same at every step (a structured
Method.kernel_edit, which the engine too reuses at every step), its AttentionEdit (derived from that form,
vlm_efficient/edits.py) is made once over the whole static buffer (prompt keys, then the generated slots). A layer
whose structured edits compose into one group edit (kernel_plan.compose: PAI's attention edit, VAF, VAR, AdaptVis)
runs kernel 3's decoding form inside the step, as the dynamic path's router does; other edited layers run the dense
edited attention (ACT, PAINT). Edits made of tensors (and the group kernel's key groups) are copied into buffers of a
kept step at each call; a step with post-softmax functions (ACT: they hold this call's tensors) serves its call only.

Per-head pruned caches (Method.decode_cache_keep: PLPHP's cache=ragged, streaming): such a layer's buffer is a
kernels.RaggedKVCache holding only each KV head's kept prompt keys plus room for the generated tokens (its rows
rounded up to SEGMENT_BUCKET per segment, so calls keeping similar numbers share a step), laid out anew per call on the
device, appended to at every step and attended by kernel 4 (its torch form where the kernels do not run); a decoding
edit on such a layer is refused (the dynamic path runs them with plphp:cache=mask).

Layers of several types (Gemma3's sliding-window and full layers): the prefill's segments hold layers of one type, on
that type's mask and rotary tables (fast_prefill.LeanPrefill._typed_kwargs); in the step each type gets its rotary table
(adapter.rotary_tables) and a sliding layer's key set its own mask, made on the device at every step from the set's
mask, the slots its cache keeps (the last window - 1 and the step's) and the window over original positions, as the
dynamic path's sliding cache and the engine's mask have them.

Refused, with a pointer to the dynamic path: at wrap, sliding-window layers of a family whose adapter gives them no
mask of their own, attention or final logit soft-capping, a model spread over devices; at generate, beams and other
decoding modes, a cache passed in or cache_implementation, streamers and assistant models, attentions or hidden states
in the output; after the prefill, decoding edits with no step-invariant form or on pre-rotary logits (GIFT, YOPO,
Vista-LLaMA, VAR's code variant), unless the method keeps its step-to-step changes on the device
(Method.static_decode_edit: A-VL's core updates and H2O eviction run inside the step; a capture's warm-up runs are
undone). Head-output scales (VHR) are asked once after the prefill and applied at every step by the engine's
head-output hook (buffers reloaded per call). Methods' observe_hidden is not called while decoding.
"""

from __future__ import annotations

import collections
import inspect
import threading
import time
import warnings

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin, GenerationMode

from .adapters import CACHE_KWARGS, cache_kwarg
from .fast_attention import (PACKED_VISION_ATTENTION, GroupRoute, MaskedDecodeRoute, RaggedRoute, edit_buffers,
                             edits_key, load_edit_buffers, observed_mask_route, reloadable, routed,
                             shared_group_route)  # fmt: skip
from .fast_prefill import LeanEncoder, LeanPrefill, capture_graph
from .hooks import AttributeUndo, head_output_scale
from .kernel_plan import kernel_backend
from .ragged_cache import per_head_keep, refuse_own_mask
from .shrinking import left_aligned_index
from .method import UNSTRUCTURED, AttentionContext, Method, edits_attention

BUCKET = 64  # buffer lengths round up to this: calls whose prompts keep similar numbers of keys share one graph
SEGMENT_BUCKET = 16  # a per-head cache's rows round up to this many per (sample, KV head) segment, for the same reason
MAX_GRAPHS = 4  # captured steps (graphs and their buffers) kept per model; the least recently used is dropped
DYNAMIC_PATH = "use the dynamic path: vlm_efficient.wrap(model, spec) without fast=True"


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def supported() -> bool:
    """Whether the installed transformers lets generate() take a decoding loop (`custom_generate=<callable>`)."""
    return "custom_generate" in inspect.signature(GenerationMixin.generate).parameters


class StaticKVLayer(CacheLayerMixin):
    """One layer's static buffers [B, Hkv, capacity, d]. update() writes the step's key and value at the device-side
    index of the layer's key set and returns the whole buffers; the step's mask hides the slots not written yet."""

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_index: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.write_index = keys, values, write_index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.write_index, key_states)
        self.values.index_copy_(2, self.write_index, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return self.keys.shape[2]

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class StaticRaggedLayer(CacheLayerMixin):
    """A layer's per-head pruned storage (kernels.RaggedKVCache, laid out per call by StaticStep.load): update()
    appends the step's key and value to every (sample, KV head) segment on the device and returns them; the attention
    reads the segments (fast_attention.RaggedRoute)."""

    is_compileable = True

    def __init__(self, ragged):
        super().__init__()
        self.ragged = ragged
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.ragged.write(key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.ragged.max_capacity, 0

    def get_seq_length(self) -> int:
        return self.ragged.max_capacity

    def get_max_length(self) -> int:
        return self.ragged.max_capacity


def layer_rotary(parts: dict, hidden: torch.Tensor, positions: torch.Tensor) -> list:
    """Each decoder layer's rotary tables (cos, sin) at `positions`: the text model's, or where its layers are of
    several types one table per type (Gemma3's sliding and full layers rotate with their own bases,
    adapter.rotary_tables)."""
    types = parts["layer_types"]
    if len(set(types)) == 1:
        return [parts["rotary"](hidden, positions)] * len(types)
    tables = {}
    for idx, layer_type in enumerate(types):
        if layer_type not in tables:
            tables[layer_type] = parts["adapter"].rotary_tables(parts["model"], idx, hidden, positions)
    return [tables[layer_type] for layer_type in types]


class StaticStep:
    """The buffers and the decoding step of one (batch size, buffer sizes) combination, and on CUDA its graph."""

    def __init__(self, parts: dict, batch: int, capacities: list[int], group_of: list[int], kv_shape, dtype,
                 device, rotary_shape, layer_position_shape, compiled: bool = False, kernels: str | None = None,
                 per_head: dict | None = None):  # fmt: skip
        """`kernels`: the kernels' backend (kernel_plan.kernel_backend; None: SDPA in the layers without edits);
        `per_head` {layer: rows}: layers on a per-head pruned cache of that many rows (refilled per call)."""
        from .kernels.api import RaggedKVCache

        self.parts, self.group_of, self.capacities, self.kernels = parts, group_of, capacities, kernels
        # compiled: torch.compile fuses the step's small kernels (norms, rotary, activations, residuals); the CUDA
        # graph then records the fused kernels. Compiled on the first run (the warm-up of capture() on CUDA)
        self.forward = torch.compile(self._forward, dynamic=False) if compiled else self._forward
        self.compiled = compiled
        kv_heads, head_dim = kv_shape
        new = dict(device=device)
        per_head = per_head or {}
        self.ragged = {idx: RaggedKVCache(batch, kv_heads, head_dim, torch.zeros(batch * kv_heads), dtype=dtype,
                                          device=device, rows=rows, longest=capacities[idx])
                       for idx, rows in per_head.items()}  # fmt: skip
        self.keys = [None if idx in per_head else torch.zeros(batch, kv_heads, c, head_dim, dtype=dtype, **new)
                     for idx, c in enumerate(capacities)]  # fmt: skip
        self.values = [None if k is None else torch.zeros_like(k) for k in self.keys]
        group_capacity = [capacities[group_of.index(g)] for g in range(max(group_of) + 1)]
        self.masks = [torch.zeros(batch, 1, 1, c, dtype=torch.bool, **new) for c in group_capacity]
        self.write_index = [torch.zeros(1, dtype=torch.long, **new) for _ in group_capacity]
        # sliding-window layers (their own key sets): the keys they see at a step, made from the set's mask, the
        # slots (its cache keeps the last window - 1 and the step's) and the keys' original positions (the window)
        self.windows = {g: w for g, w in zip(group_of, parts["windows"]) if w}
        self.window_masks = {g: torch.zeros_like(self.masks[g]) for g in self.windows}
        self.key_positions = {g: torch.zeros(batch, group_capacity[g], dtype=torch.long, **new) for g in self.windows}
        self.slots = {g: torch.arange(group_capacity[g], **new) for g in self.windows}
        self.query_origin = torch.zeros(1, dtype=torch.long, **new)  # original position of the step at offset 0
        self.layer_masks = [self.window_masks.get(g, self.masks[g]) for g in group_of]
        self.offset = torch.zeros(1, dtype=torch.long, **new)  # positions of this step = last prompt ones + offset
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, **new)
        self.last_rotary = torch.zeros(rotary_shape, dtype=torch.long, **new)
        self.last_layer_position = None
        if layer_position_shape is not None:
            self.last_layer_position = torch.zeros(layer_position_shape, dtype=torch.long, **new)
        self.logits = torch.zeros(batch, parts["vocab"], dtype=torch.float32, **new)
        self.cache = Cache(layers=[StaticRaggedLayer(self.ragged[idx]) if idx in self.ragged
                                   else StaticKVLayer(k, v, self.write_index[g])
                                   for idx, (k, v, g) in enumerate(zip(self.keys, self.values, group_of))])  # fmt: skip
        self.graph = None
        self.edits: dict[int, list] = {}  # layer -> its decoding AttentionEdits over the whole buffer (set_edits)
        self.routes: dict = {}  # layer -> what its attention runs where that is not SDPA: the edits, kernels 4 and 5
        self.head_scales: dict[int, torch.Tensor] = {}  # layer -> its head-output scale [B, H] (set_head_scales)

    def set_edits(self, edits: dict, static: bool) -> None:
        """The decoding edits the step runs: with `static`, edits of the same structure whose tensors are buffers of
        this step, which load_edits fills at every call (the step is then kept across calls); else `edits` as given
        (their functions hold this call's tensors: the step serves this call only)."""
        if not static:
            self.edits = edits
        else:
            with torch.inference_mode(False):
                self.edits = edit_buffers(edits)
        for idx, route in self.edits.items():
            if isinstance(route, GroupRoute):  # the kernel's valid keys: the layer's mask, updated in place per step
                route.valid = self.valid_keys(idx)
        self.routes = dict(self.edits)
        for idx, layer_edits in self.edits.items():  # edits that only mask and observe: kernel 5 with probabilities
            route = observed_mask_route(layer_edits, self.valid_keys(idx))
            if route is not None:
                self.routes[idx] = route
        self.routes.update({idx: RaggedRoute(ragged, self.kernels == "triton") for idx, ragged in self.ragged.items()})
        if self.kernels is not None:
            self.routes.update({idx: MaskedDecodeRoute(self.valid_keys(idx))
                                for idx in range(len(self.group_of)) if idx not in self.routes})  # fmt: skip

    def valid_keys(self, layer: int) -> torch.Tensor:
        """[B, capacity]: a view of the step's mask of the layer (the keys it attends to)."""
        mask = self.layer_masks[layer]
        return mask.view(mask.shape[0], mask.shape[-1])

    def load_edits(self, edits: dict) -> None:
        load_edit_buffers(self.edits, edits)

    def set_head_scales(self, layers) -> None:
        """Buffers [B, H] of the head-output scales of these layers (VHR), which load_head_scales fills per call."""
        heads = self.parts["config"].num_attention_heads
        with torch.inference_mode(False):
            self.head_scales = {idx: torch.ones(self.tokens.shape[0], heads, device=self.tokens.device) for idx in layers}

    def load_head_scales(self, scales: dict) -> None:
        for idx, scale in scales.items():
            self.head_scales[idx].copy_(scale.expand_as(self.head_scales[idx]))

    def kv_bytes(self) -> list[int]:
        return [2 * self.ragged[idx].k_buf.nbytes if k is None else k.nbytes + v.nbytes
                for idx, (k, v) in enumerate(zip(self.keys, self.values))]  # fmt: skip

    def step(self) -> None:
        """One decoding step on the buffers: the same calls every time, no host read."""
        hooks = self.parts["hooks"]
        with routed(self.parts["config"], self.parts["layers"], self.routes), hooks.scaled_heads(self.head_scales):
            self.forward()

    def _forward(self) -> None:
        parts = self.parts
        for mask, index in zip(self.masks, self.write_index):
            mask.index_fill_(3, index, True)  # the step's own key joins the keys it attends to
        for group, window in self.windows.items():
            seen = ((self.slots[group] > self.write_index[group] - window)
                    & (self.key_positions[group] > self.query_origin + self.offset - window))  # fmt: skip
            torch.logical_and(self.masks[group], seen[:, None, None, :], out=self.window_masks[group])
        hidden = parts["embed"](self.tokens)
        tables = layer_rotary(parts, hidden, self.last_rotary + self.offset)
        positions = None if self.last_layer_position is None else self.last_layer_position + self.offset
        cache = {parts["cache_name"]: self.cache}
        for layer, mask, position_embeddings in zip(parts["layers"], self.layer_masks, tables):
            out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings,
                        use_cache=True, **cache)  # fmt: skip
            hidden = out[0] if isinstance(out, tuple) else out
        self.logits.copy_(parts["lm_head"](parts["norm"](hidden[:, -1:]))[:, -1].float())
        for index in self.write_index:
            index.add_(1)
        self.offset.add_(1)

    def capture(self) -> None:
        """Record step() in a CUDA graph (after warm-up runs on a side stream, which cuBLAS and SDPA need before a
        capture). The buffers' contents are loaded after this: warm-up and capture leave them undefined."""
        self.graph, _ = capture_graph(self.step, self.logits.device)

    def load(self, prompt_kv: list, group_valid: list, last_rotary, last_layer_position, offset: int = 1,
             per_head_keep: dict | None = None, group_keys: list | None = None, prompt_length: int = 0) -> None:
        """Fill the buffers for one call: the kept prompt keys and values (per head where `per_head_keep` {layer:
        bool [B, Hkv, n]} says), the masks (the valid kept keys), write indices after each key set, and the last
        prompt positions; the first step's positions are those + `offset` (0: that step is the last prompt row).
        Sliding-window key sets also take their keys' original positions `group_keys` [B, n] and the prompt's
        length."""
        for idx, (keys, values, (k, v)) in enumerate(zip(self.keys, self.values, prompt_kv)):
            if keys is None:
                self.ragged[idx].refill(k, v, per_head_keep[idx], room=self.capacities[idx] - k.shape[2])
                continue
            keys[:, :, : k.shape[2]].copy_(k)
            values[:, :, : v.shape[2]].copy_(v)
        for mask, index, valid in zip(self.masks, self.write_index, group_valid):
            mask.zero_()
            mask[:, 0, 0, : valid.shape[1]].copy_(valid)
            index.fill_(valid.shape[1])
        self.offset.fill_(offset)
        self.query_origin.fill_(prompt_length - 1)
        for group, key_positions in self.key_positions.items():
            kept = group_keys[group].shape[1]
            key_positions[:, :kept].copy_(group_keys[group])
            generated = torch.arange(key_positions.shape[1] - kept, device=key_positions.device)
            key_positions[:, kept:].copy_(prompt_length - 1 + offset + generated)
        self.last_rotary.copy_(last_rotary)
        if self.last_layer_position is not None:
            self.last_layer_position.copy_(last_layer_position)

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


class FastPath:
    """The fast path of one wrapped model: its generate(), the positions it records at prefill, its captured steps."""

    def __init__(self, engine, compiled: bool = False):
        if not supported():
            raise RuntimeError(
                "fast=True needs a transformers whose generate() takes custom_generate=<callable> (5.17 and later); "
                f"this one does not: {DYNAMIC_PATH}"
            )
        model = engine.model
        config = engine.text_config
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * engine.num_layers)
        # sliding-window layers where the family's adapter gives them their own mask (Gemma3): the step slides it
        unknown = sorted({t for idx, t in enumerate(layer_types) if t != "full_attention"
                          and not (t == "sliding_attention" and engine.adapter.mask_group(model, idx) == t)})
        if unknown:
            raise ValueError(f"the fast path runs full attention and its families' sliding windows; this model has "
                             f"{unknown} layers: {DYNAMIC_PATH}")  # fmt: skip
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, name, None) is not None:
                raise ValueError(f"the fast path's step does not apply {name}: {DYNAMIC_PATH}")
        if len({p.device for p in model.parameters()}) > 1:
            raise ValueError(f"the fast path runs the model on one device; this one is spread over several: {DYNAMIC_PATH}")
        if "generate" in vars(model):
            raise ValueError("model.generate is already replaced on this instance (a hub custom_generate?); fast=True "
                             f"installs its own: {DYNAMIC_PATH}")  # fmt: skip
        self.engine, self.model = engine, model
        text_model = engine.adapter.text_model(model)
        self.parts = {
            "embed": model.get_input_embeddings(), "lm_head": model.get_output_embeddings(),
            "norm": text_model.norm, "rotary": text_model.rotary_emb, "layers": list(engine.layers),
            "cache_name": cache_kwarg(engine.layers[0]), "vocab": model.get_output_embeddings().out_features,
            "config": engine.text_config, "hooks": engine.hooks, "adapter": engine.adapter, "model": model,
            "layer_types": layer_types,
            "windows": [config.sliding_window if t == "sliding_attention" else None for t in layer_types],
        }  # fmt: skip
        self.steps: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()  # one static step and one set of buffers: concurrent calls take turns
        self.use_graph = True  # on CUDA; False replays the same step eagerly (to check the graph against it)
        self.compiled = compiled  # steps kept across calls are compiled (torch.compile) before their capture
        self.last_build_s: float | None = None  # seconds the last new step took to build (compile, capture)
        self.capture_error: str | None = None  # why the last failed capture failed (the step then runs eagerly)
        self.last_step: StaticStep | None = None
        self._recorded: dict = {}
        self._recording = False
        self._finished: list = [None, None]  # see _note_finished
        self._pinned = None
        self._call_steps: int | None = None  # tokens the generate() call in progress may still add (plain_stream)
        engine.add_handle(text_model.rotary_emb.register_forward_pre_hook(self._record_rotary, with_kwargs=True))
        self.prefill = LeanPrefill(engine, self.parts, self.graphs_on, self._record_first_layer_inputs)
        self.encoder = LeanEncoder(engine, self.graphs_on)
        vision = getattr(model.config, "vision_config", None)
        if engine.adapter.packed_vision_tower and vision is not None and vision._attn_implementation == "sdpa":
            # set on the config: set_attn_implementation refuses a "flash" name that is not a hub kernel
            vision._attn_implementation = PACKED_VISION_ATTENTION
            engine.add_handle(AttributeUndo(vision, "_attn_implementation", "sdpa"))
        model.generate = self.generate

    def graphs_on(self, device: torch.device) -> bool:
        """Whether steps, prefill segments and image encodings on `device` are captured in CUDA graphs."""
        return device.type == "cuda" and self.use_graph

    def uninstall(self) -> None:
        vars(self.model).pop("generate", None)
        self.steps.clear()
        self.last_step = None

    # ---- positions seen at prefill ----------------------------------------------------------------------------
    def _record_rotary(self, module, args, kwargs):
        if self._recording:
            positions = args[1] if len(args) > 1 else kwargs["position_ids"]
            self._recorded["rotary"] = positions[..., -1:].clone()

    def _record_first_layer_inputs(self, kwargs: dict) -> None:
        """The first decoder layer's inputs (as its hooks left them): the last prompt token's position ids."""
        if self._recording:
            positions = kwargs.get("position_ids")
            self._recorded["layer"] = None if positions is None else positions[..., -1:].clone()

    # ---- generate() ---------------------------------------------------------------------------------------------
    def generate(self, *args, **kwargs):
        """model.generate on the fast path: generate() prepares the inputs, decode() replaces its decoding loop."""
        for name in ("custom_generate", "assistant_model", "streamer", *CACHE_KWARGS):
            if kwargs.get(name) is not None:
                raise ValueError(f"the fast path (fast=True) runs its own decoding loop and takes no {name}; "
                                 f"{DYNAMIC_PATH}")  # fmt: skip
        with self._lock:
            try:
                # the layout's host read now, before the images' encoding is queued (here or in generate())
                self.engine.hooks.prebuild_layout(kwargs)
                kwargs = self.encoder.prepare(kwargs)
                return type(self.model).generate(self.model, *args, custom_generate=self.decode, **kwargs)
            finally:
                self.engine.hooks.prebuilt_layout = self.engine.hooks.confirmed_layout = None  # none left over

    @staticmethod
    def _check_config(config, model_kwargs: dict) -> None:
        mode = config.get_generation_mode()
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise ValueError(f"the fast path decodes greedily or by sampling, not by {mode.value}; {DYNAMIC_PATH}")
        if config.cache_implementation is not None:
            raise ValueError(f"the fast path keeps its own static cache: drop cache_implementation="
                             f"{config.cache_implementation!r}, or {DYNAMIC_PATH}")  # fmt: skip
        if not model_kwargs.get("use_cache", True):
            raise ValueError(f"the fast path decodes from the prefill's KV cache: drop use_cache=False, or {DYNAMIC_PATH}")
        if config.return_dict_in_generate and (config.output_attentions or config.output_hidden_states):
            raise ValueError(f"the fast path returns no attentions or hidden states; {DYNAMIC_PATH}")

    def decode(self, model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
               streamer=None, **model_kwargs):  # fmt: skip
        """generate()'s decoding loop (its custom_generate): the prefill through the wrapped model, then the plan and
        the static steps. The signature is generate()'s own loop's (GenerationMixin._sample): a parameter it lacks
        would be taken out of generate()'s kwargs for this callable (synced_gpus and streamer never arrive: generate()
        drops them for a callable, and generate() above refuses a streamer)."""
        config = generation_config
        self._check_config(config, model_kwargs)
        self._call_steps = config.max_length - input_ids.shape[1]
        try:
            return self._decode(model, input_ids, logits_processor, stopping_criteria, config, model_kwargs)
        finally:
            self._call_steps = None

    def _decode(self, model, input_ids, logits_processor, stopping_criteria, config, model_kwargs):
        self.engine.hooks.confirm_prebuilt_layout(input_ids, model_kwargs.get("attention_mask"))
        self._recorded.clear()
        self._recording = True
        try:
            logits, cache = self.prefill(model, input_ids, config, model_kwargs, self.parts["cache_name"])
        finally:
            self._recording = False
        keep_scores = config.return_dict_in_generate and config.output_scores
        keep_logits = config.return_dict_in_generate and config.output_logits
        history = {"scores": [] if keep_scores else None, "logits": [] if keep_logits else None}
        has_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        pad = config._pad_token_tensor
        pad = pad.to(input_ids.device) if pad is not None else None

        def choose(logits, input_ids, unfinished):
            scores = logits_processor(input_ids, logits)
            if keep_scores:
                history["scores"].append(scores)
            if keep_logits:
                history["logits"].append(logits)
            if config.do_sample:
                tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = torch.argmax(scores, dim=-1)
            if has_eos:
                tokens = tokens * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            return input_ids, unfinished & ~stopping_criteria(input_ids, None)

        unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        run = self.engine.run
        prompt_mask = run.attention_mask_2d
        step = None
        if logits is None:  # the prefill left its last row to the first step (LeanPrefill.deferred_last_row)
            step = self._plan(cache, config.max_length - input_ids.shape[1], input_ids.device, last_row=True)
            del cache
            with self.engine.plain():
                step.tokens.copy_(input_ids[:, -1:])
                step.run()
            logits = step.logits.clone()
        logits = logits.to(input_ids.device)
        input_ids, unfinished = choose(logits, input_ids, unfinished)
        steps = config.max_length - input_ids.shape[1]
        done = 0
        if steps > 0 and bool(unfinished.any()):
            if step is None:
                step = self._plan(cache, steps, input_ids.device)
                del cache
            with self.engine.plain():
                while done < steps:
                    step.tokens.copy_(input_ids[:, -1:])
                    step.run()
                    # read one step late: whether every sample had finished with the token this step was fed (the
                    # host does not wait for the step it just launched); if so this step's output is not used
                    if done > 0 and self._all_finished(done):
                        break
                    done += 1
                    input_ids, unfinished = choose(step.logits.clone(), input_ids, unfinished)
                    self._note_finished(done, unfinished)
        if step is not None:
            run.allocated_kv_bytes = step.kv_bytes()
        # the engine's record of the call, as the dynamic path leaves it (stats)
        run.decode_steps = done
        run.prefill = done == 0
        run.attention_mask_2d = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], done)], dim=1)
        run.fed = run.attention_mask_2d.shape[1] - 1 if done else prompt_mask.shape[1]
        if not config.return_dict_in_generate:
            return input_ids
        as_tuple = {k: tuple(v) if v is not None else None for k, v in history.items()}
        return GenerateDecoderOnlyOutput(sequences=input_ids, **as_tuple)

    @property
    def in_call(self) -> bool:
        """Whether a generate() call of the fast path is decoding (in this thread: calls take turns)."""
        return self._call_steps is not None

    def plain_stream(self, inputs: dict) -> tuple[torch.Tensor, StaticStep]:
        """A second sequence decoded beside the generate() call in progress, with no method acting (PAI's text-only
        stream, heads/pai.py): its prompt `inputs` (input_ids, attention_mask, position_ids) runs once through the
        model in a plain block, then a static step of its own continues it: the same step as the call's (kernel 5 or
        SDPA over its buffers, on CUDA a captured graph), kept across calls. Returns (its prompt's last-row logits
        [B, vocab] float32, the step), to be fed as the call's own step is: step.tokens.copy_(last tokens),
        step.run(), step.logits."""
        if self._call_steps is None:
            raise RuntimeError("a plain stream decodes beside a fast-path generate() call; none is in progress")
        saved, self._recorded = self._recorded, {}  # the stream's own last prompt positions
        self._recording = True
        try:
            with self.engine.plain():
                out = self.model(**inputs, use_cache=True)
        finally:
            self._recording = False
            recorded, self._recorded = self._recorded, saved
        cache = getattr(out, cache_kwarg(self.model))
        prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]
        valid = inputs["attention_mask"].bool()
        length = valid.shape[1]
        columns = torch.arange(length, device=valid.device).expand(valid.shape[0], -1)
        sets, group_of, group_valid, group_keys = {}, [], [], []
        for (keys, _), window in zip(prompt_kv, self.parts["windows"]):
            cached = keys.shape[2]  # a sliding-window layer caches the last window - 1 keys
            if (cached, window) not in sets:
                sets[cached, window] = len(sets)
                group_valid.append(valid[:, length - cached:])
                group_keys.append(columns[:, length - cached:])
            group_of.append(sets[cached, window])
        capacities = [round_up(keys.shape[2] + self._call_steps, BUCKET) for keys, _ in prompt_kv]
        step = self._static_step(prompt_kv, group_of, group_valid, capacities, {}, {}, {}, {}, recorded, valid.device,
                                 offset=1, stream=True, group_keys=group_keys, prompt_length=length)  # fmt: skip
        return out.logits[:, -1].float(), step

    def _note_finished(self, step: int, unfinished: torch.Tensor) -> None:
        """Record whether every sample has finished after decoding step `step` chose its token, without a host wait:
        on CUDA a copy into pinned memory and an event (two slots: step s's flag is read while step s + 1 runs)."""
        finished = unfinished.max() == 0
        if finished.device.type != "cuda":
            self._finished[step % 2] = finished
            return
        if self._pinned is None:
            self._pinned = [(torch.cuda.Event(), torch.zeros((), dtype=torch.bool).pin_memory()) for _ in range(2)]
        event, flag = self._pinned[step % 2]
        flag.copy_(finished, non_blocking=True)
        event.record()
        self._finished[step % 2] = (event, flag)

    def _all_finished(self, step: int) -> bool:
        noted = self._finished[step % 2]
        if isinstance(noted, tuple):
            event, noted = noted
            event.synchronize()
        return bool(noted)

    # ---- the plan ----------------------------------------------------------------------------------------------
    def _plan(self, cache, steps: int, device, last_row: bool = False) -> StaticStep:
        """After the prefill: the methods' decoding edits, then the static step whose buffers hold each layer's kept
        prompt keys plus `steps` new ones, loaded (and captured first where it is new). A step whose decoding edits
        include a post-softmax function is captured for this call only: the function holds this call's tensors.
        `last_row`: the cache's last prompt row is left out, and the step's first run is that row."""
        engine, run = self.engine, self.engine.run
        if run is None or "rotary" not in self._recorded:
            raise RuntimeError("the fast path saw no prefill through the wrapped model")
        self._enter_decoding(run)
        head_scales = self._head_scales(run)
        prompt_kv, prompt_keys, group_of, sets, group_keys, group_valid = [], [], [], {}, [], []
        for idx in range(engine.num_layers):
            layer = cache.layers[idx]
            window = self.parts["windows"][idx]
            # layers that cache the same prompt keys share a mask and one tensor of their keys' positions (their
            # edits can then share a route); a sliding-window layer caches the last window - 1 of them
            identity = (id(run.layer_positions.get(idx)), layer.keys.shape[2] if window else None, window)
            if identity not in sets:
                sets[identity] = len(sets)
                keys_at = run.prompt_keys(idx, device)
                keys_at = keys_at[:, -layer.keys.shape[2]:] if window else keys_at
                group_keys.append(keys_at[:, :-1] if last_row else keys_at)
                group_valid.append(run.valid_keys(group_keys[-1]))
            group_of.append(sets[identity])
            keys_at = group_keys[group_of[-1]]
            if layer.keys.shape[2] != keys_at.shape[1] + last_row:
                raise RuntimeError(f"layer {idx} cached {layer.keys.shape[2]} prompt keys, the engine recorded "
                                   f"{keys_at.shape[1] + last_row}")  # fmt: skip
            if last_row:  # every sample's last prompt key is the last column (left padding, nothing pruned)
                prompt_kv.append((layer.keys[:, :, :-1], layer.values[:, :, :-1]))
            else:
                prompt_kv.append((layer.keys, layer.values))
            prompt_keys.append(keys_at)
        self._drop_unattended(run, device, prompt_kv, prompt_keys, group_of, group_keys, group_valid)
        capacities = [round_up(k.shape[1] + steps, BUCKET) for k in prompt_keys]
        edits = self._decode_edits(run, device, prompt_keys, capacities)
        keeps, per_head = self._per_head(run, device, prompt_kv, capacities, edits)
        step = self._static_step(prompt_kv, group_of, group_valid, capacities, edits, head_scales, keeps, per_head,
                                 self._recorded, device, offset=0 if last_row else 1, group_keys=group_keys,
                                 prompt_length=run.prompt_length)  # fmt: skip
        self.last_step = step
        return step

    def _drop_unattended(self, run, device, prompt_kv: list, prompt_keys: list, group_of: list, group_keys: list,
                         group_valid: list) -> None:
        """Where the methods say a layer's decoding never attends some of its cached prompt keys again
        (Method.decode_prompt_keep: A-VL's deleted image keys), that layer's buffer holds only the others, packed per
        sample in their order as the engine packs kept rows (shrinking.left_aligned_index: the shorter samples padded
        in front and masked), as a key set of the layer's own. Changes the lists in place; one host read for all
        such layers."""
        methods = [m for m in self.engine.methods if type(m).decode_prompt_keep is not Method.decode_prompt_keep]
        keeps = {}
        for idx, keys_at in enumerate(prompt_keys):
            for method in methods:
                keep = method.decode_prompt_keep(idx, run)
                if keep is not None:
                    keep = keep.to(device)[:, : keys_at.shape[1]] & group_valid[group_of[idx]]
                    keeps[idx] = keep if idx not in keeps else keeps[idx] & keep
        if not keeps:
            return
        if self.engine.per_head_cache:
            raise ValueError(f"{', '.join(m.name for m in methods)} frees prompt keys of the fast path's buffers and a "
                             "per-head pruned cache (plphp, streaming) frees others: use one of them")  # fmt: skip
        counts = torch.stack([keep.sum(1) for keep in keeps.values()]).tolist()
        for (idx, keep), host_counts in zip(keeps.items(), counts):
            index, _ = left_aligned_index(keep, host_counts)
            if index is None:  # every key kept
                continue
            kept, order = index >= 0, index.clamp(min=0)
            keys, values = prompt_kv[idx]
            index = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
            prompt_kv[idx] = (keys.gather(2, index), values.gather(2, index))
            prompt_keys[idx] = torch.where(kept, prompt_keys[idx].gather(1, order), -1)
            group_of[idx] = len(group_keys)
            group_keys.append(prompt_keys[idx])
            group_valid.append(kept)
        used = sorted(set(group_of))  # key sets no layer uses any more go
        group_of[:] = [used.index(group) for group in group_of]
        group_keys[:] = [group_keys[group] for group in used]
        group_valid[:] = [group_valid[group] for group in used]

    def _static_step(self, prompt_kv: list, group_of: list, group_valid: list, capacities: list, edits: dict,
                     head_scales: dict, keeps: dict, per_head: dict, recorded: dict, device, offset: int,
                     stream: bool = False, group_keys: list | None = None, prompt_length: int = 0) -> StaticStep:
        """The step of these buffer sizes, decoding edits, head scales and per-head caches: a kept one (reloaded) or a
        new one (captured on CUDA), loaded with this call's prompt keys; `recorded` holds the last prompt positions;
        `stream`: a plain stream beside the call's own decoding (plain_stream), never the call's own step."""
        engine = self.engine
        # edits made of tensors only are reloaded into a kept step's buffers; a post-softmax function holds this
        # call's tensors, so its step serves this call only
        kept = all(reloadable(layer_edits) for layer_edits in edits.values())
        structure = edits_key(edits) if kept else None
        keys = prompt_kv[0][0]
        layer_position = recorded.get("layer")
        kernels = kernel_backend(device)  # kernel 5 in the layers without edits, kernel 4 per head (where they run)
        key = (keys.shape[0], tuple(capacities), tuple(group_of), keys.shape[1], keys.shape[3], keys.dtype, device,
               tuple(recorded["rotary"].shape), None if layer_position is None else tuple(layer_position.shape),
               self.use_graph, structure, tuple(head_scales), kernels, tuple(per_head.items()), stream)  # fmt: skip
        step = self.steps.pop(key, None) if kept else None
        if step is None:
            started = time.perf_counter()
            while kept and len(self.steps) >= MAX_GRAPHS:
                self.steps.popitem(last=False)
            with torch.inference_mode(False):  # plain tensors: later calls may run outside inference mode
                step = StaticStep(self.parts, keys.shape[0], capacities, group_of, (keys.shape[1], keys.shape[3]),
                                  keys.dtype, device, recorded["rotary"].shape,
                                  None if layer_position is None else layer_position.shape,
                                  compiled=self.compiled and kept,  # a step for one call is not worth compiling
                                  kernels=kernels, per_head=per_head)
            step.set_edits(edits, static=kept)
            step.set_head_scales(head_scales)
            if kept:
                step.load_edits(edits)
            step.load_head_scales(head_scales)  # before a capture's warm-up runs (they scale by these)
            # the runs below (compiling, a capture's warm-up) advance the edits' step-to-step state: put it back
            states = [t for layer_edits in edits.values() if isinstance(layer_edits, list)
                      for edit in layer_edits for t in edit.state]  # fmt: skip
            saved = [t.clone() for t in states]
            if step.compiled and not self.graphs_on(device):
                with engine.plain():
                    step.step()  # compiles here, not in the first decoding step (load() then resets the buffers)
            if self.graphs_on(device):
                try:
                    with engine.plain():
                        step.capture()
                except Exception as error:  # the same step still runs, eagerly: slower, said loudly
                    self.capture_error = f"{type(error).__name__}: {error}"
                    warnings.warn(f"fast path: capturing the decoding step in a CUDA graph failed ({self.capture_error}); "
                                  "decoding runs the same step eagerly", RuntimeWarning, stacklevel=2)  # fmt: skip
                    step.graph = None
            for tensor, value in zip(states, saved):
                tensor.copy_(value)
            self.last_build_s = time.perf_counter() - started
        else:
            step.load_edits(edits)
            step.load_head_scales(head_scales)
        if kept:
            self.steps[key] = step
        step.load(prompt_kv, group_valid, recorded["rotary"], layer_position, offset=offset, per_head_keep=keeps,
                  group_keys=group_keys, prompt_length=prompt_length)
        return step

    @staticmethod
    def _enter_decoding(run) -> None:
        """The engine's state at the first decoding step (what hooks.ModelHooks.on_model_call sets), for asking the methods
        what they do while decoding."""
        run.fed = run.attention_mask_2d.shape[1]
        run.prefill = False
        run.decode_steps = 1
        run.rows = None
        run.layer_kwargs_cache.clear()
        mask = run.attention_mask_2d
        run.attention_mask_2d = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)

    def _per_head(self, run, device, prompt_kv: list, capacities: list, edits: dict) -> tuple[dict, dict]:
        """({layer: bool [B, Hkv, n]} the prompt keys each KV head keeps (ragged_cache.per_head_keep), {layer: rows}
        its per-head cache's rows): the kept keys plus each segment's room for the generated tokens, rounded up to
        SEGMENT_BUCKET rows per segment so that calls keeping similar numbers share a step. One host read for all
        layers."""
        if not self.engine.per_head_cache:
            return {}, {}
        keeps = {}
        for idx, (k, _) in enumerate(prompt_kv):
            keep = per_head_keep(self.engine, run, idx, device)
            if keep is not None:
                refuse_own_mask(self.engine, idx)
                keeps[idx] = keep[..., : k.shape[2]]  # without the last prompt key where the step runs that row
        edited = sorted(set(keeps) & set(edits))
        if edited:
            raise ValueError(
                f"layers {edited} decode on a per-head pruned KV cache (kernel 4, which applies no attention edit) and "
                f"a method edits their decoding attention: {DYNAMIC_PATH}, with plphp:cache=mask (a dense cache and a "
                "decode mask)"
            )
        if not keeps:
            return {}, {}
        segments = prompt_kv[0][0].shape[0] * prompt_kv[0][0].shape[1]
        kept = torch.stack([keep.sum() for keep in keeps.values()]).tolist()
        rows = {}
        for (idx, keep), count in zip(keeps.items(), kept):
            needed = count + segments * (capacities[idx] - keep.shape[2])
            rows[idx] = round_up(needed, segments * SEGMENT_BUCKET)
        return keeps, rows

    def _decode_edits(self, run, device, prompt_keys: list, capacities: list) -> dict:
        """{layer: [AttentionEdit]}: every method's edit of a decoding step's attention, asked once per layer over the
        whole static buffer (the kept prompt keys, then the slots of the generated ones). Only edits that stay the
        same at every step run here (the method gives a structured decoding form, Method.kernel_edit, which the
        engine too reuses at every step, on rotated logits, adding no pairs), and unstructured ones that change only
        through device tensors (Method.static_decode_edit). Others are refused."""
        engine = self.engine
        editing = [m for m in engine.methods if edits_attention(m)]
        if not editing:
            return {}
        batch, heads = run.layout.batch_size, engine.text_config.num_attention_heads
        queries = torch.full((batch, 1), run.fed, device=device)
        found: dict[int, list] = {}
        made = {}  # layers given the same edit objects over the same keys share one route
        for idx, (kept, capacity) in enumerate(zip(prompt_keys, capacities)):
            parts = [method.kernel_edit(idx, run, False) for method in editing]
            route = shared_group_route(made, parts, kept, capacity, heads)
            if route is not None:
                found[idx] = route
                continue
            first_step = engine.attention_context(idx, torch.empty(batch, heads, 1, 0, device=device))
            generated = torch.arange(run.prompt_length, run.prompt_length + capacity - kept.shape[1], device=device)
            context = AttentionContext(queries, torch.cat([kept, generated.expand(batch, -1)], dim=1), False, heads)
            for method in editing:
                unstructured = method.kernel_edit(idx, run, False) is UNSTRUCTURED
                # an edit kept on the device is made before anything asks the method about a step (asking advances
                # a stepping method's state); others are asked first as at the first decoding step (what the dynamic
                # path would ask), then, for an edit that stays the same at every step, over the whole buffer
                edit = method.static_decode_edit(idx, run, context) if unstructured else None
                if edit is None and engine.method_edit(method, idx, first_step) is None:
                    continue
                why = None
                if unstructured and edit is None:
                    why = ("with no form that stays the same at every step (Method.kernel_edit) nor one that keeps "
                           "its changes on the device (Method.static_decode_edit)")  # fmt: skip
                elif not unstructured:
                    edit = engine.method_edit(method, idx, context)
                    if edit is not None and (edit.unrotated is not None or edit.allow is not None):
                        why = "on pre-rotary logits or by adding pairs"
                if edit is None and why is None:
                    continue
                if why is not None:
                    raise ValueError(
                        f"{method.name} edits the attention of layer {idx} while decoding {why}; the fast path runs "
                        f"only decoding edits that stay the same at every step or change on the device. "
                        f"{DYNAMIC_PATH[0].upper()}"
                        f"{DYNAMIC_PATH[1:]}."
                    )
                found.setdefault(idx, []).append(edit)
        return found

    def _head_scales(self, run) -> dict[int, torch.Tensor]:
        """{layer: the methods' head-output scale [B, H] or [H] of a decoding step} (VHR), asked once per call as at
        the first decoding step: the step applies them at every step (hooks.ModelHooks.scaled_heads), as the dynamic
        path's hook does, whose methods give the same scale at every step."""
        methods = [m for m in self.engine.methods if m.edits_head_outputs()]
        if not methods:
            return {}
        scales = {idx: head_output_scale(methods, idx, run) for idx in range(self.engine.num_layers)}
        return {idx: scale for idx, scale in scales.items() if scale is not None}
