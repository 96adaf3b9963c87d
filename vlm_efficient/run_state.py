"""RunState: what the engine knows about the current generate() / forward call, which the methods and the kernel
router read (the rows, their original positions, the layout, per-run caches). Below the method protocol and the
router, so that neither imports the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import ModalityLayout


def _gather_rows(values: torch.Tensor, index: torch.Tensor, fill=0) -> torch.Tensor:
    """values [B, N, ...] gathered along dim 1 with index [B, n] (-1 -> `fill`)."""
    index = index.to(values.device)
    shape = (*index.shape, *[1] * (values.dim() - 2))
    gathered = values.gather(1, index.clamp(min=0).view(shape).expand(*index.shape, *values.shape[2:]))
    return gathered.masked_fill((index < 0).view(shape), fill)



@dataclass
class RunState:
    """What the engine knows about the current generate()/forward call.

    Rows are tracked twice: `input_positions` maps the rows the text model was given (after the BEFORE_LLM stage)
    to original positions, and `rows` maps the current rows to those input rows. Per-row tensors computed by the
    text model (rotary tables, position ids) are indexed by input rows; masks and layouts by original positions."""

    layout: ModalityLayout
    prompt_length: int
    attention_mask_2d: torch.Tensor  # [B, original length so far], True = real token
    prefill: bool = True
    fed: int = 0  # original positions seen before this call (prompt + generated tokens fed so far)
    input_positions: torch.Tensor | None = None  # [B, n_in]; None = the whole prompt
    rows: torch.Tensor | None = None  # [B, n_cur] indices into the input rows (-1 = slot padding); None = all
    aligned: bool = True  # every sample has the same number of current rows (no slot padding), known on the host
    visual_rows: list[int] | None = None  # each sample's visual rows among the current rows, on the host; None: unknown
    last_position_ids: torch.Tensor | None = None  # position ids of the last prompt token, when the input shrank
    layer_positions: dict[int, torch.Tensor | None] = field(default_factory=dict)  # cached prompt keys per layer
    tokens_per_layer: list[torch.Tensor] = field(default_factory=list)  # [B] valid rows entering each layer
    visual_per_layer: list[torch.Tensor] = field(default_factory=list)  # [B] visual rows entering each layer
    decode_steps: int = 0
    scratch: dict = field(default_factory=dict)  # per-method data for this run: see memory()
    layer_kwargs_cache: dict = field(default_factory=dict)
    pre_rotary_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # prompt keys before rotary, per layer
    counts: dict = field(default_factory=dict)  # row_counts() of the current row set
    ragged: dict = field(default_factory=dict)  # layer -> RaggedCacheLayer: the layers decoding on a per-head cache
    # positions=renumber inside the LLM: layer -> [B or 1] how far the layer's renumbered last prompt row lies before
    # the text model's position for it (its decoding positions move back as much)
    position_shift: dict = field(default_factory=dict)
    gathered: tuple = ()  # (rows, input_positions, positions): `positions` of that row set, gathered once
    # per image of the batch, the vision-tower image it repeats (generate() repeats the encoded images for beam search
    # and num_return_sequences); None: each image was encoded once
    image_sources: list[int] | None = None
    full_sequence: bool = False  # generate(use_cache=False): later calls feed the whole sequence, the cache is ours
    allocated_kv_bytes: list[int] | None = None  # per layer, where KV buffers are allocated whole (fast path, static)
    static_cache: bool = False  # the cache is HF's static one: attention calls trim its buffers (static_cache.py)

    def memory(self, owner) -> dict:
        """A method's (or adapter's) private dict for this run; keyed by identity as methods are unhashable."""
        return self.scratch.setdefault(id(owner), {})

    @property
    def input_length(self) -> int:
        return self.prompt_length if self.input_positions is None else self.input_positions.shape[1]

    @property
    def positions(self) -> torch.Tensor | None:
        """[B, n_cur] original positions of the current rows (-1 = slot padding); None = the whole prompt."""
        if self.rows is None:
            return self.input_positions
        if self.input_positions is None:
            return self.rows
        # once per row set: every layer then stores the same tensor (and shares one decoding mask, _layer_kwargs)
        if not self.gathered or self.gathered[0] is not self.rows or self.gathered[1] is not self.input_positions:
            self.gathered = (self.rows, self.input_positions, _gather_rows(self.input_positions, self.rows, fill=-1))
        return self.gathered[2]

    def enter_layer(self, idx: int) -> None:
        """The record of a prefill's layer `idx` on the current rows: the prompt keys it caches, its row counts."""
        self.layer_positions[idx] = self.positions
        tokens, visual = self.row_counts()
        self.tokens_per_layer.append(tokens)
        self.visual_per_layer.append(visual)

    def current_positions(self) -> torch.Tensor:
        positions = self.positions
        if positions is not None:
            return positions
        return torch.arange(self.prompt_length, device=self.layout.kind.device).expand(self.layout.batch_size, -1)

    def current(self, per_position: torch.Tensor, fill=0) -> torch.Tensor:
        """Gather a per-original-position tensor [B, N, ...] onto the current rows (slot padding gets `fill`)."""
        positions = self.positions
        return per_position if positions is None else _gather_rows(per_position, positions, fill)

    def current_valid(self) -> torch.Tensor:
        """[B, n_cur] rows that are real prompt tokens (not left padding, not slot padding)."""
        return self.current(self.layout.valid, fill=False)

    def row_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] real rows, [B] visual rows) of the current rows; computed once per row set, since per-layer GPU
        launches are what a pruned model's prefill spends its saved time on."""
        key = (id(self.rows), id(self.input_positions))
        if self.counts.get("key") != key:
            self.counts = {"key": key, "value": (self.current_valid().sum(1),
                                                 self.current(self.layout.visual, fill=False).sum(1))}  # fmt: skip
        return self.counts["value"]

    def attention_positions(self, layer: int, q_len: int, device, kv_len: int | None = None):
        """Original positions of this call's query rows [B, q] and of the layer's cached keys [B, kv] (the last
        kv_len of them, where given)."""
        batch = self.layout.batch_size
        if self.prefill:
            positions = self.current_positions().to(device)
            return positions, positions
        queries = torch.arange(self.fed, self.fed + q_len, device=device).expand(batch, -1)
        generated = torch.arange(self.prompt_length, self.fed + q_len, device=device).expand(batch, -1)
        keys = torch.cat([self.prompt_keys(layer, device), generated], dim=1)
        return queries, keys if kv_len is None else keys[:, -kv_len:]  # a sliding-window cache keeps the last ones

    def prompt_keys(self, layer: int, device) -> torch.Tensor:
        """[B, m] original positions of the prompt keys layer `layer` cached (-1 = slot padding)."""
        prompt = self.layer_positions.get(layer)
        if prompt is None:  # made on the device: a host-to-device copy would wait for the queue (sync_report.txt)
            return torch.arange(self.prompt_length, device=device).expand(self.layout.batch_size, -1)
        return prompt.to(device)

    def valid_keys(self, key_positions: torch.Tensor) -> torch.Tensor:
        """[B, kv]: which keys at these original positions are real tokens (not left padding, not slot padding)."""
        mask = self.attention_mask_2d.to(key_positions.device)
        return (key_positions >= 0) & mask.gather(1, key_positions.clamp(0, mask.shape[1] - 1))

    def query_rows(self, request) -> torch.Tensor:
        """Current-row indices [B, S] (-1 = unused) for a statistics request (method.AttentionRequest)."""
        valid = self.current_valid()
        if request.queries == "last":
            return torch.full((valid.shape[0], 1), valid.shape[1] - 1, device=valid.device)
        chosen = {
            "text": self.current(self.layout.text, fill=False),
            "all": valid,
            "question": self.current(self.layout.after_visual_text, fill=False),
        }[request.queries]
        width = max(int(chosen.sum(1).max()), 1)
        rows = torch.arange(chosen.shape[1], device=chosen.device).expand_as(chosen)
        order = torch.where(chosen, rows, chosen.shape[1]).sort(1).values[:, :width]
        return torch.where(order < chosen.shape[1], order, -1)
