"""The engine: the small facade that wrap() / unwrap() and the fast path use. It holds a wrapped model's methods and
the per-call state (RunState) of each thread, installs the hooks, and answers the attention calls of the attention
implementation it registers.

Its pieces, each in its own module:
- hooks.py            the hooks on the model, its vision tower, text model, decoder layers and head outputs
- shrinking.py        sequence shrinking: the methods' selections, the rows each layer runs on, their positions,
                      rotary tables and masks
- attention_stats.py  the attention statistics the methods ask for (probes and requests)
- pre_rotary.py       queries and keys before rotary position, for the methods that use them
- ragged_cache.py     the per-head pruned KV cache; static_cache.py: HF's static cache under a wrapped model
- kernel_plan.py      the kernel router: every routed call, the per-head cache's included, is run and recorded there

The attention implementation delegates to SDPA, untouched, where no method acts on a layer; otherwise each call
goes through `Engine.attend`: the kernel router on CUDA (VLM_EFFICIENT_KERNELS), else the dense torch path, then the
statistics the methods asked for (only the query rows they need).

Every method decides once per generate(), at the prefill. generate(use_cache=False) feeds the whole sequence at every
step, which would re-decide each method on a different prompt: a wrapped model keeps the prefill's KV cache then and
feeds the model only the new tokens, so its tokens are those of the default, cached generate() (its memory too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import attention_stats
from .adapters import ModelAdapter, get_adapter
from .attention import edited_attention, edited_rows_attention, rows_edited
from .edits import dense_edit
from .hooks import ModelHooks
from .kernel_plan import KernelRouter
from .method import BEFORE_LLM, UNSTRUCTURED, AttentionContext, Method, PerThread, edits_attention
from .placement import head_shards
from .pre_rotary import PreRotaryCapture
from .run_state import RunState
from .shrinking import ShrunkLayerInputs, apply_selections
from .static_cache import written_keys

ATTENTION_NAME = "vlm_efficient"
ROW_EDIT_SHARE = 4  # edits on at most 1 / ROW_EDIT_SHARE of a prefill's rows: only those rows run densely

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
        attention_stats.deliver_stats(engine.probing, module.layer_idx, engine.run, query, key, attention_mask,
                                      kwargs.get("scaling"))
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    if engine.returns_weights:
        return engine.attend_with_weights(module, query, key, value, attention_mask, kwargs)
    return engine.attend(module, query, key, value, attention_mask, kwargs)


def register_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, _engine_attention)
    # Without the mask function under the same name create_causal_mask returns None and padding is ignored.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@dataclass
class _SidePass:
    run: RunState | None


class Engine:
    """Holds the methods, hooks and per-call state of one wrapped model. The per-call state is per thread: concurrent
    generate() calls of one model (a server's threads) each see their own run."""

    run: RunState | None = PerThread()  # the calling thread's current (or last) call
    probing: Method | None = PerThread()  # the method whose probe request is being computed
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
        self.hooks = ModelHooks(self)  # hooks.py; methods add theirs in bind() (add_handle, before_prefill)
        self.pre_rotary_capture = PreRotaryCapture()
        self._original_attention = self.text_config._attn_implementation
        self.fast_path = None  # vlm_efficient.fast_path.FastPath where wrap(..., fast=True)
        self.logits_processors: list = []  # the methods' (Method.logits_processors), which wrap() adds to generate()
        try:
            for method in methods:
                method.bind(self)
            self.shards = head_shards(self)  # tensor parallelism (tp_plan), or None
        except Exception:
            self.hooks.remove()  # hooks a method's bind() added before a later one refused
            raise
        self._prune_layers = {layer for m in methods for layer in m.prune_layers()}
        self._shrinks = bool(self._prune_layers)
        self.per_head_cache = any(type(m).decode_cache_keep is not Method.decode_cache_keep for m in methods)
        # methods that may edit attention beside a per-head cache: asked at its decoding calls, refused if they do
        self.decode_editors = [m.name for m in methods if self.per_head_cache and edits_attention(m)
                               and type(m).decode_cache_keep is Method.decode_cache_keep]  # fmt: skip
        renumbers_inside = any(getattr(m, "positions", "original") == "renumber" for m in methods
                               if m.prune_layers() - {BEFORE_LLM})  # fmt: skip
        self.layer_inputs = ShrunkLayerInputs(self.adapter, model, renumbers_inside)
        self.probe_layers = {
            idx for idx in range(self.num_layers)
            if any((r := m.attention_request(idx)) is not None and r.probe for m in methods)
        }  # fmt: skip
        self._acting_plain_layers = self._plain_layers()

    # what acts in the calling thread: nothing inside its plain() blocks
    @property
    def in_plain_block(self) -> bool:
        return self._plain

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

    def select_before(self, idx: int, hidden: torch.Tensor, run: RunState) -> torch.Tensor:
        """Layer idx's input rows at a prefill after the selections of the methods pruning there (the layer hook's and
        the lean prefill's one rule)."""
        if idx in self.prune_layers and run.layout.has_visual:
            return apply_selections(self.methods, idx, hidden, run)
        return hidden

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
        self.hooks.install()
        for layer in self.layers:
            _ENGINE_OF_ATTENTION[layer.self_attn] = self

    def before_prefill(self, fn) -> None:
        """Call fn(forward kwargs) before each prefill of the wrapped model (not before decode steps, not inside plain
        side passes): a method's side pass on the prompt (a probe generation, the prompt without its image). The hook
        is removed with the engine's own hooks at unwrap."""
        self.hooks.before_prefill(fn)

    def add_handle(self, handle) -> None:
        """Register a hook handle (or anything with .remove()) that a method installed in bind(): unwrap removes it,
        and so does a failed wrap."""
        self.hooks.add(handle)

    @contextlib.contextmanager
    def plain(self, run: RunState | None = None):
        """Calls of the model inside this block run as on the unwrapped model (no method acts) and leave the state of
        the call in progress untouched: side passes such as a text-only stream or a probe generation. `run`
        continues an earlier side pass; the yielded holder's `.run` is the state this block's calls left."""
        holder = _SidePass(run)
        saved = (self.run, self._plain, list(self.hooks.captured_grids))
        self.run, self._plain = run, True
        try:
            yield holder
        finally:
            holder.run = self.run
            self.run, self._plain, grids = saved
            self.hooks.captured_grids[:] = grids

    def copy_unwrapped(self, memo: dict) -> nn.Module:
        """copy.deepcopy of the model as it was before wrap(), under copy's protocol (memo): the hooks of this engine
        and of its methods are not copied, and what else they changed is undone on the copy."""
        copied = self.hooks.copy_unwrapped(memo)
        copied.set_attn_implementation({"text_config": self._original_attention})
        return copied

    def uninstall(self) -> None:
        self.hooks.remove()
        for layer in self.layers:
            _ENGINE_OF_ATTENTION.pop(layer.self_attn, None)
        self.model.set_attn_implementation({"text_config": self._original_attention})
        self.run = None

    # ---- the attention call ---------------------------------------------------------------------------------------
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
        attention_stats.after_attention(self.methods, self.run, idx, query, key, attention_mask, scaling, delivered)
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
        attention_stats.after_attention(self.methods, self.run, idx, query, key, attention_mask, scaling)
        return output, weights

    def ragged_attention(self, idx: int, query: torch.Tensor, key: torch.Tensor, scaling):
        """A decoding call of a layer on a per-head pruned cache (the cache layer already appended this step's token):
        the router's "ragged" route. Refused where a method edits the call: that route applies no edit."""
        if self.decode_editors and self.attention_edits(idx, query, key):
            raise ValueError(
                f"layer {idx} decodes on a per-head pruned KV cache (plphp:cache=ragged, kernel 4, which applies no "
                f"attention edit), and {', '.join(self.decode_editors)} edits its decoding attention. Use "
                "plphp:cache=mask (dense cache, decode mask) to combine them."
            )
        return self.router.ragged(self.run, idx, query, self.run.ragged[idx].ragged, scaling), None

    @staticmethod
    def dense_attention(module, query, key, value, attention_mask, kwargs, scaling, edits, unrotated):
        """The path with the kernels off: SDPA untouched, or the dense torch attention where `edits` edit the call."""
        if not edits:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        rows = rows_edited(edits) if query.shape[2] > 1 else None
        if rows is not None:
            width = int(rows.sum(1).max())
            if width * ROW_EDIT_SHARE <= query.shape[2]:  # a few rows edited (PAI's last row, VAF's question): SDPA
                unedited, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
                return edited_rows_attention(query, key, value, attention_mask, scaling, edits, rows, width,
                                             unedited), None  # fmt: skip
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
        """One method's AttentionEdit for this call (or None), as the dense path takes it: derived from its structured
        edit, or its attention_edit where it has none."""
        structured = method.kernel_edit(idx, self.run, context.prefill)
        if structured is UNSTRUCTURED:
            edit = method.attention_edit(idx, self.run, context)
        else:
            edit = None if structured is None else dense_edit(structured, self.run, context)
        if edit is not None and edit.allow is not None:  # added pairs never reach padding or slot-padding keys
            valid = self.run.valid_keys(context.key_positions)
            edit = dataclasses.replace(edit, allow=edit.allow & valid[:, None, None])
        return edit

    def pre_rotary(self, idx: int, query: torch.Tensor, key: torch.Tensor):
        """(query, key) before rotary position for this call of layer idx, or None (pre_rotary.py)."""
        return self.pre_rotary_capture.take(idx, query, key, self.run, self.methods)
