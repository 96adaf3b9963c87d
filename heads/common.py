"""Pieces shared by the head methods: layer and head lists, query-row choices, attention redistribution, plain side
passes of a wrapped model, and the no-image version of a prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_efficient.adapters import CACHE_KWARGS, get_adapter
from vlm_efficient.method import UNSTRUCTURED, KernelEdit, Method


def example_layers(num_layers: int) -> str:
    """A valid `layers=` value for a `num_layers`-deep model, in the syntax parse_layers reads (for hints)."""
    return f"1-{num_layers - 2}/{num_layers - 1}" if num_layers >= 4 else "/".join(map(str, range(num_layers)))


def example_heads(num_layers: int, num_heads: int) -> str:
    """A valid `heads=` value (layer.head/...) for this model (for hints)."""
    return f"{num_layers // 2}.0/{num_layers - 1}.{num_heads - 1}"


def parse_layers(method: str, text: str, num_layers: int, default: range) -> tuple[int, ...]:
    """`"2-5/9"` -> (2, 3, 4, 5, 9); `""` -> the paper's default range for this model."""
    if not text:
        layers = list(default)
    else:
        layers = []
        for part in text.split("/"):
            first, dash, last = part.partition("-")
            try:
                layers.extend(range(int(first), int(last) + 1) if dash else [int(first)])
            except ValueError:
                raise ValueError(
                    f"{method}: layers={text!r}: write layer indices and ranges like {example_layers(num_layers)}"
                ) from None
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad or not layers:
        raise ValueError(
            f"{method}: layers {bad or '(none)'} are not in [0, {num_layers - 1}] for this {num_layers}-layer model"
        )
    return tuple(sorted(set(layers)))


def scaled_range(first: int, last: int, num_layers: int, paper_layers: int = 32) -> range:
    """A paper's inclusive layer range for a `paper_layers`-deep model, scaled to this depth (LLaVA-1.5-7B: 32)."""
    start = int(first * num_layers / paper_layers + 0.5)
    stop = max(start, int(last * num_layers / paper_layers + 0.5))
    return range(min(start, num_layers - 1), min(stop, num_layers - 1) + 1)


def parse_heads(method: str, text: str, num_layers: int, num_heads: int) -> dict[int, tuple[int, ...]]:
    """`"12.3/14.7"` -> {12: (3,), 14: (7,)}: heads as layer.head."""
    chosen: dict[int, set[int]] = {}
    for part in filter(None, text.split("/")):
        layer, dot, head = part.partition(".")
        try:
            layer, head = int(layer), int(head)
        except ValueError:
            raise ValueError(
                f"{method}: heads={text!r}: write heads as layer.head, e.g. {example_heads(num_layers, num_heads)}"
            ) from None
        if not dot or not 0 <= layer < num_layers or not 0 <= head < num_heads:
            raise ValueError(
                f"{method}: head {part!r} is not a layer.head of this model ({num_layers} layers, {num_heads} heads; "
                f"e.g. {example_heads(num_layers, num_heads)})"
            )
        chosen.setdefault(layer, set()).add(head)
    return {layer: tuple(sorted(heads)) for layer, heads in chosen.items()}


def head_mask(heads: tuple[int, ...], num_heads: int) -> torch.Tensor:
    """[1, H, 1, 1] boolean of the chosen heads."""
    mask = torch.zeros(num_heads, dtype=torch.bool)
    mask[list(heads)] = True
    return mask.view(1, -1, 1, 1)


