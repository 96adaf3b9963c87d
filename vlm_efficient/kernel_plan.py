"""Kernel routing: which attention path each layer's call takes, and the translation of the methods' structured edits
(KernelEdit, vlm_efficient/method.py) into the inputs of the Triton kernels (vlm_efficient.kernels).

A method states its attention change once: `kernel_edit` (per original prompt position: key groups + a GroupSpec, a
MaskSpec, per-head output factors), from which vlm_efficient/edits.py derives the dense path's AttentionEdit; only an
edit with no structured form answers UNSTRUCTURED and writes a dense `attention_edit`. The router composes a layer's
kernel edits into one plan (`compose`) and runs the first of ROUTES, the kernel routes, that takes the call; a route
is one declaration, Route(name, phases, summary, takes, run), whose `takes(plan, call)` holds its refusals. The table,
generated from ROUTES (first match wins):

    route    phase           when it takes the call: what runs
{ROUTES}

The dense path also takes the calls of a layer whose edits do not compose into one plan (two group edits, or a group
edit and a mask, in one layer; a GroupSpec kernel 3 cannot run, which GroupSpec.prepare refuses) and those where a
method without a structured form edits the layer. A head_scale multiplies the output of whichever route runs
("+scale").
Statistics requests other than the first of a layer, and probes, are computed after the call as with the kernels off.
The route never depends on the backend, so the CPU tests with the torch references cover the GPU's routes.
Decoding asks each layer's kernel edits once (methods fix their edits at prefill) and reuses them at every step.

When: the environment variable VLM_EFFICIENT_KERNELS, read once per generate() / forward call:
    auto (default)  the Triton kernels on CUDA; elsewhere this module stays out (the engine's dense torch path)
    off             never (the engine's own path everywhere: SDPA, dense edits, separate statistics)
    triton          the Triton kernels (on CPU tensors only under TRITON_INTERPRET=1, set before triton is imported)
    reference       this routing with the kernels' torch references (CPU tests)
"""

from __future__ import annotations

import functools
import math
import os
import textwrap
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .method import UNSTRUCTURED, AttentionStats, KernelEdit, at_positions, edits_attention

DECODE_SLACK = 256  # generated keys the decoding key-group buffer holds before it grows

if typing.TYPE_CHECKING:
    from .run_state import RunState

MODES = ("auto", "off", "triton", "reference")
ENV = "VLM_EFFICIENT_KERNELS"


