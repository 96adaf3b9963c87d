"""The fast path's prefill: the decoder layers where no method acts run as captured segments (one CUDA graph per run
of consecutive plain layers and input shapes), the others through the wrapped model as on the dynamic path; and, on
a transformers whose generate() encodes the images before the prefill (`mm_encoder_outputs`, 5.25), that encoding as
one captured graph where no method hooks the vision side.

At batch 1 a prefill is host-bound: Hugging Face's Python around ~40 kernel launches per decoder layer costs more than
the GPU's work (README, "The prefill, explained"), so pruning shortens only the part the host hides. Here:
- the wrapped model's forward runs as usual (vision tower, projector, the BEFORE_LLM stage, the text model's mask and
  rotary tables) up to its first decoder layer, where a pre-hook stops it (TextModelEntry) with that layer's inputs;
- the layers then run in order from here. A layer where a method acts (probes, prunes, edits, observes, injects) or
  that carries a hook this library did not put there is called as a module, so every hook acts as on the dynamic
  path. A run of consecutive layers where nothing acts is a segment: its layers run inside Engine.plain() on the
  inputs the engine gives the segment's first layer (sliced rotary tables and masks after pruning), with a cache of
  its own whose keys and values then become the generate() cache's layers (not copied: _adopt). The engine's
  per-layer record (kept positions, row counts) is written as its layer hook would;
- on CUDA a segment whose input shapes were seen before is captured in a CUDA graph and replayed: one launch for
  the whole segment, no host work per layer. A shape seen for the first time runs the same code eagerly (a prompt
  length seen once is not worth a capture);
- where every method edits the last prompt row only, as it edits decoding rows (PAI, PAINT, AdaptVis), the edited
  layers run in the segments too: SDPA for every row, then the last row again through kernel 3's decoding form with
  the layer's composed group edit (fast_attention.routed_attention; the key groups are buffers reloaded per call).
  Edits that do not compose into one group edit defer the last row to the first decoding step instead;
- the last row's attention statistics (FastV's, A-VL's, PLPHP's, DyVTE's requests) do not stop a segment: its layers
  compute them (fast_attention.StatsRoute, inside the graph) and the methods get them after the segment, as
  attention_stats.deliver_stats hands them on the dynamic path, before any selection or edit that may use them;
- the final norm and the LM head run on the last row only (the logits generate() reads).

The image encoder (LeanEncoder): generate() calls the model's get_image_features before the prefill. Where nothing
but the engine and methods with an EncoderRecord (VisionZip, FasterVLM, VMTC: their recording and choosing run on
the device) hook the vision side, and the family's engine needs no grid from the tower's call (LLaVA-style), the
fast path makes that call itself, as generate() would, and passes its output as `mm_encoder_outputs`: eagerly the
first time its input shapes are seen, then from a CUDA graph, after whose replay the methods' records are put back
as the captured call left them. An encoder that cannot be captured (a host read inside, e.g. splitting features by
image size) stays eager.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import time

import torch
from torch.nn.modules import module as global_hooks
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .adapters import CACHE_KWARGS
from .fast_attention import (GroupRoute, StatsRoute, edit_buffers, edits_key, load_edit_buffers, routed,
                             shared_group_route)
from .method import AttentionStats, PerThread, edits_attention

MAX_SEGMENT_GRAPHS = 4  # captured segments kept per model and run of one layer type (least recently used dropped)
MAX_ENCODER_GRAPHS = 4  # captured image encodings kept per model
CAPTURE_AFTER = 2  # a segment's input shapes are captured the second time they are seen
MAX_SIGHTINGS = 256  # input signatures counted per model (the least recently seen forgotten)
TRANSFORMERS_RECORDER = "transformers.utils.output_capturing"  # the module of transformers' output-recording hooks


class TextModelEntry(Exception):
    """Raised by the first decoder layer's pre-hook during a lean prefill: the text model's inputs to its layers."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict):
        super().__init__("lean prefill: the wrapped model's forward stops at its first decoder layer")
        self.hidden, self.kwargs = hidden, kwargs


