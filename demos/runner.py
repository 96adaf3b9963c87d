"""The demo's model side: the base model and the wrapped model answer one question side by side.

`wrap` changes a model in place, so a live run owns its model: the runner keeps a pool of copies, a request takes two
at once (base, wrapped) and each side's thread gives its copy back when it is done. Every generation thread takes
turns with all the others, one token each (`Turns`): both answers grow together, one model computes at any moment,
and each run's times count its own compute only. So two users with different methods at the same time get exactly
the answers, kept tokens and attention maps they would get alone.

Each side runs twice: `generate()` under `wrap(model, spec)` alone (the answer, times, `stats`, the kept tokens of
each layer), then one prefill with a recorder added after the methods (the sink tokens entering each layer and the
last prompt token's attention after every method's edits). The recorder edits attention, which moves every layer to
the dense fp32 path, so it stays out of the timed run.
"""

from __future__ import annotations

import collections
import copy
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from vlm_efficient import engine_of, is_wrapped, parse_methods, stats, unwrap, wrap
from vlm_efficient.heads.common import scatter_positions
from vlm_efficient.heads.var import first_token_dims, rms_normalize, sink_tokens
from vlm_efficient.method import AttentionEdit, Method
from vlm_efficient.models import build_inputs

SINK_TAU = 20.0  # VAR's threshold on |RMSNorm(h)|, the default of `vlm-efficient inspect`


class Turns:
    """A first-come first-served lock: threads that release and re-acquire it after each token take turns."""

    def __init__(self):
        self._condition = threading.Condition()
        self._waiting: collections.deque = collections.deque()

    def acquire(self) -> None:
        me = object()
        with self._condition:
            self._waiting.append(me)
            self._condition.wait_for(lambda: self._waiting[0] is me)

    def release(self) -> None:
        with self._condition:
            self._waiting.popleft()
            self._condition.notify_all()


@dataclass
class Side:
    """One side of a request (the base model: spec ""), as far as it has got. Image-token arrays list the tokens of
    the image's first grid (LLaVA-NeXT: its base view) in `cells` order."""

    spec: str
    text: str = ""
    new_tokens: int = 0
    prefill_ms: float | None = None  # time to first token: vision tower, prefill and the first token
    busy_ms: float = 0.0  # compute time so far (the clock stops while other runs have the turn)
    stats: dict | None = None  # vlm_efficient.stats(model) of the generate() call
    grid: tuple[int, int] = (0, 0)  # (rows, cols) of the image's token grid
    cells: np.ndarray | None = None  # [n, 3] (prompt position, row, col) of each image token
    kept: np.ndarray | None = None  # [layers, n] tokens each layer kept (its cached keys)
    sinks: np.ndarray | None = None  # [layers, n] sink tokens entering each layer (VAR's rule, SINK_TAU)
    attention: np.ndarray | None = None  # [layers, heads, n] the last prompt token's attention
    image_attention: np.ndarray | None = None  # [layers, heads] its attention to all image tokens
    done: bool = False

    @property
    def decode_ms(self) -> float:
        return self.busy_ms - (self.prefill_ms or 0.0)


class _Stream(BaseStreamer):
    """generate()'s streamer for one side: decodes the answer so far, times the side's own compute and passes the
    turn on after every token."""

    def __init__(self, side: Side, tokenizer, turns: Turns, notify):
        self.side, self.tokenizer, self.turns, self.notify = side, tokenizer, turns, notify
        self.tokens: list[int] | None = None  # None until generate() hands over the prompt
        self.clock = time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.side.busy_ms += (now - self.clock) * 1e3
        self.clock = now

    def put(self, value) -> None:
        if self.tokens is None:
            self.tokens = []
            return
        self._tick()
        side = self.side
        self.tokens += value.flatten().tolist()
        side.new_tokens = len(self.tokens)
        if side.prefill_ms is None:
            side.prefill_ms = side.busy_ms
        side.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        self.notify()
        self.turns.release()
        self.turns.acquire()
        self.clock = time.perf_counter()

    def end(self) -> None:
        self._tick()


@dataclass
class _Recorder(Method):
    """Observes one prefill and changes nothing: the sink tokens entering each layer (VAR's rule, as `vlm-efficient
    inspect` reports them) and the last prompt token's attention per head. It comes after the methods, and edits
    apply in order, so the attention is the one the wrapped model really used."""

    name = "demo_recorder"
    tau: float = SINK_TAU
    sinks: dict = field(default_factory=dict)  # layer -> [N] by original position
    attention: dict = field(default_factory=dict)  # layer -> [H, N] by original position (0: not in the layer)

    def observes_hidden(self, layer):
        return True

    def observe_hidden(self, layer, run, hidden):
        if run.prefill:
            normed = rms_normalize(hidden)
            valid = run.current_valid().to(normed.device)
            sinks = sink_tokens(normed, first_token_dims(normed, valid, self.tau), self.tau) & valid
            positions = run.current_positions().to(normed.device)
            self.sinks[layer] = scatter_positions(sinks, positions, run.layout.length)[0].cpu()

    def attention_edit(self, layer, run, context):
        if not context.prefill:
            return None

        def record(probs):
            last = probs[:, :, -1].float()
            self.attention[layer] = scatter_positions(last, context.key_positions, run.layout.length)[0].cpu()
            return probs

        return AttentionEdit(post_softmax=record)