def kernel_backend(device: torch.device) -> str | None:
    """The kernels' backend for a call on `device` ("triton" / "reference"), or None: no routing."""
    mode = (os.environ.get(ENV, "auto") or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: use one of {', '.join(MODES)}")
    if mode == "off":
        return None
    if mode == "auto":
        from .kernels.api import triton_available

        return "triton" if device.type == "cuda" and triton_available() else None
    return mode


# ---- token roles and the kernel-1 layout -----------------------------------------------------------------------------
def token_roles(layout) -> torch.Tensor:
    """[B, N] kernels.layout role of every prompt position, in the engine's terms: IMAGE the visual tokens, PREFIX the
    text before the first one (layout.before_visual_text), QUESTION the text after the last one without the last
    position (layout.after_visual_text), LAST the last position (left padding: every sample's last token), MIDDLE
    other text (between images), PAD padding. A sample without visual tokens has no PREFIX (its text is QUESTION)."""
    from .kernels.api import ROLE_IMAGE, ROLE_LAST, ROLE_MIDDLE, ROLE_PAD, ROLE_PREFIX, ROLE_QUESTION

    role = torch.full(layout.kind.shape, ROLE_MIDDLE, dtype=torch.long, device=layout.kind.device)
    role[layout.before_visual_text] = ROLE_PREFIX
    role[layout.after_visual_text] = ROLE_QUESTION
    role[:, -1] = torch.where(layout.valid[:, -1], ROLE_LAST, role[:, -1])
    role[layout.visual] = ROLE_IMAGE
    role[~layout.valid] = ROLE_PAD
    return role


def _position_layout(run: RunState) -> dict[str, torch.Tensor]:
    """Per prompt position [B, N], once per run: image flag, role, image id (one id per image and grid part; a visual
    token without a grid cell, e.g. a LLaVA-NeXT row newline, gets an id of its own), grid row and column."""
    memory = run.memory(_position_layout)
    if "fields" not in memory:
        layout = run.layout
        visual = layout.visual
        part, row, col = layout.coords.unbind(-1)
        positions = torch.arange(layout.length, device=visual.device).expand_as(visual)
        image_id = torch.where(part >= 0, layout.image_index.clamp(min=0) * 4096 + part, (1 << 21) + positions)
        memory["fields"] = {
            "is_image": visual,
            "role": token_roles(layout),
            "image_id": torch.where(visual, image_id, -1),
            "grid_row": torch.where(visual, row, -1),
            "grid_col": torch.where(visual, col, -1),
        }
    return memory["fields"]


def token_layout(run: RunState, positions: torch.Tensor, valid: torch.Tensor | None = None):
    """The kernels' TokenLayout of the tokens at ORIGINAL positions [B, n] (a layer's rows or cached keys; -1 = slot
    padding, a PAD token). `valid` [B, n]: the valid keys (default: every position)."""
    kernels = _kernels()
    fields = {name: at_positions(values, positions, -1 if name != "is_image" else False)
              for name, values in _position_layout(run).items()}
    fields["role"] = torch.where(positions >= 0, fields["role"], kernels.ROLE_PAD)
    valid = valid if valid is not None else torch.ones_like(fields["is_image"])
    return kernels.TokenLayout(is_image=fields["is_image"], valid=valid, role=fields["role"],
                               image_id=fields["image_id"], grid_row=fields["grid_row"], grid_col=fields["grid_col"])


# ---- composition -----------------------------------------------------------------------------------------------------
@dataclass
class LayerPlan:
    """A layer's composed kernel edits: one group edit or one mask, and at most one output scale."""

    group: KernelEdit | None = None
    mask: typing.Any = None  # kernels.MaskSpec
    scale: KernelEdit | None = None

    @property
    def empty(self) -> bool:
        return self.group is None and self.mask is None and self.scale is None


def has_post(spec) -> bool:
    """Whether a GroupSpec redistributes after the softmax (else it only changes logits)."""
    key = ("kernel_plan", "post")
    if key not in spec._cache:
        _, _, _, keep, receive = spec.tables()
        spec._cache[key] = bool((keep != 1).any() or (receive != 0).any())
    return spec._cache[key]


def kernel_runs(spec) -> bool:
    """Whether kernel 3 runs this GroupSpec (at most two keep / receive classes besides the sink group)."""
    key = ("kernel_plan", "runs")
    if key not in spec._cache:
        try:
            spec.prepare("cpu")
            spec._cache[key] = True
        except NotImplementedError:
            spec._cache[key] = False
    return spec._cache[key]


def compose(parts: list[KernelEdit], num_heads: int) -> LayerPlan | None:
    """The methods' kernel edits of one layer (in method order) as one plan, or None: the dense path."""
    plan = LayerPlan()
    for part in parts:
        if part.spec is not None:
            if plan.group is not None or plan.mask is not None or part.groups is None:
                return None
            if part.spec.num_heads != num_heads or not kernel_runs(part.spec):
                return None
            if plan.scale is not None and has_post(part.spec):  # a redistribution after an output scale
                return None
            plan.group = part
        if part.mask is not None:
            if plan.mask is not None or plan.group is not None or part.rows is not None:
                return None
            plan.mask = part.mask
        if part.head_scale is not None:
            if plan.scale is not None:
                return None
            plan.scale = part
    return plan


# ---- the attention mask as causal + key padding ----------------------------------------------------------------------
def _allowed(attention_mask: torch.Tensor, kv_len: int) -> torch.Tensor:
    mask = attention_mask[..., :kv_len]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def key_padding(attention_mask: torch.Tensor | None, q_len: int, kv_len: int) -> tuple[bool, torch.Tensor | None]:
    """(expressible, key_valid [B, kv] or None): whether the mask an attention function received is bottom-right
    causal AND key padding for every real query row (rows of padding tokens are ignored: their outputs are never
    read), and the padding. One host sync for q_len > 1; none for a decoding row."""
    if attention_mask is None:
        return True, None
    allowed = _allowed(attention_mask, kv_len)
    if allowed.dim() != 4 or allowed.shape[1] != 1 or allowed.shape[2] != q_len:
        return False, None
    key_valid = allowed[:, 0, -1, :]
    if q_len == 1:
        return True, key_valid
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=allowed.device).tril(kv_len - q_len)
    expected = causal & key_valid[:, None, :]
    real_rows = key_valid[:, kv_len - q_len :, None]
    ok, everything = torch.stack([((allowed[:, 0] == expected) | ~real_rows).all(), key_valid.all()]).tolist()
    return bool(ok), (None if everything else key_valid)


