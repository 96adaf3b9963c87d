"""Kernel routing: which attention path each layer's call takes, and the translation of the methods' structured edits
(KernelEdit, vlm_efficient/method.py) into the inputs of the Triton kernels (vlm_efficient.kernels).

A method states its attention change twice: `attention_edit` (dense tensors over the current rows and keys: the torch
path and the reference) and, where it can, `kernel_edit` (per original prompt position: key groups + a GroupSpec, a
MaskSpec, per-head output factors). The router composes a layer's kernel edits into one plan and picks the path:

    prefill    no edit, no statistics asked        SDPA, untouched                                   "sdpa"
               no edit, statistics asked           kernel 2: attention + received attention, 1 call  "stats"
               one group edit                      kernel 3 (group_attention)                          "group"
               one mask                            kernel 1 (masked_attention)                         "mask"
    decoding   group edit on logits only (group 0,  SDPA with the additive bias a*(scale-1) + abs|a| +   "bias"
               the generated keys, untouched)      bias: exact; one matmul row, no fp32 K / V copies
               group edit with redistribution      kernel 3 on the step's rows                         "group"
    otherwise                                      the dense torch path (as with the kernels off)     "dense"

"Otherwise": a method without a structured form edits the layer in this call, two group edits or a group edit and a
mask in one layer, a mask outside the prefill, a GroupSpec kernel 3 cannot run (GroupSpec.prepare refuses it), or an
attention mask that is not causal + key padding. A head_scale multiplies the output of whichever path runs ("+scale").
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

if typing.TYPE_CHECKING:
    from .engine import Engine, RunState

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
        from .kernels import triton_available

        return "triton" if device.type == "cuda" and triton_available() else None
    return mode


# ---- token roles and the kernel-1 layout -----------------------------------------------------------------------------
def token_roles(layout) -> torch.Tensor:
    """[B, N] kernels.layout role of every prompt position, in the engine's terms: IMAGE the visual tokens, PREFIX the
    text before the first one (layout.before_visual_text), QUESTION the text after the last one without the last
    position (layout.after_visual_text), LAST the last position (left padding: every sample's last token), MIDDLE
    other text (between images), PAD padding. A sample without visual tokens has no PREFIX (its text is QUESTION)."""
    from .kernels import ROLE_IMAGE, ROLE_LAST, ROLE_MIDDLE, ROLE_PAD, ROLE_PREFIX, ROLE_QUESTION

    role = torch.full(layout.kind.shape, ROLE_MIDDLE, dtype=torch.long, device=layout.kind.device)
    role[layout.before_visual_text] = ROLE_PREFIX
    role[layout.after_visual_text] = ROLE_QUESTION
    role[:, -1] = torch.where(layout.valid[:, -1], ROLE_LAST, role[:, -1])
    role[layout.visual] = ROLE_IMAGE
    role[~layout.valid] = ROLE_PAD
    return role


def _position_layout(layout) -> dict[str, torch.Tensor]:
    """Per prompt position [B, N]: image flag, role, image id (one id per image and grid part; a visual token without
    a grid cell, e.g. a LLaVA-NeXT row newline, gets an id of its own), grid row and column."""
    visual = layout.visual
    part, row, col = layout.coords.unbind(-1)
    positions = torch.arange(layout.length, device=visual.device).expand_as(visual)
    image_id = torch.where(part >= 0, layout.image_index.clamp(min=0) * 4096 + part, (1 << 21) + positions)
    return {
        "is_image": visual,
        "role": token_roles(layout),
        "image_id": torch.where(visual, image_id, -1),
        "grid_row": torch.where(visual, row, -1),
        "grid_col": torch.where(visual, col, -1),
    }


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


def logits_only(spec) -> bool:
    """Whether a GroupSpec only changes logits, group 0 (the keys of generated tokens) not at all: decoding rows then
    take the "bias" route."""
    key = ("kernel_plan", "logits_only")
    if key not in spec._cache:
        scale, absolute, bias, _, _ = spec.tables()
        identity = bool((scale[:, 0] == 1).all() and (absolute[:, 0] == 0).all() and (bias[:, 0] == 0).all())
        spec._cache[key] = identity and not has_post(spec)
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


def _logits(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """q . k [B, Hq, q, kv] from one matmul in the input dtype (grouped-query heads by a view: K is not repeated).
    In bf16 the logits are rounded to bf16; the bias path only multiplies them by small factors (scale - 1, abs), so
    the rounding reaches the bias at the level of the bias's own bf16 rounding."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    grouped = query.reshape(batch, kv_heads, (heads // kv_heads) * q_len, dim)
    return torch.matmul(grouped, key.transpose(-1, -2)).view(batch, heads, q_len, kv_len)


# ---- the router ------------------------------------------------------------------------------------------------------
class KernelRouter:
    """One per engine. `attend` runs one attention call of a layer (when `backend(run, device)` is not None) and says
    whose statistics it delivered; its per-run state (routes taken, caches) lives in run.memory(router)."""

    def __init__(self, engine: Engine):
        self.engine = engine

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
    def _layer(self, layer: int, run: RunState, num_heads: int):
        """(plan or None for the dense path, methods without a structured form here). Decoding asks once per layer."""
        memory = run.memory(self)
        cache = memory.setdefault("decode", {})
        if not run.prefill and layer in cache:
            return cache[layer]
        parts, unstructured = [], []
        for method in self.engine.methods:
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

    def _dense(self, layer: int, run: RunState, query, key, unstructured) -> list:
        """The dense edits of the layer when one of its methods without a structured form edits this call, else []
        (each method asked once)."""
        if not unstructured:
            return []
        context = self.engine.attention_context(layer, query)
        known = {id(method): self.engine.method_edit(method, layer, context) for method in unstructured}
        if all(edit is None for edit in known.values()):
            return []
        return self.engine.attention_edits(layer, query, key, known)

    # ---- one call ----------------------------------------------------------------------------------------------------
    def attend(self, module, query, key, value, attention_mask, kwargs, unrotated=None):
        engine, run = self.engine, self.engine.run
        layer = module.layer_idx
        backend = self.backend(run, query.device)
        scaling = kwargs.get("scaling")
        scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
        q_len, kv_len = query.shape[2], key.shape[2]
        plan, unstructured, decode_cache = self._layer(layer, run, query.shape[1])
        edits = [] if plan is None else self._dense(layer, run, query, key, unstructured)
        ok, key_valid = True, None
        if plan is not None and not edits and not plan.empty:
            ok, key_valid = self._padding(run, attention_mask, q_len, kv_len)
        phase = "prefill" if run.prefill else "decode"
        if plan is None or edits or not ok or (plan.mask is not None and not run.prefill):
            self.routes(run)[(phase, layer)] = "dense"
            edits = edits or engine.attention_edits(layer, query, key)
            return engine.dense_attention(module, query, key, value, attention_mask, kwargs, scaling, edits,
                                          unrotated), ()
        kernels = _kernels()
        delivered = ()
        if plan.group is not None:
            if not run.prefill and logits_only(plan.group.spec):
                route = "bias"
                output = self._bias_attention(module, query, key, value, attention_mask, scaling, plan.group, layer,
                                              run, decode_cache)
            else:
                route = "group"
                group, rows, key_bias = self._group_inputs(plan.group, layer, run, query, kv_len, decode_cache)
                output = kernels.group_attention(query, key, value, key_group=group, spec=plan.group.spec,
                                                 key_valid=key_valid, causal=True, scaling=scaling,
                                                 query_select=rows, key_bias=key_bias, backend=backend)
        elif plan.mask is not None:
            route = "mask"
            mask = self._structured_mask(run, plan.mask, key_valid, query.device)
            output = kernels.masked_attention(query, key, value, mask=mask, scaling=scaling, backend=backend)
        else:
            route, output, delivered = self._plain(module, query, key, value, attention_mask, kwargs, scaling)
        if plan.scale is not None:
            output = self._scale(output, plan.scale, run, query.device)
            route += "+scale"
        self.routes(run)[(phase, layer)] = route
        return (output, None), delivered

    def _plain(self, module, query, key, value, attention_mask, kwargs, scaling):
        """No attention edit: SDPA, or kernel 2 when a method asked this layer's statistics (prefill; the first such
        request, the others are computed after the call as with the kernels off)."""
        engine, run = self.engine, self.engine.run
        layer = module.layer_idx
        if run.prefill:
            for method in engine.methods:
                request = method.attention_request(layer)
                if request is None or request.probe or request.queries is None:
                    continue
                ok, key_valid = self._padding(run, attention_mask, query.shape[2], key.shape[2])
                if not ok:
                    break
                rows = run.query_rows(request).to(query.device)
                output, received = _kernels().attention_with_received_stats(
                    query, key, value, key_valid=key_valid, causal=True, scaling=scaling, stat_queries=rows,
                    per_head=request.per_head, backend=self.backend(run, query.device))
                method.observe_attention(layer, run, AttentionStats(received=received,
                                                                    keys=key if request.keys else None))
                return "stats", output, (method,)
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

    def _group_inputs(self, edit: KernelEdit, layer: int, run: RunState, query, kv_len: int, decode_cache: dict):
        """(key groups [B, kv], selected rows [B, q] or None, key bias [B, kv] or None) for this call; decoding pads
        the layer's prompt keys (_decode_keys) for the generated keys (group 0, no bias; every row selected)."""
        if run.prefill:
            positions = run.current_positions().to(query.device)
            group = at_positions(edit.groups, positions, 0)
            rows = None if edit.rows is None else at_positions(edit.rows, positions, False)
            bias = None if edit.key_bias is None else at_positions(edit.key_bias.float(), positions, 0.0)
            return group, rows, bias
        group, bias = self._decode_keys(edit, layer, run, query.device, decode_cache)
        extra = kv_len - group.shape[1]
        return F.pad(group, (0, extra)), None, None if bias is None else F.pad(bias, (0, extra))

    def _decode_keys(self, edit: KernelEdit, layer: int, run: RunState, device, cache: dict):
        """(groups [B, m], key bias [B, m] or None) of the m prompt keys layer `layer` cached, once per decoding."""
        if "group" not in cache:
            prompt = self._prompt_keys(run, layer, device)
            cache["group"] = at_positions(edit.groups, prompt, 0)
            cache["bias"] = None if edit.key_bias is None else at_positions(edit.key_bias.float(), prompt, 0.0)
        return cache["group"], cache["bias"]

    @staticmethod
    def _prompt_keys(run: RunState, layer: int, device) -> torch.Tensor:
        """[B, m] original positions of the prompt keys this layer cached (-1 = slot padding)."""
        prompt = run.layer_positions.get(layer)
        if prompt is None:
            prompt = torch.arange(run.prompt_length).expand(run.layout.batch_size, -1)
        return prompt.to(device)

    def _bias_attention(self, module, query, key, value, attention_mask, scaling, edit, layer, run, cache):
        """Decoding rows with a logit-only group edit: SDPA with the additive bias a * (scale - 1) + abs * |a| + bias
        (+ key_bias), which is exact. The per-key vectors of the layer's cached prompt keys are gathered once (in the
        input dtype, scale and |a| folded with the scaling); each step pads them for the generated keys and, where
        scale or abs is not the identity, computes the logits a with one matmul."""
        if "vectors" not in cache:
            group, key_bias = self._decode_keys(edit, layer, run, query.device, cache)
            scale, absolute, bias, _, _ = edit.spec.tables()
            tables = {"scale": (scale - 1) * scaling, "abs": absolute * scaling, "bias": bias}
            vectors = {}
            for name, table in tables.items():
                if bool((table != 0).any()):
                    table = (table[:1] if bool((table == table[:1]).all()) else table).to(query.device)
                    vectors[name] = table[:, group].permute(1, 0, 2)[:, :, None, :]  # [B, Hq or 1, 1, m]
            if key_bias is not None:
                vectors["bias"] = vectors.get("bias", 0) + key_bias[:, None, None, :]
            cache["vectors"] = {name: v.to(query.dtype) for name, v in vectors.items()}
        extra = key.shape[2] - cache["group"].shape[1]
        vectors = {name: F.pad(v, (0, extra)) for name, v in cache["vectors"].items()}
        delta = vectors.get("bias")
        if "scale" in vectors or "abs" in vectors:
            logits = _logits(query, key)  # q . k, the scaling is folded into the vectors
            for name, term in (("scale", logits), ("abs", logits.abs())):
                if name in vectors:
                    term = term * vectors[name]
                    delta = term if delta is None else delta + term
        if delta is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)[0]
        q_len, kv_len = query.shape[2], key.shape[2]
        if attention_mask is not None:
            delta = delta.masked_fill(~_allowed(attention_mask, kv_len), torch.finfo(query.dtype).min)
        elif q_len > 1:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            delta = delta.masked_fill(~causal, torch.finfo(query.dtype).min)
        return sdpa_attention_forward(module, query, key, value, delta, scaling=scaling)[0]

    def _structured_mask(self, run: RunState, spec, key_valid, device):
        """The kernels.StructuredMask of `spec` on the current rows, built once per rows (its block lists are cached on
        it, so every layer on the same rows reuses them)."""
        kernels = _kernels()
        memory = run.memory(self)
        if "layout" not in memory:
            memory["layout"] = _position_layout(run.layout)
        rows = run.rows
        cache = memory.setdefault("structured", {})
        key = (id(rows), spec, str(device))
        entry = cache.get(key)
        if entry is None or entry[0] is not rows:
            positions = run.current_positions().to(device)
            fields = {name: at_positions(values, positions, -1 if name != "is_image" else False)
                      for name, values in memory["layout"].items()}
            fields["role"] = torch.where(positions >= 0, fields["role"], kernels.ROLE_PAD)
            valid = key_valid if key_valid is not None else torch.ones_like(fields["is_image"])
            layout = kernels.TokenLayout(is_image=fields["is_image"], valid=valid, role=fields["role"],
                                         image_id=fields["image_id"], grid_row=fields["grid_row"],
                                         grid_col=fields["grid_col"])
            entry = cache[key] = (rows, kernels.StructuredMask(layout, spec))
        return entry[1]

    def _scale(self, output: torch.Tensor, edit: KernelEdit, run: RunState, device) -> torch.Tensor:
        """output [B, q, H, d] x head_scale [B, H] on the edit's rows (every decoding row)."""
        factors = edit.head_scale.to(device=device, dtype=output.dtype)[:, None, :, None]
        if edit.rows is None or not run.prefill:
            return output * factors
        rows = at_positions(edit.rows, run.current_positions().to(device), False)
        return torch.where(rows[:, :, None, None], output * factors, output)


def _kernels():
    from . import kernels

    return kernels