class _SegmentKV(CacheLayerMixin):
    """One layer's keys and values as a segment computes them: kept as the tensors the attention produced (inside a
    CUDA graph they live in its memory pool and are refilled by every replay)."""

    is_compileable = False

    def __init__(self):
        super().__init__()
        self.keys = self.values = None
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = key_states, value_states
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


def _tensor_tuple(value) -> bool:
    """A non-empty tuple of tensors (the rotary tables (cos, sin) of a layer call)."""
    return isinstance(value, tuple) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def _flat(kwargs: dict) -> list[tuple[str, int | None, torch.Tensor]]:
    """The tensors of a layer call's kwargs as (name, index in a tuple or None, tensor)."""
    found = []
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            found.append((name, None, value))
        elif _tensor_tuple(value):
            found.extend((name, i, v) for i, v in enumerate(value))
    return found


def _signature(kwargs: dict):
    """What a captured segment depends on besides tensor contents: tensor shapes and dtypes, other values as given.
    None where a value cannot be compared (the segment then runs eagerly)."""
    parts = []
    for name, value in sorted(kwargs.items()):
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype, value.device))
        elif _tensor_tuple(value):
            parts.append((name, tuple((tuple(v.shape), v.dtype, v.device) for v in value)))
        else:
            try:
                hash(value)
            except TypeError:
                return None
            parts.append((name, value))
    return tuple(parts)