# ---- one call and the routes ----------------------------------------------------------------------------------------
class LayerCall:
    """One attention call of a layer as the routes see it: its tensors, run and statistics requests, the kernels'
    inputs built from them (once per run, or per layer for decoding, in the router's run memory), and the statistics
    a route computed for the methods (`delivered`)."""

    def __init__(self, router, module, query, key, value, attention_mask, kwargs, run: RunState, requests: list,
                 decode_cache: dict):
        self.module, self.query, self.key, self.value = module, query, key, value
        self.attention_mask, self.kwargs, self.run, self.requests = attention_mask, kwargs, run, requests
        self.decode_cache = decode_cache  # the layer's decoding inputs, kept across steps (layer_plan)
        self.memory = run.memory(router)
        self.backend = router.backend(run, query.device)
        self.phase = "prefill" if run.prefill else "decode"
        scaling = kwargs.get("scaling")
        self.scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
        self.delivered: list[tuple[typing.Any, AttentionStats]] = []
        self._padding = None  # `padding`, once a route asks

    @property
    def padding(self) -> tuple[bool, torch.Tensor | None]:
        """key_padding() of the call's mask, cached per mask tensor for the prefill (every layer on the same rows
        shares one). Asked only by the routes that need it: one host sync per prefill mask."""
        if self._padding is None:
            mask, q_len, kv_len = self.attention_mask, self.query.shape[2], self.key.shape[2]
            if mask is None or q_len == 1:
                self._padding = key_padding(mask, q_len, kv_len)
            else:
                cache = self.memory.setdefault("masks", {})
                entry = cache.get(id(mask))
                if entry is None or entry[0] is not mask:
                    entry = cache[id(mask)] = (mask, key_padding(mask, q_len, kv_len))
                self._padding = entry[1]
        return self._padding

    @property
    def causal_padding(self) -> bool:
        """Whether the call's mask is causal + key padding (what the kernels express)."""
        return self.padding[0]

    @property
    def key_valid(self) -> torch.Tensor | None:
        return self.padding[1]

    def sdpa(self) -> torch.Tensor:
        return sdpa_attention_forward(self.module, self.query, self.key, self.value, self.attention_mask,
                                      **self.kwargs)[0]

    def group_inputs(self, edit: KernelEdit) -> dict:
        """Kernel 3's key_group [B, kv], query_select [B, q] or None and key_bias [B, kv] or None for a prefill call,
        built once per (rows, edit tensors): layers that share them get the same tensors, so kernel 3 builds its
        per-key tables once per forward, not per layer."""
        run = self.run
        cache = self.memory.setdefault("group_inputs", {})
        sources = (run.rows, run.input_positions, edit.groups, edit.rows, edit.key_bias)
        key = (*map(id, sources), str(self.query.device))
        entry = cache.get(key)
        if entry is None or any(a is not b for a, b in zip(entry[0], sources)):
            positions = run.current_positions().to(self.query.device)
            entry = cache[key] = (sources, {
                "key_group": at_positions(edit.groups, positions, 0),
                "query_select": None if edit.rows is None else at_positions(edit.rows, positions, False),
                "key_bias": None if edit.key_bias is None else at_positions(edit.key_bias.float(), positions, 0.0),
            })
        return entry[1]

    def decode_keys(self, edit: KernelEdit) -> dict:
        """Kernel 3's decoding key_group int32 [B, >= kv] and key_bias [B, >= kv] or None: the groups of the prompt
        keys the layer cached, then group 0 (and bias 0) for the generated keys, in buffers DECODE_SLACK keys longer
        than the cache that grow (double) only when the cache outgrows them."""
        cache, kv_len = self.decode_cache, self.key.shape[2]
        if "groups" not in cache or cache["groups"].shape[1] < kv_len:
            if "prompt" not in cache:
                prompt = self.run.prompt_keys(self.module.layer_idx, self.query.device)
                bias = None if edit.key_bias is None else at_positions(edit.key_bias.float(), prompt, 0.0)
                cache["prompt"] = (at_positions(edit.groups, prompt, 0).to(torch.int32), bias)
            groups, bias = cache["prompt"]
            extra = max(kv_len + DECODE_SLACK, 2 * cache.get("capacity", 0)) - groups.shape[1]
            cache["groups"] = F.pad(groups, (0, extra))
            cache["bias"] = None if bias is None else F.pad(bias, (0, extra))
            cache["capacity"] = cache["groups"].shape[1]
        return {"key_group": cache["groups"], "key_bias": cache["bias"]}

    def structured_mask(self, spec):
        """The kernels.StructuredMask of `spec` on the current rows, built once per rows (its block lists are cached on
        it, so every layer on the same rows reuses them)."""
        rows, device = self.run.rows, self.query.device
        cache = self.memory.setdefault("structured", {})
        key = (id(rows), spec, str(device))
        entry = cache.get(key)
        if entry is None or entry[0] is not rows:
            layout = token_layout(self.run, self.run.current_positions().to(device), self.key_valid)
            entry = cache[key] = (rows, _kernels().StructuredMask(layout, spec))
        return entry[1]

    def scaled(self, output: torch.Tensor, edit: KernelEdit) -> torch.Tensor:
        """output [B, q, H, d] x head_scale [B, H] on the edit's rows (every decoding row; the factors of a decoding
        call are converted once)."""
        device = self.query.device
        if not self.run.prefill:
            if "scale" not in self.decode_cache:
                self.decode_cache["scale"] = edit.head_scale.to(device=device, dtype=output.dtype)[:, None, :, None]
            return output * self.decode_cache["scale"]
        factors = edit.head_scale.to(device=device, dtype=output.dtype)[:, None, :, None]
        if edit.rows is None:
            return output * factors
        rows = at_positions(edit.rows, self.run.current_positions().to(device), False)
        return torch.where(rows[:, :, None, None], output * factors, output)


