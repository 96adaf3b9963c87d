"""The method protocol: a method is a small declarative spec (a dataclass of its paper's parameters) plus the code
that applies it through a few engine callbacks. The engine composes methods; a method never touches hooks.

Callbacks (all optional; the engine only calls what a method declares):
- `attention_request(layer)`: statistics this method needs from a layer's prefill attention (which query rows, per
  head or head-averaged, the keys). The engine computes only those rows and hands them to `observe_attention`.
  A `probe` request is computed at the start of the layer, on its input, before the layer's own pruning.
- `kernel_edit(layer, run, prefill)`: a change to that layer's attention, stated ONCE, in structured form (a
  KernelEdit, per original prompt position: key groups with per (head, group) tables, a mask rule over token roles,
  per-head output factors). The attention kernels run it (vlm_efficient/kernel_plan.py composes the methods' forms
  per layer), and the engine's dense torch path runs the AttentionEdit derived from it (vlm_efficient/edits.py).
- `attention_edit(layer, run, context)`: only for a change with no structured form (kernel_edit answers
  UNSTRUCTURED): dense tensors over the current query rows and cached keys (logit scaling, |a| terms, biases,
  extra masks, added pairs, pre-rotary logits, a post-softmax function). Such a layer runs the dense path.
  `uses_unrotated(layer)` declares the layers whose edits need the pre-rotary q and k.
  Layers where no method edits stay on SDPA.
- `head_output_scale(layer, run)`: per-head factors on the attention output before o_proj (VHR-style).
- `observe_hidden(layer, run, hidden)`: the hidden states entering a layer (sink detection), when
  `observes_hidden(layer)` says so.
- `static_decode_edit(layer, run, context)`: for an unstructured decoding edit whose step-to-step changes are device
  tensors, the edit of every step of a fast-path call at once (the static decoding step runs it).
- `decode_prompt_keep(layer, run)`: the prompt keys a layer's decoding may still attend to (the fast path's static
  buffer holds only those).
- `decode_cache_keep(layer, run)`: per KV head, the prompt keys a layer keeps for decoding (PLPHP): the engine then
  keeps only those in the KV cache (a per-head ragged cache) and decodes that layer with kernel 4.
- `prune_layers()`: stages at which `select_tokens` may drop or merge tokens: decoder layer indices (at the layer's
  start, in prefill) or BEFORE_LLM (the projected visual features, before any decoder layer). The engine shrinks
  hidden states, rotary tables, masks, position ids and, through the model itself, the KV cache. A Selection that
  says how many visual rows each sample keeps (`visual_kept`, from counts the host knows) spares the host read that
  otherwise sizes the shrunk rows.
- `encoder_record()`: for a method whose hooks act on the vision side, what they keep of one image encoding, so the
  fast path may still run that encoding as a CUDA graph (EncoderRecord); None keeps such an encoding eager.
"""

from __future__ import annotations

import dataclasses
import threading
import typing
from dataclasses import dataclass
from typing import ClassVar

import torch

from .layout import at_positions  # noqa: F401 - methods import it from here

if typing.TYPE_CHECKING:
    from .run_state import RunState
    from .kernels.api import GroupSpec, MaskSpec


BEFORE_LLM = -1  # the stage before decoder layer 0: inputs_embeds with the projected visual features


class _ThreadValues(threading.local):
    def __deepcopy__(self, memo):  # a copy starts with no thread's values (a threading.local cannot be copied)
        return _ThreadValues()


class PerThread:
    """An attribute whose value belongs to the calling thread: one wrapped model serves concurrent generate() calls
    (a server's threads), so what one call keeps between hooks (the engine's run state, a method's value computed
    before the prefill, captured vision-tower outputs) must not be seen or overwritten by another. Each thread starts
    from `factory()`."""

    def __init__(self, factory=lambda: None):
        self.factory = factory

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        values = vars(_thread_values(obj))
        if self.name not in values:
            values[self.name] = self.factory()
        return values[self.name]

    def __set__(self, obj, value):
        setattr(_thread_values(obj), self.name, value)


def _thread_values(obj) -> _ThreadValues:
    values = obj.__dict__.get("_thread_values")
    # setdefault is atomic: two threads' first accesses get the same holder
    return values if values is not None else obj.__dict__.setdefault("_thread_values", _ThreadValues())


