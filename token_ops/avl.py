"""A-VL (Zhang et al., AAAI 2025, "A-VL: Adaptive Attention for Large Vision-Language Models").

Decoding attends to a part of each cache, per modality, per layer:
- visual cache: at prefill the last prompt token's attention in each layer (head average) splits the image tokens
  into core (top 1 - `compute`), secondary (top 1 - `rate`) and minor (the rest, deleted). Decoding steps attend to
  the core only; every `interval` steps a step attends to the whole secondary set and picks the new core from its own
  attention (the core drifts).
- text cache (H2O-style locality): a budget of (1 - `text_rate`) of the text keys; half of it goes to the most recent
  text keys, the rest to the heaviest accumulated attention; evicted keys never return. H2O accumulates attention over
  every query row; here over the last prompt row and every decoding row (the rows the engine computes anyway).
- the optional prefill filter of the paper (drop P% of image tokens after layer 2) is FastV: compose "fastv+avl".

The edit masks keys and observes the step's head-averaged attention (AttentionEdit.observe); the update is
kernels/key_sets.py's torch form. On the fast path (wrap(..., fast=True)) the same state lives on the device over the
static buffer and a captured step updates it (static_decode_edit): no host decision per step, and on the GPU each
edited layer runs kernel 5 with the head-averaged probabilities and kernel 6 (the whole update in one launch)
instead of the dense attention and some fifty small operators. Each layer's choices are made in one batch at the
first decoding step (_states), not during the prefill.

The public code's flags (vision_adaptive_attention_rate, _compute_rate, _update_interval, text_pruning_rate) match
`rate`, `compute`, `interval`, `text_rate`; the values here are its README's examples. On the dynamic path deleted and
non-core keys are masked, not freed. On the fast path the deleted image keys are left out of each layer's static
buffer (decode_prompt_keep); non-core and evicted keys stay masked (they may return, or are evicted step by step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlm_efficient.method import (UNSTRUCTURED, AttentionEdit, AttentionRequest, Method, at_positions,
                                  refuse_layers_with_own_mask)
from vlm_efficient.registry import register_method
from vlm_efficient.kernels import api as kernels
from vlm_efficient.kernels import key_sets
from vlm_efficient.selection import keep_count, top_k_mask


@register_method
@dataclass
class AVL(Method):
    name = "avl"
    summary = "decode: attend to the core of the visual cache (re-picked every few steps) and to local text"

    rate: float = 0.5
    compute: float = 0.7
    interval: int = 3
    text_rate: float = 0.3

    record_masks: ClassVar[bool] = False  # tests: keep every step's decode mask in run.memory(self)["masks"]

    def bind(self, engine) -> None:
        if not 0 <= self.rate <= self.compute < 1:
            raise ValueError("avl: need 0 <= rate <= compute < 1 (deleted share <= share left out of computation)")
        if self.interval < 1 or not 0 <= self.text_rate < 1:
            raise ValueError("avl: interval must be >= 1 and text_rate in [0, 1)")
        refuse_layers_with_own_mask("avl", engine, range(engine.num_layers),
                                    "avl keeps per-key states over every prompt key while decoding")  # fmt: skip

    def attention_request(self, layer: int) -> AttentionRequest | None:
        return AttentionRequest(queries="last")

    def kernel_edit(self, layer, run, prefill):
        return None if prefill else UNSTRUCTURED  # the prefill is not edited; decoding masks change per step

    def observe_attention(self, layer, run, stats) -> None:
        # The choices act in decoding only: each layer's statistics wait, and _states() makes every layer's core and
        # secondary sets in one batch (two top-k selections per layer are host work that a batch-1 prefill pays)
        rows = (id(run.rows), id(run.input_positions))  # the row set: layers on the same rows stack
        pending = run.memory(self).setdefault("pending", {})
        if rows not in pending:
            pending[rows] = {"positions": run.current_positions(), "visual": run.current(run.layout.visual, fill=False),
                             "text": run.current(run.layout.text, fill=False), "received": {}}  # fmt: skip
        pending[rows]["received"][layer] = stats.received

    def _states(self, run) -> dict:
        """run.memory(self): {layer: its decoding state} for every observed layer, the pending ones made now: the
        secondary and core image keys by the last prompt row's attention, the text keys' H2O scores."""
        memory = run.memory(self)
        for group in memory.pop("pending", {}).values():
            received = torch.stack(list(group["received"].values())).float()  # [L, B, n]
            layers, batch, n = received.shape
            positions = group["positions"].to(received.device)
            visual, text = group["visual"].to(received.device), group["text"].to(received.device)
            count = visual.sum(1).repeat(layers)
            flat, candidates = received.view(layers * batch, n), visual.repeat(layers, 1)
            secondary = top_k_mask(flat, candidates, keep_count(count, self.rate)).view(layers, batch, n)
            core = top_k_mask(flat, candidates, keep_count(count, self.compute)).view(layers, batch, n)
            score = torch.where(text, received, 0.0)
            for index, layer in enumerate(group["received"]):
                memory[layer] = {"positions": positions, "secondary": secondary[index], "core": core[index],
                                 "score": score[index], "text": text, "visual": visual,
                                 "evicted": torch.zeros_like(text)}  # fmt: skip
        return memory

    def _extend(self, state, keys: torch.Tensor, run) -> None:
        """Append the generated tokens that joined the cache since the last step: state columns = cache columns."""
        new = keys[:, state["positions"].shape[1] :]
        if new.shape[1] == 0:
            return
        no = torch.zeros_like(new, dtype=torch.bool)
        valid = run.attention_mask_2d.to(new.device).gather(1, new)
        state["positions"] = torch.cat([state["positions"], new], 1)
        for name, extra in (("secondary", no), ("core", no), ("evicted", no), ("text", valid), ("visual", no)):
            state[name] = torch.cat([state[name], extra], 1)
        state["score"] = torch.cat([state["score"], torch.zeros_like(new, dtype=state["score"].dtype)], 1)

    def attention_edit(self, layer, run, context):
        if context.prefill:
            return None
        memory = self._states(run)
        if layer not in memory or not run.layout.has_visual:
            return None
        state = memory[layer]
        keys = context.key_positions
        self._extend(state, keys, run)
        update = run.decode_steps % self.interval == 0
        visual = context.keys_where(run.layout.visual)
        allowed = key_sets.allowed_keys(state["secondary"], state["core"], state["evicted"], visual, update)
        if self.record_masks:
            memory.setdefault("masks", {}).setdefault(layer, []).append((keys.clone(), allowed.clone()))

        def observe(attention):  # the step's head-averaged probabilities [B, 1, kv]
            key_sets.update_reference(attention[:, -1], state["secondary"], state["core"], state["score"],
                                      state["evicted"], state["text"], update, self.text_rate)  # fmt: skip

        return AttentionEdit(mask=allowed[:, None, None, :], observe=observe)

    def decode_prompt_keep(self, layer, run):
        """The minor image keys (outside the secondary set) are deleted: never attended again."""
        state = self._states(run).get(layer)
        return None if state is None or not run.layout.has_visual else ~state["visual"] | state["secondary"]

    def static_decode_edit(self, layer, run, context):
        """Every step of a fast-path call (Method.static_decode_edit): the state over the whole static buffer (the
        prompt keys the layer keeps, decode_prompt_keep, then the generated slots, written one per step), a
        device-side step counter for the core's update, and the mask rewritten in place for the next step: the same
        update as attention_edit's, in one launch per layer and step on the GPU (kernels/key_sets.py). The edit only
        masks and observes, so the step runs the layer on kernel 5 with its head-averaged probabilities."""
        memory = self._states(run)
        if layer not in memory or not run.layout.has_visual:
            return None
        prompt, keys = memory[layer], context.key_positions
        length = run.prompt_length

        def on_buffer(name):  # the state's columns (the layer's cached keys) at the buffer's keys, by position
            values, positions = prompt[name].to(keys.device), prompt["positions"].to(keys.device)
            by_position = values.new_zeros(values.shape[0], length + 1)  # the last column takes slot padding
            by_position.scatter_(1, torch.where(positions >= 0, positions, length), values)
            return at_positions(by_position[:, :length], keys, False if values.dtype == torch.bool else 0.0)

        secondary, core, score, evicted, prompt_text = (on_buffer(name) for name in
                                                        ("secondary", "core", "score", "evicted", "text"))
        step = torch.ones(1, dtype=torch.long, device=keys.device)  # run.decode_steps, on the device
        visual = context.keys_where(run.layout.visual)
        mask = key_sets.allowed_keys(secondary, core, evicted, visual, step % self.interval == 0)
        budgets = key_sets.text_budget(torch.arange(keys.shape[1] + 1, device=keys.device), self.text_rate)

        def observe(attention):  # [B, 1, kv]
            kernels.key_sets_step(attention[:, -1], secondary, core, score, evicted, prompt_text, visual, keys, mask,
                                  step, length=length, interval=self.interval, text_rate=self.text_rate,
                                  budgets=budgets)  # fmt: skip
            step.add_(1)

        return AttentionEdit(mask=mask[:, None, None, :], observe=observe,
                             state=(mask, step, secondary, core, score, evicted))