@dataclass(frozen=True)
class Route:
    """A kernel route: in a call of one of its `phases`, where `takes(plan, call)` accepts the layer's LayerPlan and
    the LayerCall (its refusals included), `run(plan, call)` computes the output [B, q, H, d]."""

    name: str  # what routes() records; a plan's head_scale adds "+scale"
    phases: tuple[str, ...]
    summary: str  # its line in the module docstring's table
    takes: typing.Callable[[LayerPlan, LayerCall], bool]
    run: typing.Callable[[LayerPlan, LayerCall], torch.Tensor]


PREFILL, DECODE = ("prefill",), ("decode",)


def _plain_attention(plan: LayerPlan) -> bool:
    """The plan changes no attention weights (at most the output, by a head_scale)."""
    return plan.group is None and plan.mask is None


def _row_stats_request(call: LayerCall):
    """The layer's first (method, request) for statistics over chosen rows, or None. The others, and probes, are
    computed after the call as with the kernels off."""
    return next(((method, request) for method, request in call.requests
                 if not request.probe and request.queries is not None), None)


def _sdpa_and_row_stats(plan: LayerPlan, call: LayerCall) -> torch.Tensor:
    """The output exactly as the "sdpa" route computes it, the statistics from kernel 2's small pass over the rows."""
    method, request = _row_stats_request(call)
    rows = call.run.query_rows(request).to(call.query.device)
    output = call.sdpa()
    received = _kernels().received_attention(
        call.query, call.key, key_valid=call.key_valid, causal=True, scaling=call.scaling, stat_queries=rows,
        per_head=request.per_head, backend=call.backend)
    call.delivered.append((method, AttentionStats(received=received, keys=call.key if request.keys else None)))
    return output