@dataclasses.dataclass
class Segment:
    """Layers [start, end) run inside Engine.plain() on one set of layer kwargs, with a cache of their own; on CUDA
    recorded in a graph (capture) that replay() runs on new inputs."""

    start: int
    end: int
    parts: dict  # the fast path's model parts (layers, cache kwarg name, text config)
    engine: object
    graph: torch.cuda.CUDAGraph | None = None
    inputs: tuple | None = None  # (hidden, kwargs, routes) buffers a captured graph reads
    output: torch.Tensor | None = None  # the hidden state a captured graph writes
    cache: Cache | None = None

    def forward(self, hidden: torch.Tensor, kwargs: dict, routes: dict[int, GroupRoute]) -> torch.Tensor:
        """`routes`: layers whose last row runs kernel 3's decoding form (LeanPrefill's last-row routes)."""
        layers = self.parts["layers"]
        self.cache = Cache(layers=[_SegmentKV() for _ in layers])
        kwargs = {**kwargs, self.parts["cache_name"]: self.cache}
        with self.engine.plain(), routed(self.parts["config"], layers, routes):
            for idx in range(self.start, self.end):
                out = layers[idx](hidden, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def capture(self, hidden: torch.Tensor, kwargs: dict, routes: dict[int, GroupRoute]) -> Segment:
        self.inputs = (hidden.clone(), _buffers(kwargs), edit_buffers(routes))
        load_edit_buffers(self.inputs[2], routes)  # filled before the warm-up runs (kernel 3 reads its groups)
        self.graph, self.output = capture_graph(lambda: self.forward(*self.inputs), hidden.device)
        return self

    def replay(self, hidden: torch.Tensor, kwargs: dict, routes: dict[int, GroupRoute]) -> torch.Tensor:
        hidden_buffer, buffers, route_buffers = self.inputs
        hidden_buffer.copy_(hidden)
        _load(buffers, kwargs)
        load_edit_buffers(route_buffers, routes)
        self.graph.replay()
        return self.output

    def kv(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.cache.layers[idx]
        return layer.keys, layer.values


def _adopt(cache: Cache, idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """A segment's keys and values as layer idx of generate()'s cache, without the copy a cache update makes where the
    layer is still empty (a DynamicLayer concatenates onto an empty tensor): 64 copies and launches per LLaVA-1.5-7B
    prefill. The fast path's plan copies them into its static buffers before any later call replays the segment."""
    layer = cache.layers[idx]
    if type(layer) is DynamicLayer and not layer.is_initialized:
        layer.lazy_initialization(keys, values)  # what a first update records (device, dtype: per version)
        layer.keys, layer.values = keys, values
    else:
        cache.update(keys, values, idx)


def _foreign_hooks(modules, own_ids: set) -> bool:
    """Whether any of these modules has a forward (pre-)hook that is neither one of `own_ids` nor transformers' own
    output recorder (installed on first use; it records only where outputs are asked for, which the fast path
    refuses, and a captured call's output keeps what it recorded)."""
    for module in modules:
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            if not hooks:
                continue
            for handle_id, hook in hooks.items():
                if handle_id not in own_ids and getattr(hook, "__module__", None) != TRANSFORMERS_RECORDER:
                    return True
    return False


def _served_in_segments(request) -> bool:
    """No request, or one a segment computes (StatsRoute): the last row's, without keys, not a probe. Delivered after
    the segment, they still come before anything that may use them: a selection starts the next segment, and a layer
    where a method acts (an edit, a hook) is not in a segment."""
    return request is None or (request.queries == "last" and not request.keys and not request.probe)


def capture_graph(fn, device: torch.device, warmups: int = 2):
    """(graph, output of fn()) with fn recorded in a CUDA graph on `device`; warm-up runs on a side stream first, as
    cuBLAS and SDPA need before a capture."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


def _buffers(kwargs: dict) -> dict:
    """Copies of a call's kwargs whose tensors (alone or in tuples) a captured graph reads."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if _tensor_tuple(value):
            return tuple(v.clone() for v in value)
        return value

    return {name: copy(value) for name, value in kwargs.items()}


def _load(buffers: dict, kwargs: dict) -> None:
    """Copy a call's tensors into the buffers of the same names (the signatures matched, so the same set)."""
    values = {(name, index): value for name, index, value in _flat(kwargs)}
    for name, index, buffer in _flat(buffers):
        buffer.copy_(values[name, index])


class _Sightings:
    """Which input signatures to capture: the CAPTURE_AFTER-th sighting of one (on CUDA), among the MAX_SIGHTINGS
    most recently seen; never one whose capture failed; the captured ones, least recently used dropped past `keep`."""

    def __init__(self, keep: int):
        self.keep = keep
        self.captured: collections.OrderedDict = collections.OrderedDict()
        self.seen: dict = {}  # signature -> sightings, the most recent last
        self.last_capture_s: float | None = None
        self.capture_error: str | None = None

    def get(self, key):
        if key in self.captured:
            self.captured.move_to_end(key)
            return self.captured[key]
        return None

    def due(self, key) -> bool:
        count = self.seen.pop(key, 0) + 1
        if len(self.seen) >= MAX_SIGHTINGS:  # forget the oldest sighting: a server sees many prompt lengths
            self.seen.pop(next(iter(self.seen)))
        self.seen[key] = count
        return count == CAPTURE_AFTER

    def add(self, key, make):
        """make() -> the captured thing, or an exception (then None: the key stays eager)."""
        started = time.perf_counter()
        try:
            made = make()
        except Exception as error:  # the same work still runs, eagerly
            self.capture_error = f"{type(error).__name__}: {error}"
            return None
        self.last_capture_s = time.perf_counter() - started
        while len(self.captured) >= self.keep:
            self.captured.popitem(last=False)
        self.captured[key] = made
        return made


class LeanEncoder:
    """generate()'s image encoding before the prefill, made by the fast path (see the module docstring)."""

    def __init__(self, engine, graphs_on):
        self.engine, self.graphs_on = engine, graphs_on  # graphs_on(device): whether to capture there
        self.graphs = _Sightings(keep=MAX_ENCODER_GRAPHS)
        self.last_replayed = False  # whether the last call's images came from a captured graph
        self._vision_modules: list | None = None

    def prepare(self, kwargs: dict) -> dict:
        """generate()'s kwargs with the images encoded as generate() would (`mm_encoder_outputs`): from a captured
        graph where one exists or is due (CUDA), else eagerly."""
        self.last_replayed = False
        model, engine = self.engine.model, self.engine
        if (not isinstance(kwargs.get("pixel_values"), torch.Tensor) or kwargs.get("mm_encoder_outputs") is not None
                or not getattr(model, "_supports_mm_encoder_outputs", lambda: False)()
                or "image" not in getattr(model, "input_modalities", ())
                or engine.adapter.vision_capture_module(model) is not None or not self._vision_plain()):  # fmt: skip
            return kwargs
        encode = model.base_model.get_image_features
        # the arguments generate() would give it: its parameters found in the kwargs (generate() then drops them)
        names = [name for name in inspect.signature(encode).parameters if name != "kwargs" and name in kwargs]
        inputs = {name: kwargs[name] for name in names}
        signature = _signature(inputs)
        records = self._records()
        captured = None
        if signature is not None and self.graphs_on(kwargs["pixel_values"].device):
            captured = self.graphs.get(signature)
            if captured is None and self.graphs.due(signature):

                def make():
                    buffers = _buffers(inputs)

                    def encode_once():  # the methods' records of this call alone, taken after it
                        for record in records:
                            record.clear()
                        output = encode(**buffers, return_dict=True)
                        return output, [record.take() for record in records]

                    graph, (output, states) = capture_graph(encode_once, kwargs["pixel_values"].device)
                    return graph, buffers, output, states

                captured = self.graphs.add(signature, make)
        if captured is not None:
            graph, buffers, output, states = captured
            _load(buffers, inputs)
            graph.replay()
            for record, state in zip(records, states):  # what the methods' hooks would have left
                record.restore(state)
            self.last_replayed = True
        else:
            output = encode(**inputs, return_dict=True)
        rest = {name: value for name, value in kwargs.items() if name not in names}
        return {**rest, "mm_encoder_outputs": {"image": output}}

    def _records(self) -> list:
        """The EncoderRecords of the methods acting now (none inside a plain block)."""
        return [record for method in self.engine.methods if (record := method.encoder_record()) is not None]

    def _vision_plain(self) -> bool:
        """No hook on the vision side (the base model's modules outside the text model) but the engine's own and those
        of methods whose EncoderRecord names them."""
        model = self.engine.model
        if self._vision_modules is None:  # walked once: a wrapped model's module tree does not change
            text = {id(module) for module in self.engine.adapter.text_model(model).modules()}
            self._vision_modules = [m for m in model.base_model.modules()
                                    if m is not model.base_model and id(m) not in text]  # fmt: skip
        recorded = set().union(*(record.hook_ids for record in self._records()))
        return not _foreign_hooks(self._vision_modules, self.engine.hooks.own_ids | recorded)


class LeanPrefill:
    """The prefill of a fast-path model (see the module docstring). One per FastPath; calls hold its lock."""

    _active: bool = PerThread(bool)  # the calling thread's prefill is a lean one: the first layer's pre-hook stops it

    def __init__(self, engine, parts: dict, graphs_on, on_first_layer):
        """`graphs_on(device)`: whether to capture there; `on_first_layer(kwargs)`: what the fast path records from the
        first decoder layer's inputs as the engine's hook leaves them (from its pre-hook where the layer runs as a
        module, from the segment's inputs where it does not)."""
        self.engine, self.parts, self.graphs_on, self.on_first_layer = engine, parts, graphs_on, on_first_layer
        types = parts["layer_types"]  # a prefill's segments split where the layer type changes (plan)
        self.graphs = _Sightings(keep=MAX_SEGMENT_GRAPHS * (1 + sum(a != b for a, b in zip(types, types[1:]))))
        self.last_segments: list[tuple[int, int, bool]] = []  # (start, end, replayed from a graph) of the last call
        self.deferred_last_row = False  # the last call left its last prompt row to the first decoding step
        self.routed_last_row = False  # the last call ran its last prompt row's edits in its segments (_last_row_routes)
        self.last_row_only = False  # every method of the last call edits the last prompt row only, as a decoding row
        # each layer's modules, listed once (a wrapped model's module tree does not change; walking it per prefill
        # cost about 2 ms of host time on LLaVA-1.5-7B)
        self._layer_modules = [list(layer.modules()) for layer in parts["layers"]]
        first = parts["layers"][0]
        handles = [first.register_forward_pre_hook(self._stop, with_kwargs=True, prepend=True),
                   first.register_forward_pre_hook(lambda module, args, kwargs: on_first_layer(kwargs),
                                                   with_kwargs=True)]  # fmt: skip
        self.mixed = len(set(types)) > 1  # layers of several types (Gemma3's sliding and full layers)
        self._type_masks = None  # {layer type: its mask} the text model was given in this prefill (mixed types)
        if self.mixed:
            text_model = engine.adapter.text_model(parts["model"])
            handles.append(text_model.register_forward_pre_hook(self._record_type_masks, with_kwargs=True))
        for handle in handles:
            engine.add_handle(handle)
        self.own_ids = {h.id for h in handles}  # with ModelHooks.own_ids: the hooks that leave a layer plain

    def _record_type_masks(self, module, args, kwargs):
        # Gemma3's model hands its text model one mask per layer type (image blocks and windows included)
        if self._active:
            masks = kwargs.get("attention_mask")
            self._type_masks = masks if isinstance(masks, dict) else None

    def _stop(self, module, args, kwargs):
        if self._active and not self.engine.in_plain_block:  # not a method's side pass (Engine.plain)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            raise TextModelEntry(hidden, kwargs)

    # ---- one prefill ------------------------------------------------------------------------------------------
    def __call__(self, model, input_ids, config, model_kwargs, cache_name: str):
        """generate()'s prefill: (logits of the last row [B, vocab] in float32, the generate() cache).

        Where every acting method edits the last prompt row only, as it edits decoding rows
        (Method.prefill_edits_last_row_as_decoding: PAI, PAINT, AdaptVis), the layers run as segments all the same:
        where each edited layer's edits compose into one group edit, the segments run that layer's last row through
        kernel 3's decoding form (`routed_last_row`); else the prefill returns (None, the cache) with
        `deferred_last_row`: the layers run as the plain model runs them, and the caller drops the last row's keys and
        runs that row as a first decoding step with the edits (rows before it are the same either way: nothing edits
        them, and they do not see the last row)."""
        methods = self.engine.methods
        # (not with sliding-window layers: kernel 3's last-row form takes no window; their edited layers run as modules)
        self.last_row_only = (bool(methods) and all(m.prefill_edits_last_row_as_decoding for m in methods)
                              and not any(self.parts["windows"]))  # fmt: skip
        self._active = True
        try:
            model._prefill(input_ids, config, model_kwargs)
        except TextModelEntry as entry:
            hidden, kwargs = entry.hidden, entry.kwargs
        else:
            raise RuntimeError("the lean prefill did not reach the model's first decoder layer")
        finally:
            self._active = False
        cache = kwargs.get(cache_name)
        if cache is None:
            raise RuntimeError("the prefill built no KV cache to decode from")
        hidden = self._layers(hidden, kwargs, cache)
        if self.deferred_last_row:
            return None, cache
        parts = self.parts
        logits = parts["lm_head"](parts["norm"](hidden[:, -1:]))[:, -1]
        return logits.to(copy=True, dtype=torch.float32), cache

    def _layers(self, hidden: torch.Tensor, kwargs: dict, cache) -> torch.Tensor:
        engine, run, layers = self.engine, self.engine.run, self.parts["layers"]
        self.last_segments = []
        routes = self._last_row_routes(run, hidden.device) if self.last_row_only else None
        self.routed_last_row = bool(routes)
        self.deferred_last_row = self.last_row_only and routes is None
        typed = self._typed_kwargs(kwargs, hidden, run)
        for start, end, plain in self.plan(run):
            if not plain:
                for idx in range(start, end):
                    out = layers[idx](hidden, **typed(idx))
                    hidden = out[0] if isinstance(out, tuple) else out
                continue
            hidden = engine.select_before(start, hidden, run)  # as the layer hook does (plan(): a segment's start)
            layer_kwargs = None
            for idx in range(start, end):  # what the engine's layer hook records for each layer
                run.enter_layer(idx)
                inputs = engine.layer_inputs(idx, typed(idx), run, hidden.device)
                if layer_kwargs is None:  # the segment's own cache replaces generate()'s
                    layer_kwargs = {k: v for k, v in inputs.items() if k not in CACHE_KWARGS}
            if start == 0:
                self.on_first_layer(layer_kwargs)
            in_segment = {idx: route for idx, route in (routes or {}).items() if start <= idx < end}
            in_segment.update(self._stats_routes(start, end))
            segment, replayed = self._segment(start, end, hidden, layer_kwargs, in_segment)
            run_segment = segment.replay if replayed else segment.forward
            hidden = run_segment(hidden, layer_kwargs, in_segment)
            for idx in range(start, end):
                _adopt(cache, idx, *segment.kv(idx))
            self._deliver_stats(segment.inputs[2] if replayed else in_segment, run)
            self.last_segments.append((start, end, replayed))
        return hidden

    def _typed_kwargs(self, kwargs: dict, hidden: torch.Tensor, run):
        """idx -> the keyword arguments the text model's own loop gives layer idx: the first layer's, or with layers of
        several types that type's mask (as the model handed them to its text model) and rotary tables (the text
        model's rotary module for that type, at the same positions). A text model given one mask (the rows were
        shrunk before it: BEFORE_LLM) made its per-type masks itself; every layer then gets the engine's mask
        (ShrunkLayerInputs), so the first layer's stands in until then."""
        if not self.mixed:
            return lambda idx: kwargs
        parts, types, masks = self.parts, self.parts["layer_types"], self._type_masks
        if masks is None and run.input_positions is None:
            raise RuntimeError("the text model was given one mask for layers of several types and nothing replaces "
                               f"it: {', '.join(sorted(set(types)))} layers would share it")  # fmt: skip
        by_type = {}
        for idx, layer_type in enumerate(types):
            if layer_type not in by_type:
                tables = parts["adapter"].rotary_tables(parts["model"], idx, hidden, kwargs["position_ids"])
                mask = kwargs["attention_mask"] if masks is None else masks[layer_type]
                by_type[layer_type] = {**kwargs, "attention_mask": mask, "position_embeddings": tables}
        return lambda idx: by_type[types[idx]]

    def _stats_routes(self, start: int, end: int) -> dict[int, StatsRoute]:
        """{layer: its StatsRoute} for the segment's layers whose methods ask for the last row's statistics."""
        routes = {}
        for idx in range(start, end):
            requests = [m.attention_request(idx) for m in self.engine.methods]
            per_head = tuple(sorted({r.per_head for r in requests if r is not None}))
            if per_head:
                routes[idx] = StatsRoute(per_head)
        return routes

    def _deliver_stats(self, routes: dict, run) -> None:
        """Each method's statistics of the segment just run, as attention_stats.deliver_stats hands them (copies: a
        replay rewrites the graph's outputs)."""
        for idx, route in routes.items():
            if not isinstance(route, StatsRoute):
                continue
            for method in self.engine.methods:
                request = method.attention_request(idx)
                if request is not None:
                    received = route.received[request.per_head].clone()
                    method.observe_attention(idx, run, AttentionStats(received=received, keys=None))

    def _last_row_routes(self, run, device) -> dict[int, GroupRoute] | None:
        """{layer: its edits of this prefill as kernel 3's decoding form over every prompt key} for the layers the
        methods edit (all of them edit the last prompt row only, as a decoding row); None where a layer's edits do not
        compose into one group edit (the last row is then deferred to the first decoding step)."""
        engine = self.engine
        editing = [m for m in engine.methods if edits_attention(m)]
        heads, valid = engine.text_config.num_attention_heads, run.attention_mask_2d.to(device).bool()
        routes, made = {}, {}
        for idx in range(engine.num_layers):
            parts = [method.kernel_edit(idx, run, True) for method in editing]
            if all(part is None for part in parts):
                continue
            routes[idx] = shared_group_route(made, parts, None, run.prompt_length, heads)
            if routes[idx] is None:
                return None
            routes[idx].valid = valid
        return routes

    def _segment(self, start: int, end: int, hidden: torch.Tensor, kwargs: dict,
                 routes: dict[int, GroupRoute]) -> tuple[Segment, bool]:  # fmt: skip
        """The segment for these layers, input shapes and routes: a captured one where it exists or where these are
        seen for the CAPTURE_AFTER-th time (CUDA), else an eager one."""
        signature = _signature(kwargs)
        if signature is None or not self.graphs_on(hidden.device):
            return Segment(start, end, self.parts, self.engine), False
        key = (start, end, tuple(hidden.shape), hidden.dtype, hidden.device, signature, edits_key(routes))
        captured = self.graphs.get(key)
        if captured is None and self.graphs.due(key):
            make = Segment(start, end, self.parts, self.engine).capture
            captured = self.graphs.add(key, lambda: make(hidden, kwargs, routes))
        return (captured, True) if captured is not None else (Segment(start, end, self.parts, self.engine), False)

    # ---- which layers are plain -----------------------------------------------------------------------------
    def plan(self, run) -> list[tuple[int, int, bool]]:
        """[(start, end, plain)]: maximal runs of layers that are all plain (a segment) or all called as modules. A
        plain layer where a method prunes starts a segment: its selection runs before the segment, on the host's
        side, as the layer hook's would."""
        flags = [self._plain(idx, run) for idx in range(self.engine.num_layers)]
        prunes = self.engine.prune_layers
        runs, start = [], 0
        types = self.parts["layer_types"]  # a segment runs on one set of layer inputs: layers of one type
        for idx in range(1, len(flags) + 1):
            if (idx == len(flags) or flags[idx] != flags[start] or (flags[idx] and idx in prunes)
                    or (flags[idx] and types[idx] != types[idx - 1])):  # fmt: skip
                runs.append((start, idx, flags[start]))
                start = idx
        return runs

    def _plain(self, idx: int, run) -> bool:
        """Nothing acts in layer `idx` at this prefill but a selection before it (plan()): no probe, attention edit (a
        structured one that is None here) or statistics (but the last row's: the segment computes them, StatsRoute, and
        _layers delivers them after it), observed hidden state, head-output scale, pre-rotary capture
        or injection after it, and no hook on its modules but the engine's own (a method's or a user's hook must run:
        the layer is then called as a module). An edit of the last row only is run by the segments or deferred (__call__)."""
        engine, methods = self.engine, self.engine.methods
        if idx in engine.probe_layers or engine.shards is not None or run.static_cache:
            return False
        if any(m.observes_hidden(idx) or m.head_output_scale(idx, run) is not None or m.uses_unrotated(idx)
               or not _served_in_segments(m.attention_request(idx)) for m in methods):  # fmt: skip
            return False
        # a method may edit attention: plain where every editing method's structured edit of this prefill's layer is
        # None (UNSTRUCTURED: only a call can tell), so that the dynamic path too runs SDPA here, routed or not
        if (not self.last_row_only and idx not in engine.plain_layers
                and any(edits_attention(m) and m.kernel_edit(idx, run, True) is not None for m in methods)):  # fmt: skip
            return False
        if engine.adapter.acts_after_layer(idx, run):
            return False
        if global_hooks._global_forward_pre_hooks or global_hooks._global_forward_hooks:
            return False
        return not _foreign_hooks(self._layer_modules[idx], self.engine.hooks.own_ids | self.own_ids)