@dataclass(frozen=True)
class AttentionRequest:
    """What a method wants from a layer's prefill attention.

    queries: the rows whose attention is averaged into "received" per key: "last" (the last prompt token), "text"
    (every valid text token), "all" (every valid token), "question" (text after the last visual token), or None.
    keys: also hand over the layer's keys [B, Hkv, n, d] (after rotary). probe: compute at the layer's start, on its
    input, before the layer's pruning (PyramidDrop ranks with the attention of the layer it prunes before)."""

    queries: str | None = "last"
    per_head: bool = False
    keys: bool = False
    probe: bool = False

    def __post_init__(self):
        if self.queries not in ("last", "text", "all", "question", None):
            raise ValueError(f"unknown query selection {self.queries!r}: use last, text, all, question or None")


@dataclass
class AttentionStats:
    received: torch.Tensor | None  # [B, n_cur] or [B, Hq, n_cur]: mean attention the selected rows pay each key
    keys: torch.Tensor | None  # [B, Hkv, n_cur, d]


@dataclass
class Selection:
    """A method's decision at a stage: rows to keep [B, n_cur], and optionally new hidden states for the current rows
    (merging methods write merged features into the rows they keep)."""

    keep: torch.Tensor
    hidden: torch.Tensor | None = None
    # before the LLM only: [B, n_cur] integer keys >= 0; the text model gets the kept rows in ascending key order (ties
    # in position order) instead of position order (VisionZip's positions=renumber: dominant first, as its authors)
    order: torch.Tensor | None = None
    # for a selection that keeps every non-visual row: how many visual rows each sample keeps, known on the host, so
    # that shrinking needs no host read of the kept counts (a read waits for the GPU's queue)
    visual_kept: list[int] | None = None


@dataclass
class AttentionContext:
    """What an edit is expressed in: ORIGINAL positions of the query rows [B, q] and of the cached keys [B, kv]
    (-1 = slot padding), and whether this call is the prefill."""

    query_positions: torch.Tensor
    key_positions: torch.Tensor
    prefill: bool
    num_heads: int

    def keys_where(self, per_position: torch.Tensor) -> torch.Tensor:
        return at_positions(per_position, self.key_positions, False)

    def queries_where(self, per_position: torch.Tensor) -> torch.Tensor:
        return at_positions(per_position, self.query_positions, False)


@dataclass
class AttentionEdit:
    """A declarative change to one call of a layer's attention, what the dense path runs: derived from a method's
    KernelEdit (vlm_efficient/edits.py::dense_edit) or, for an edit with no structured form, given by its
    attention_edit. Tensors broadcast to [B, H, q, kv] (use [B, 1, 1, kv] for a
    per-key factor, [1, H, 1, 1] for a per-head one). Logits a (after scaling) become
        a * logit_scale + logit_abs * |a| + logit_bias
    then `mask` (False = blocked) is ANDed with the causal/padding mask, the softmax is taken in fp32, and
    `post_softmax(probs)` may redistribute probability mass. `rows` [B, q] limits the edit to some query rows.

    Two more fields, for the methods that change what the causal attention is rather than reweighting it:
    - `unrotated` (bool pairs): the base logit of these (query row, key) pairs is q . k * scaling of the query and
      key BEFORE rotary position (Vista-LLaMA's equal distance). The engine supplies the pre-rotary q and k (the
      method never sees them): only for layers where the method's `uses_unrotated(layer)` is True, and for cached
      keys only those of the prompt (kept from the prefill); pairs on keys of generated tokens keep the rotated logit.
    - `allow` (bool pairs): pairs ADDED to the causal/padding mask (AKI's image rows seeing the question after them).
      The engine ANDs it with the valid keys (padding and slot padding stay blocked). It can only add something in a
      call that holds future keys, i.e. the prefill: in decoding every cached key is already before the row.

    Composition over all edits of a layer, in this order: (1) base logits, unrotated where ANY edit marks the pair;
    (2) each edit's scale / |a| / bias, in the methods' order; (3) allowed = (causal & padding | any edit's `allow`)
    & every edit's `mask`: a mask removes a pair even if another edit allows it, whatever the order of the methods;
    (4) fp32 softmax; (5) each edit's `post_softmax`, in order; (6) each edit's `observe` is handed the head average of
    the probabilities the layer then uses, [B, q, kv] fp32, and changes nothing: an edit that only masks and observes
    runs on kernel 5 in the fast path's decoding step (kernels/split_decode.py, head_mean), where a post_softmax needs
    the dense attention."""

    logit_scale: torch.Tensor | None = None
    logit_abs: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    post_softmax: typing.Callable[[torch.Tensor], torch.Tensor] | None = None
    observe: typing.Callable[[torch.Tensor], None] | None = None
    rows: torch.Tensor | None = None
    allow: torch.Tensor | None = None
    unrotated: torch.Tensor | None = None
    # post_softmax treats each query row on its own (it may be given only some rows): then, where every edit of a
    # prefill call limits itself to a few `rows`, the engine computes only those rows densely and the others by SDPA
    rowwise_post: bool = False
    # the tensors post_softmax or observe changes in place from one decoding step to the next
    # (Method.static_decode_edit): the fast path puts them back after the warm-up runs and the capture of its CUDA graph
    state: tuple[torch.Tensor, ...] = ()