# Checked in order; the first route that takes the call runs it, none: the dense path.
ROUTES = (
    Route("group", DECODE, "one group edit with up to 4 groups: kernel 3's decoding form (group_decode), one launch "
          "over the layer's key-group buffer, no host work",
          takes=lambda plan, call: (plan.group is not None and call.causal_padding
                                    and plan.group.spec.num_groups <= _kernels().MAX_DECODE_GROUPS),
          run=lambda plan, call: _kernels().group_decode_attention(
              call.query, call.key, call.value, spec=plan.group.spec, key_valid=call.key_valid, scaling=call.scaling,
              backend=call.backend, **call.decode_keys(plan.group))),
    Route("group", PREFILL, "one group edit: kernel 3 (group_attention)",
          takes=lambda plan, call: plan.group is not None and call.causal_padding,
          run=lambda plan, call: _kernels().group_attention(
              call.query, call.key, call.value, spec=plan.group.spec, key_valid=call.key_valid, causal=True,
              scaling=call.scaling, backend=call.backend, **call.group_inputs(plan.group))),
    Route("mask", PREFILL, "one mask: kernel 1 (masked_attention)",
          takes=lambda plan, call: plan.mask is not None and call.causal_padding,
          run=lambda plan, call: _kernels().masked_attention(
              call.query, call.key, call.value, mask=call.structured_mask(plan.mask), scaling=call.scaling,
              backend=call.backend)),
    Route("stats", PREFILL, "no edit, statistics over chosen rows asked: SDPA + kernel 2's pass over those rows",
          takes=lambda plan, call: (_plain_attention(plan) and _row_stats_request(call) is not None
                                    and call.causal_padding),
          run=_sdpa_and_row_stats),
    # a head_scale on another mask takes the dense path, as every structured edit does
    Route("sdpa", PREFILL + DECODE, "no edit: SDPA, untouched",
          takes=lambda plan, call: _plain_attention(plan) and (plan.scale is None or call.causal_padding),
          run=lambda plan, call: call.sdpa()),
)