def check_range(method: str, name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{method}: {name}={value} must be in [{low}, {high}]")


def has_image(run) -> bool:
    """Whether the prompt has visual tokens; read once per call (a device sync) instead of at every layer and step."""
    memory = run.memory(has_image)
    if "value" not in memory:
        memory["value"] = run.layout.has_visual
    return memory["value"]


# ---- query rows ----------------------------------------------------------------------------------------------------
def last_prompt_rows(context) -> torch.Tensor:
    """[B, q]: the last prompt row in prefill (left padding keeps it last), every row in decoding."""
    rows = torch.ones_like(context.query_positions, dtype=torch.bool)
    if context.prefill:
        rows[:, :-1] = False
    return rows


def per_run(method, run, key: str, build):
    """build() once per call (kept in the run's memory under `key`): an edit that is the same at every layer and step
    is then one object, which the fast path turns into one kernel route for all those layers."""
    memory = run.memory(method)
    if key not in memory:
        memory[key] = build()
    return memory[key]


def last_position(layout) -> torch.Tensor:
    """[B, N]: the last prompt position (left padding: every sample's last token), last_prompt_rows' prefill row per
    prompt position (kernel edits)."""
    rows = torch.zeros_like(layout.valid)
    rows[:, -1] = True
    return rows


def text_after_image(layout) -> torch.Tensor:
    """[B, N]: text positions after the sample's first visual token (the rows that can see an image)."""
    positions = torch.arange(layout.length, device=layout.kind.device)
    first = torch.where(layout.visual, positions, layout.length).amin(1)
    return layout.text & (positions[None, :] > first[:, None])


def rows_after_image(run, context) -> torch.Tensor:
    """[B, q]: text rows after the first image in prefill, every row in decoding."""
    if not context.prefill:
        return torch.ones_like(context.query_positions, dtype=torch.bool)
    return context.queries_where(text_after_image(run.layout))


def key_flags(per_position: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Per-position flags with extra leading dims [B, ..., N] gathered at key positions [B, kv] -> [B, ..., kv];
    slot padding and generated keys are False."""
    batch, length = per_position.shape[0], per_position.shape[-1]
    inside = (key_positions >= 0) & (key_positions < length)
    index = key_positions.clamp(0, length - 1).to(per_position.device)
    middle = per_position.shape[1:-1]
    index = index.view(batch, *[1] * len(middle), -1).expand(batch, *middle, -1)
    inside = inside.view(batch, *[1] * len(middle), -1).to(per_position.device)
    return per_position.gather(-1, index) & inside


def scatter_positions(values: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
    """Per-row values [B, ..., n] of rows at original positions [B, n] (-1 = slot padding) -> [B, ..., length]."""
    batch = values.shape[0]
    middle = values.shape[1:-1]
    out = values.new_zeros(batch, *middle, length + 1)
    index = torch.where(positions >= 0, positions, length).to(values.device)
    index = index.view(batch, *[1] * len(middle), -1).expand_as(values)
    return out.scatter(-1, index, values)[..., :length]


# ---- attention redistribution --------------------------------------------------------------------------------------
def redistribute(probs: torch.Tensor, source: torch.Tensor, receivers: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep `keep` of the attention on `source` keys and give the freed mass to `receivers` in proportion to their
    attention. Masks broadcast to probs [B, H, q, kv]; rows whose receivers have no attention stay as they are."""
    freed = (probs * source).sum(-1, keepdim=True) * (1.0 - keep)
    received = probs * receivers
    total = received.sum(-1, keepdim=True)
    out = torch.where(source, probs * keep, probs) + freed * received / total.clamp_min(1e-30)
    return torch.where(total > 0, out, probs)


# ---- side passes ---------------------------------------------------------------------------------------------------
def take_pending(method, run, key: str, missing: str):
    """The value `method`'s engine.before_prefill pass left in `method.pending` (a PerThread attribute: the calling
    thread's), moved into the run's memory under `key` at the first use in that run (later uses of the run read it
    there); RuntimeError(missing) when no pass ran."""
    memory = run.memory(method)
    if key not in memory:
        if method.pending is None:
            raise RuntimeError(missing)
        memory[key], method.pending = method.pending, None
    return memory[key]


def prompt_inputs(inputs: dict) -> dict:
    """A prefill's forward kwargs for a cache-free side pass over the same prompt."""
    side = {k: v for k, v in inputs.items() if k not in (*CACHE_KWARGS, "use_cache", "cache_position")}
    side["use_cache"] = False
    return side


def pad_token_id(model) -> int:
    for config in (model.generation_config, model.config.get_text_config(), model.config):
        value = getattr(config, "pad_token_id", None)
        if isinstance(value, int):
            return value
    return 0


def text_only_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
    """The prompt without its image (and video) placeholder tokens, left-padded again, with explicit position ids
    (so Qwen's cached M-RoPE deltas of the real prompt are neither used nor overwritten)."""
    adapter = get_adapter(model)
    visual = input_ids == adapter.image_token_id(model)
    video = adapter.video_token_id(model)
    if video is not None:
        visual |= input_ids == video
    keep = ~visual if attention_mask is None else attention_mask.bool() & ~visual
    lengths = keep.sum(1)
    width = max(int(lengths.max()), 1)
    ids = torch.full((input_ids.shape[0], width), pad_token_id(model), dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids)
    for b in range(ids.shape[0]):
        n = int(lengths[b])
        ids[b, width - n :] = input_ids[b][keep[b]]
        mask[b, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


# ---- masks ---------------------------------------------------------------------------------------------------------
@dataclass
class PrefillMask(Method):
    """Base of the cross-modal masks in the prefill of the chosen layers: `mask_spec(run)`, the rule as a
    kernels.MaskSpec over kernel_plan.token_roles (kernel 1; the dense path derives its mask from it), or, for a rule
    with no such form, the method's own attention_edit. Decoding rows are generated text and keep the model's own
    (causal) attention. Masks the model was not trained with cost quality: measure before relying on one."""

    layers: str = ""  # default: all layers

    def bind(self, engine) -> None:
        self.chosen = parse_layers(self.name, self.layers, engine.num_layers, range(engine.num_layers))

    def mask_spec(self, run):
        """The rule as a kernels.MaskSpec, or None where it has no such form (then attention_edit states it)."""
        return None

    def kernel_edit(self, layer, run, prefill):
        if not prefill or layer not in self.chosen or not has_image(run):
            return None
        spec = self.mask_spec(run)
        return UNSTRUCTURED if spec is None else KernelEdit(mask=spec)