class _Unstructured:
    def __repr__(self) -> str:
        return "UNSTRUCTURED"


UNSTRUCTURED = _Unstructured()  # Method.kernel_edit: this edit has no structured form (the layer runs the dense path)


@dataclass
class KernelEdit:
    """A method's attention edit in structured form, the terms the attention kernels take (vlm_efficient.kernels); the
    dense path's AttentionEdit is derived from it (vlm_efficient/edits.py::dense_edit). Described per ORIGINAL prompt
    position [B, N] rather than per current row and key, so one description serves every layer's rows (pruned or not)
    and every decoding step: keys of generated tokens belong to group 0, and decoding rows are always edited.

    - `spec` + `groups` (kernel 3, group_attention): `groups` [B, N] int is each prompt position's key group, `spec` a
      kernels.GroupSpec of per (query head, group) tables: a -> a * scale + abs * |a| + bias before the softmax (plus
      `key_bias` [B, N] per key), then the exact keep / receive redistribution of the group masses, under an optional
      row condition (GroupSpec's docstring has the formulas).
    - `mask` (kernel 1, masked_attention; prefill only): a kernels.MaskSpec rule over the token roles and image grid
      of the modality layout (kernel_plan.token_roles says which prompt position has which role). Applies to every row.
    - `head_scale` [B, H]: each head's attention output multiplied by a factor: the same as multiplying the row's
      probabilities after every redistribution (VHR).
    - `rows` [B, N] bool: the prompt rows that `spec` / `head_scale` change in the prefill (None: every row).
    The engine composes one group edit, or one mask, with at most one head_scale per layer; other combinations run the
    dense path (vlm_efficient/kernel_plan.py)."""

    spec: GroupSpec | None = None
    groups: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    mask: MaskSpec | None = None
    head_scale: torch.Tensor | None = None
    rows: torch.Tensor | None = None


@dataclass(frozen=True)
class EncoderRecord:
    """What a method's hooks on the vision side keep of one image encoding, for the fast path to capture that encoding
    in a CUDA graph with the hooks acting. A replay reruns their GPU work (recorded attention, a merge) but not their
    Python, so the state they leave is taken once, after the captured call, and put back after every replay: its
    tensors live in the graph's memory, which each replay refills.

    hook_ids: the ids of the method's hooks on vision-side modules (the others still keep the encoding eager);
    clear(): forget what earlier encodings left (before the captured call); take() -> the state one encoding left;
    restore(state): make it what the calling thread's hooks left."""

    hook_ids: frozenset[int]
    clear: typing.Callable[[], None]
    take: typing.Callable[[], object]
    restore: typing.Callable[[object], None]