# ---- the router ------------------------------------------------------------------------------------------------------
class KernelRouter:
    """One per engine, fed one way: the engine asks `layer_plan` for a layer's composed kernel edits, asks the methods
    without a structured form for their dense edits itself, and hands `attend` the call; `attend` returns the output
    and the statistics it computed, or None where the call takes the dense path (the engine's, recorded by `dense`).
    A decoding call on a per-head pruned cache goes to `ragged`. The router records every route itself and never
    calls back into the engine. Its per-run state (routes taken, caches) lives in run.memory(router)."""

    def backend(self, run: RunState | None, device: torch.device) -> str | None:
        if run is None:
            return None
        memory = run.memory(self)
        if "backend" not in memory:
            memory["backend"] = kernel_backend(device)
        return memory["backend"]

    def routes(self, run: RunState) -> dict[tuple[str, int], str]:
        """{("prefill" | "decode", layer): route of the latest call of that layer} (the module docstring's table)."""
        return run.memory(self).setdefault("routes", {})

    # ---- the layer's plan --------------------------------------------------------------------------------------------
    def layer_plan(self, layer: int, run: RunState, methods: list, num_heads: int):
        """(plan or None for the dense path, methods without a structured form here, the layer's decoding cache).
        Decoding asks once per layer."""
        memory = run.memory(self)
        cache = memory.setdefault("decode", {})
        if not run.prefill and layer in cache:
            return cache[layer]
        parts, unstructured = [], []
        for method in methods:
            if not edits_attention(method):
                continue
            part = method.kernel_edit(layer, run, run.prefill)
            if part is UNSTRUCTURED:
                unstructured.append(method)
            elif part is not None:
                parts.append(part)
        entry = (compose(parts, num_heads), unstructured, {})
        if not run.prefill:
            cache[layer] = entry
        return entry

    # ---- one call ----------------------------------------------------------------------------------------------------
    def attend(self, module, query, key, value, attention_mask, kwargs, run: RunState, layer_plan, requests: list):
        """One call of a layer whose methods' edits are all structured (`layer_plan`: layer_plan()'s answer, with no
        dense edit in this call): the first of ROUTES that takes it runs, then the plan's head_scale ("+scale");
        (output, [(method, AttentionStats)] computed here), or None with the route "dense" recorded where none takes
        it. `requests`: [(method, AttentionRequest)] of the layer."""
        plan, _, decode_cache = layer_plan
        call = LayerCall(self, module, query, key, value, attention_mask, kwargs, run, requests, decode_cache)
        route = None if plan is None else next(
            (route for route in ROUTES if call.phase in route.phases and route.takes(plan, call)), None)
        if route is None:
            self.dense(run, module.layer_idx)
            return None
        output, name = route.run(plan, call), route.name
        if plan.scale is not None:
            output, name = call.scaled(output, plan.scale), name + "+scale"
        self.routes(run)[(call.phase, module.layer_idx)] = name
        return (output, None), tuple(call.delivered)

    def ragged(self, run: RunState, layer: int, query: torch.Tensor, cache, scaling) -> torch.Tensor:
        """A decoding call of `layer` on a per-head pruned cache (ragged_cache.py, `cache`: its kernels.RaggedKVCache):
        each query head attends to its KV head's kept keys; kernel 4 where the backend is Triton, else the same
        computation in torch ops (whatever VLM_EFFICIENT_KERNELS says: no dense cache is left). Route "ragged"."""
        kernels = _kernels()
        scaling = kernels.default_scaling(query) if scaling is None else scaling
        self.routes(run)[("decode", layer)] = "ragged"
        if self.backend(run, query.device) == "triton":
            return kernels.ragged_decode_attention(query, cache, scaling=scaling, backend="triton")
        return kernels.ragged_decode_attention_torch(query, cache, scaling=scaling)

    def dense(self, run: RunState, layer: int) -> None:
        """Record that this call of `layer` takes the dense path (the engine runs it)."""
        self.routes(run)[("prefill" if run.prefill else "decode", layer)] = "dense"


@functools.cache  # a routed call asks up to three times: one import lookup, not one per ask
def _kernels():
    from .kernels import api as kernels

    return kernels


def _route_table() -> str:
    """The module docstring's table: ROUTES, then the two routes outside it."""
    rows = [(route.name, "/".join(route.phases), route.summary) for route in ROUTES] + [
        ("ragged", "decode", "a per-head pruned cache (PLPHP, KernelRouter.ragged): kernel 4 "
                             "(ragged_decode_attention; with the kernels off, its torch form)"),
        ("dense", "any", "no route takes the call (a mask outside the prefill, a decoding group edit with more than "
                         "4 groups, an attention mask that is not causal + key padding under an edit): the dense "
                         "torch path, as with the kernels off")]
    return "\n".join(textwrap.fill(summary, 120, initial_indent=f"    {name:9}{phase:16}", subsequent_indent=" " * 29)
                     for name, phase, summary in rows)


__doc__ = __doc__.replace("{ROUTES}", _route_table())