@dataclass
class Request:
    """One question to both sides; `view` is the image as the model saw it (the pictures are drawn over it)."""

    view: Image.Image
    base: Side
    wrapped: Side

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.base, self.wrapped


def model_view(processor, inputs, image):
    """The image as the model saw it (resized, cropped) where the pixel values are plain images (LLaVA; LLaVA-NeXT's
    first tile is its base view), else the image itself (Qwen's flattened patches keep the aspect ratio)."""
    pixels = inputs["pixel_values"]
    pixels = pixels[:, 0] if pixels.dim() == 5 else pixels
    image_processor = getattr(processor, "image_processor", None)
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if pixels.dim() != 4 or mean is None or std is None:
        return image
    values = pixels[0].float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    array = (values.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


class DemoRunner:
    """Answers requests with a pool of `2 * concurrency` copies of `model`: `concurrency` requests run at once."""

    def __init__(self, model, processor, concurrency: int = 2):
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency}: serve at least one request at a time")
        self.concurrency = concurrency
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.config = model.config.get_text_config()
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.turns = Turns()
        self._free: queue.Queue = queue.Queue()
        self._taking = threading.Lock()
        for index in range(2 * concurrency):
            self._free.put(model if index == 0 else copy.deepcopy(model))

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def inputs(self, image, question: str, max_new_tokens: int) -> dict:
        inputs = build_inputs(self.processor, image, question, self.device, self.dtype)
        length, limit = inputs["input_ids"].shape[1], getattr(self.config, "max_position_embeddings", None)
        if limit is not None and length + max_new_tokens > limit:
            raise ValueError(
                f"the prompt is {length} tokens and {max_new_tokens} new ones are asked for; the model takes at most "
                f"{limit}: shorten the question or ask for fewer new tokens"
            )
        return dict(inputs)

    def run(self, image, question: str, spec: str, max_new_tokens: int) -> Iterator[Request]:
        """Yields the request each time either side has moved on; the last yield has both sides done. Bad input (a
        spec that does not parse or does not fit the model, a prompt too long) raises ValueError."""
        if ";" in spec:
            raise ValueError(f"{spec!r}: give one spec (join methods with '+', not ';')")
        parse_methods(spec)
        self.turns.acquire()  # the tokenizer is not used by two threads at once
        try:
            inputs = self.inputs(image, question, max_new_tokens)
        finally:
            self.turns.release()
        request = Request(model_view(self.processor, inputs, image), Side(""), Side(spec))
        events: queue.Queue = queue.Queue()
        with self._taking:  # two at once: two requests never hold one copy each and wait for each other
            models = self._free.get(), self._free.get()
        for side, model in zip(request.sides, models):
            threading.Thread(target=self._side, args=(side, model, inputs, max_new_tokens, events), daemon=True).start()
        remaining = len(request.sides)
        while remaining:
            event = events.get()
            if isinstance(event, Exception):
                raise event
            remaining -= event == "done"
            yield request

    def _side(self, side: Side, model, inputs: dict, max_new_tokens: int, events: queue.Queue) -> None:
        error = None
        self.turns.acquire()
        try:
            wrap(model, side.spec)
            streamer = _Stream(side, self.tokenizer, self.turns, lambda: events.put("token"))
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
            side.stats = stats(model).to_dict()
            run = engine_of(model).run
            side.cells, side.grid = _image_cells(run.layout)
            side.kept = np.stack([
                np.ones(len(side.cells), bool) if kept is None else np.isin(side.cells[:, 0], kept[0].cpu().numpy())
                for kept in (run.layer_positions.get(layer) for layer in range(self.num_layers))
            ])
            visual = run.layout.visual[0].cpu()
            unwrap(model)
            recorder = _Recorder()
            wrap(model, [*parse_methods(side.spec), recorder])
            with torch.inference_mode():
                model(**inputs)
            layers = range(self.num_layers)
            side.sinks = np.stack([recorder.sinks[layer][side.cells[:, 0]].numpy() for layer in layers])
            attention = torch.stack([recorder.attention[layer] for layer in layers])  # [L, H, N]
            side.attention = attention[..., side.cells[:, 0]].numpy()
            side.image_attention = attention[..., visual].sum(-1).numpy()
            side.done = True
        except Exception as caught:  # handed to the request, which raises it
            error = caught
        finally:
            if is_wrapped(model):
                unwrap(model)
            self.turns.release()
            self._free.put(model)
            events.put(error or "done")


def _image_cells(layout) -> tuple[np.ndarray, tuple[int, int]]:
    """([n, 3] (prompt position, row, col) of the first image's tokens in its first grid, (rows, cols))."""
    positions = ((layout.image_index[0] == 0) & (layout.coords[0, :, 0] == 0)).nonzero().flatten()
    cells = torch.cat([positions[:, None], layout.coords[0, positions, 1:]], dim=1).cpu().numpy()
    return cells, tuple(layout.images[0][0].grid)