@dataclass
class Method:
    """Base of every intervention. Subclasses are dataclasses whose fields are the method's parameters."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    reported: ClassVar[str] = ""  # the effect its paper reports on the benchmarks it targets (evals' reports show it)
    # Its prefill edits the last prompt row only, with the edit it makes at every decoding step (the same structured
    # kernel_edit, text keys in group 0; or the same head-output scale, head_output_scale), and does nothing else
    # there: the last prompt token's row is then a first decoding step, and the fast path may run the rest of the
    # prompt as the plain model does (PAI, PAINT, AdaptVis, VHR)
    prefill_edits_last_row_as_decoding: ClassVar[bool] = False

    def bind(self, engine) -> None:
        """Validate the parameters against the wrapped model (`engine`: its vlm_efficient.engine.Engine, not imported
        here so that the engine sits above the protocol); raise ValueError with a fix on bad input."""

    def prune_layers(self) -> set[int]:
        return set()

    def attention_request(self, layer: int) -> AttentionRequest | None:
        """The statistics wanted from layer `layer`; fixed once bound (the engine plans its probes at wrap time)."""
        return None

    def observe_attention(self, layer: int, run: RunState, stats: AttentionStats) -> None:
        """Statistics over the current sequence's rows, as asked by attention_request(layer)."""

    def select_tokens(self, layer: int, run: RunState, hidden: torch.Tensor) -> torch.Tensor | Selection | None:
        """A boolean keep mask [B, n_cur] over the current rows, a Selection, or None to keep everything."""
        return None

    def attention_edit(self, layer: int, run: RunState, context: AttentionContext) -> AttentionEdit | None:
        """The edit of this call in dense form; asked only where kernel_edit answers UNSTRUCTURED."""
        return None

    def kernel_edit(self, layer: int, run: RunState, prefill: bool) -> KernelEdit | None | _Unstructured:
        """This method's edit of layer `layer`'s attention (None: no edit). The routed path asks once per layer for
        the prefill (prefill=True) and once per layer for all decoding steps (prefill=False: the answer is reused at
        every step); the dense path may ask at every call. UNSTRUCTURED (the default) says the edit has no
        structured form: the engine then calls attention_edit and runs that layer's dense path."""
        return UNSTRUCTURED

    def static_decode_edit(self, layer: int, run: RunState, context: AttentionContext) -> AttentionEdit | None:
        """For a decoding edit with no structured form that changes from step to step only through tensors it keeps
        on the device (A-VL): the edit of EVERY decoding step of a fast-path call, made once after the prefill over
        the whole static buffer (`context`: the layer's cached prompt keys, then one generated slot per step, written
        in order). The step's graph reads the same tensors at every step, so post_softmax or observe updates them in
        place (the `mask` for the next step included) and names them in AttentionEdit.state. None: the fast path refuses
        the method's decoding edits."""
        return None

    def decode_prompt_keep(self, layer: int, run: RunState) -> torch.Tensor | None:
        """bool [B, m] over the m prompt keys layer `layer` cached (run.layer_positions order): the keys its decoding
        may still attend to, or None (all). Asked after the prefill by the fast path, whose static buffer of that
        layer then holds only these (A-VL's deleted image keys are freed); the dynamic path keeps its cache."""
        return None

    def decode_cache_keep(self, layer: int, run: RunState) -> torch.Tensor | None:
        """bool [B, Hkv, m] over the m prompt keys layer `layer` cached (run.layer_positions order): the keys each KV
        head keeps for decoding, or None. Asked at the first decoding step; where a method answers, the engine stores
        that layer's cache per head (vlm_efficient/ragged_cache.py): the other keys are freed and decoding attends to
        each head's own keys (kernel 4 on CUDA)."""
        return None

    def head_output_scale(self, layer: int, run: RunState) -> torch.Tensor | None:
        """Factors [H] or [B, H] for each head's output (the o_proj input), or None."""
        return None

    def edits_head_outputs(self) -> bool:
        return False

    def uses_unrotated(self, layer: int) -> bool:
        """Whether this method's edits in `layer` mark `AttentionEdit.unrotated` pairs: the engine then captures the
        layer's pre-rotary query and key (and keeps the prompt's pre-rotary keys for decoding)."""
        return False

    def observes_hidden(self, layer: int) -> bool:
        return False

    def logits_processors(self, model) -> list:
        """Processors of generate()'s scores that this method's decoding needs beside its attention edits (PAI's
        contrastive term): the wrapped model's generate() appends them to the call's own (`logits_processor=`), and
        `vlm_efficient.logits_processors(model)` lists them. Asked once, at wrap."""
        return []

    def observe_hidden(self, layer: int, run: RunState, hidden: torch.Tensor) -> None:
        """The hidden states entering `layer` (prefill and decode), for methods that declared observes_hidden."""

    def encoder_record(self) -> EncoderRecord | None:
        """For hooks this method put on the vision side: what they keep of one encoding (EncoderRecord), where their
        work runs in a CUDA graph (no host read, fixed shapes); None (the default) keeps such an encoding eager."""
        return None

    def spec(self) -> str:
        """The spec string that rebuilds this method: `name:key=value,...`."""
        def text(value):
            return "/".join(map(str, value)) if isinstance(value, tuple) else str(value)

        params = ",".join(f"{f.name}={text(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{self.name}:{params}" if params else self.name


def edits_attention(method: Method) -> bool:
    """Whether `method` may edit attention at all (it overrides kernel_edit or attention_edit)."""
    kind = type(method)
    return kind.kernel_edit is not Method.kernel_edit or kind.attention_edit is not Method.attention_edit


def refuse_layers_with_own_mask(method: str, engine, layers, why: str) -> None:
    """ValueError where one of `layers` has a mask of its own (adapter.mask_group: Gemma3's sliding-window layers,
    whose cache keeps a window, and its image blocks), for methods whose state assumes every prompt key stays cached
    under the causal mask; `why` says what breaks."""
    for layer in layers:
        group = engine.adapter.mask_group(engine.model, layer)
        if group is not None:
            raise ValueError(
                f"{method}: layer {layer} has its own mask ({engine.model.config.model_type}: {group}; sliding layers "
                f"cache only a window of keys) and {why}: not supported on this family"
            )
