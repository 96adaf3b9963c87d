"""Kernel routing: which attention path each layer's call takes, and the translation of the methods' structured edits
(KernelEdit, vlm_efficient/method.py) into the inputs of the Triton kernels (vlm_efficient.kernels).

A method states its attention change once: `kernel_edit` (per original prompt position: key groups + a GroupSpec, a
MaskSpec, per-head output factors), from which vlm_efficient/edits.py derives the dense path's AttentionEdit; only an
edit with no structured form answers UNSTRUCTURED and writes a dense `attention_edit`. The router composes a layer's
kernel edits into one plan and picks the path:

    prefill    no edit, no statistics asked        SDPA, untouched                                   "sdpa"
               no edit, statistics asked           SDPA + kernel 2's pass over the asked rows         "stats"
               one group edit                      kernel 3 (group_attention)                          "group"
               one mask                            kernel 1 (masked_attention)                         "mask"
    decoding   one group edit (up to 4 groups)     kernel 3's decoding form (group_decode): one launch  "group"
                                                   over the layer's key-group buffer, no host work
               a per-head pruned cache (PLPHP)     kernel 4 (ragged_decode_attention; with the kernels  "ragged"
                                                   off, its torch form)
    otherwise                                      the dense torch path (as with the kernels off)     "dense"

"Otherwise": a method without a structured form edits the layer in this call, two group edits or a group edit and a
mask in one layer, a mask outside the prefill, a GroupSpec kernel 3 cannot run (GroupSpec.prepare refuses it), or an
attention mask that is not causal + key padding, a decoding group edit with more than 4 groups. A head_scale
multiplies the output of whichever path runs ("+scale").
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

import math
import os
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
        dense edit in this call): (output, [(method, AttentionStats)] computed here), or None with the route "dense"
        recorded where the call needs the dense path. `requests`: [(method, AttentionRequest)] of the layer."""
        layer = module.layer_idx
        backend = self.backend(run, query.device)
        scaling = kwargs.get("scaling")
        scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
        q_len, kv_len = query.shape[2], key.shape[2]
        plan, _, decode_cache = layer_plan
        ok, key_valid = True, None
        if plan is not None and not plan.empty:
            ok, key_valid = self._padding(run, attention_mask, q_len, kv_len)
        phase = "prefill" if run.prefill else "decode"
        kernels = _kernels()
        decode_group = plan is not None and plan.group is not None and not run.prefill
        if (plan is None or not ok or (plan.mask is not None and not run.prefill)
                or (decode_group and plan.group.spec.num_groups > kernels.MAX_DECODE_GROUPS)):
            self.dense(run, layer)
            return None
        delivered = ()
        if decode_group:
            route = "group"
            group, key_bias = self._decode_keys(plan.group, layer, run, query.device, kv_len, decode_cache)
            output = kernels.group_decode_attention(query, key, value, key_group=group, spec=plan.group.spec,
                                                    key_valid=key_valid, scaling=scaling, key_bias=key_bias,
                                                    backend=backend)
        elif plan.group is not None:
            route = "group"
            group, rows, key_bias = self._group_inputs(plan.group, run, query)
            output = kernels.group_attention(query, key, value, key_group=group, spec=plan.group.spec,
                                             key_valid=key_valid, causal=True, scaling=scaling,
                                             query_select=rows, key_bias=key_bias, backend=backend)
        elif plan.mask is not None:
            route = "mask"
            mask = self._structured_mask(run, plan.mask, key_valid, query.device)
            output = kernels.masked_attention(query, key, value, mask=mask, scaling=scaling, backend=backend)
        else:
            route, output, delivered = self._plain(module, query, key, value, attention_mask, kwargs, scaling, run,
                                                   requests)
        if plan.scale is not None:
            output = self._scale(output, plan.scale, run, query.device, decode_cache)
            route += "+scale"
        self.routes(run)[(phase, layer)] = route
        return (output, None), delivered

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

    def _plain(self, module, query, key, value, attention_mask, kwargs, scaling, run: RunState, requests: list):
        """No attention edit: SDPA, plus kernel 2's pass over the asked rows when a method asked this layer's
        statistics (prefill; the first such request, the others are computed after the call as with the kernels off).
        """
        if run.prefill:
            for method, request in requests:
                if request.probe or request.queries is None:
                    continue
                ok, key_valid = self._padding(run, attention_mask, query.shape[2], key.shape[2])
                if not ok:
                    break
                rows = run.query_rows(request).to(query.device)
                # the output exactly as the "sdpa" route computes it, the statistics from a small pass over the rows
                output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
                received = _kernels().received_attention(
                    query, key, key_valid=key_valid, causal=True, scaling=scaling, stat_queries=rows,
                    per_head=request.per_head, backend=self.backend(run, query.device))
                return "stats", output, ((method, AttentionStats(received=received,
                                                                  keys=key if request.keys else None)),)
        return "sdpa", sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0], ()

    # ---- inputs of the kernels --------------------------------------------------------------------------------------
    def _padding(self, run: RunState, attention_mask, q_len: int, kv_len: int):
        """key_padding(), cached per mask tensor for the prefill (every layer on the same rows shares one)."""
        if attention_mask is None or q_len == 1:
            return key_padding(attention_mask, q_len, kv_len)
        cache = run.memory(self).setdefault("masks", {})
        entry = cache.get(id(attention_mask))
        if entry is None or entry[0] is not attention_mask:
            entry = cache[id(attention_mask)] = (attention_mask, key_padding(attention_mask, q_len, kv_len))
        return entry[1]

    def _group_inputs(self, edit: KernelEdit, run: RunState, query):
        """(key groups [B, kv], selected rows [B, q] or None, key bias [B, kv] or None) of a prefill call, built once
        per (rows, edit tensors): layers that share them get the same tensors, so kernel 3 builds its per-key tables
        once per forward, not per layer."""
        cache = run.memory(self).setdefault("group_inputs", {})
        sources = (run.rows, run.input_positions, edit.groups, edit.rows, edit.key_bias)
        key = (*map(id, sources), str(query.device))
        entry = cache.get(key)
        if entry is None or any(a is not b for a, b in zip(entry[0], sources)):
            positions = run.current_positions().to(query.device)
            group = at_positions(edit.groups, positions, 0)
            rows = None if edit.rows is None else at_positions(edit.rows, positions, False)
            bias = None if edit.key_bias is None else at_positions(edit.key_bias.float(), positions, 0.0)
            entry = cache[key] = (sources, (group, rows, bias))
        return entry[1]

    def _decode_keys(self, edit: KernelEdit, layer: int, run: RunState, device, kv_len: int, cache: dict):
        """(groups int32 [B, >= kv_len], key bias [B, >= kv_len] or None) of a decoding call: the groups of the prompt
        keys layer `layer` cached, then group 0 (and bias 0) for the generated keys, in buffers DECODE_SLACK keys
        longer than the cache that grow (double) only when the cache outgrows them."""
        if "groups" not in cache or cache["groups"].shape[1] < kv_len:
            if "prompt" not in cache:
                prompt = run.prompt_keys(layer, device)
                bias = None if edit.key_bias is None else at_positions(edit.key_bias.float(), prompt, 0.0)
                cache["prompt"] = (at_positions(edit.groups, prompt, 0).to(torch.int32), bias)
            groups, bias = cache["prompt"]
            extra = max(kv_len + DECODE_SLACK, 2 * cache.get("capacity", 0)) - groups.shape[1]
            cache["groups"] = F.pad(groups, (0, extra))
            cache["bias"] = None if bias is None else F.pad(bias, (0, extra))
            cache["capacity"] = cache["groups"].shape[1]
        return cache["groups"], cache["bias"]

    def _structured_mask(self, run: RunState, spec, key_valid, device):
        """The kernels.StructuredMask of `spec` on the current rows, built once per rows (its block lists are cached on
        it, so every layer on the same rows reuses them)."""
        rows = run.rows
        cache = run.memory(self).setdefault("structured", {})
        key = (id(rows), spec, str(device))
        entry = cache.get(key)
        if entry is None or entry[0] is not rows:
            layout = token_layout(run, run.current_positions().to(device), key_valid)
            entry = cache[key] = (rows, _kernels().StructuredMask(layout, spec))
        return entry[1]

    def _scale(self, output: torch.Tensor, edit: KernelEdit, run: RunState, device, decode_cache: dict):
        """output [B, q, H, d] x head_scale [B, H] on the edit's rows (every decoding row; the factors of a decoding
        call are converted once)."""
        if not run.prefill:
            if "scale" not in decode_cache:
                decode_cache["scale"] = edit.head_scale.to(device=device, dtype=output.dtype)[:, None, :, None]
            return output * decode_cache["scale"]
        factors = edit.head_scale.to(device=device, dtype=output.dtype)[:, None, :, None]
        if edit.rows is None:
            return output * factors
        rows = at_positions(edit.rows, run.current_positions().to(device), False)
        return torch.where(rows[:, :, None, None], output * factors, output)


def _kernels():
    from .kernels import api as kernels

    return kernels
