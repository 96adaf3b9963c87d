"""PAI (Liu et al., 2024, "Paying More Attention to Image: A Training-Free Method for Alleviating Hallucination in
LVLMs").

Attention term (the `pai` method): in layers 2..L-1 (public code: range(2, 32) on LLaVA-1.5-7B), for the query row
that predicts the next token (the last prompt row in prefill, every row in decoding), all heads, the scaled logits
of image keys become a + alpha |a|, alpha = 0.2 (0.5 in later work). Other rows are untouched, as in the code.

Contrastive term (`PAIContrastive`, a LogitsProcessor that needs a second, text-only forward per step; the paper's
full method, off unless `contrastive` > 0): with log-probabilities s (with image, attention term applied) and u (the
same prompt without its image tokens, plain model), the scores are gamma (s - u) + u, gamma = `contrastive` (1.1 in
the paper and code), and tokens with s < log(`cutoff`) + max(s) are removed (cutoff 0.1). The text-only stream keeps
its own KV cache and runs with every method switched off (the public code disables its attention change for that
pass too). The wrapped model's generate() adds it (Method.logits_processors):

    model = vlm_efficient.wrap(model, "pai:alpha=0.2,contrastive=1.1")   # attention and contrastive terms
    model.generate(**inputs, do_sample=False)
    # the same by hand: wrap(model, "pai:alpha=0.2"), then
    model.generate(**inputs, logits_processor=LogitsProcessorList([PAIContrastive(model)]), do_sample=False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from vlm_efficient.adapters import cache_kwarg
from vlm_efficient.engine import plain_calls, wrapped_engine
from vlm_efficient.kernels.api import GroupSpec
from vlm_efficient.method import KernelEdit, Method, PerThread
from vlm_efficient.registry import register_method

from .common import has_image, last_position, pad_token_id, parse_layers, per_run, text_only_inputs


def pai_groups(num_heads: int, alpha: float = 0.2, image_group: int = 1, num_groups: int = 2, heads=None) -> GroupSpec:
    """PAI's term as kernel 3's tables: logits of keys in `image_group` a -> a + alpha |a| in `heads` (None: all)."""
    logit_abs = torch.zeros(num_groups)
    logit_abs[image_group] = alpha
    return GroupSpec(num_heads, num_groups, logit_abs=logit_abs).on_heads(heads)


@register_method
@dataclass
class PAI(Method):
    name = "pai"
    summary = "image-key logits a -> a + alpha|a| for the predicting row, layers 2..L-1"
    reported = "CHAIR_S / CHAIR_I down, POPE F1 up (LLaVA-1.5, MiniGPT-4, Shikra; with its contrastive term)"
    prefill_edits_last_row_as_decoding = True

    alpha: float = 0.2
    layers: str = ""  # e.g. 2-31; default 2..L-1
    contrastive: float = 0.0  # gamma of the contrastive term (the paper's full method: 1.1); 0: the attention term only
    cutoff: float = 0.1  # the contrastive term's plausibility cutoff

    def bind(self, engine) -> None:
        if self.alpha < 0:
            raise ValueError(f"pai: alpha={self.alpha} must be >= 0")
        if self.contrastive < 0 or not 0 < self.cutoff <= 1:
            raise ValueError(f"pai: contrastive={self.contrastive} must be >= 0 (0: off; the paper's 1.1) and "
                             f"cutoff={self.cutoff} in (0, 1]")
        self.chosen = parse_layers("pai", self.layers, engine.num_layers, range(2, engine.num_layers))
        self.groups = pai_groups(engine.text_config.num_attention_heads, self.alpha, image_group=1)

    def kernel_edit(self, layer, run, prefill):
        if layer not in self.chosen or not has_image(run):
            return None
        return per_run(self, run, "kernel_edit", lambda: KernelEdit(spec=self.groups, groups=run.layout.visual.long(),
                                                                   rows=last_position(run.layout)))  # fmt: skip

    def logits_processors(self, model) -> list:
        return [PAIContrastive(model, self.contrastive, self.cutoff)] if self.contrastive else []


class PAIContrastive(LogitsProcessor):
    """PAI's contrastive decoding: gamma (s - u) + u over log-probabilities, with a plausibility cutoff.

    A call that does not continue the previous call's sequence by one token starts a new text-only stream, so one
    instance can serve several generate() calls, each thread its own stream. The prompt's left padding is read off
    the pad token. On a model wrapped with fast=True the stream, after its prefill, decodes on a static step of its
    own beside the call's (FastPath.plain_stream: on CUDA a captured graph, no host work per layer)."""

    _state = PerThread()  # the calling thread's text-only stream

    def __init__(self, model, gamma: float = 1.1, cutoff: float = 0.1):
        if gamma < 0 or not 0 < cutoff <= 1:
            raise ValueError(f"PAIContrastive: gamma={gamma} must be >= 0 and cutoff={cutoff} in (0, 1]")
        self.model, self.gamma, self.log_cutoff = model, gamma, math.log(cutoff)
        self._cache_kwarg = cache_kwarg(model)  # read once: the processor runs at every decoding step

    def _text_only_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        state = self._state
        continues = (
            state is not None
            and input_ids.shape[1] == state["ids"].shape[1] + 1
            and torch.equal(input_ids[:, :-1], state["ids"])
        )
        if not continues:
            # left padding: everything before a sample's first non-pad token is padding
            prompt_mask = (input_ids != pad_token_id(self.model)).long().cummax(1).values
            inputs = text_only_inputs(self.model, input_ids, prompt_mask)
            fast_path = getattr(wrapped_engine(self.model), "fast_path", None)
            if fast_path is not None and fast_path.in_call:
                logits, step = fast_path.plain_stream(inputs)
                self._state = {"step": step, "ids": input_ids}
                return logits.log_softmax(-1)
            state = self._state = {"run": None, "cache": None, "mask": inputs["attention_mask"]}
            kwargs = inputs
        elif "step" in state:
            step = state["step"]
            with plain_calls(self.model):
                step.tokens.copy_(input_ids[:, -1:])
                step.run()
            state["ids"] = input_ids
            return step.logits.log_softmax(-1)
        else:
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(input_ids.shape[0], 1)], dim=1)
            positions = state["mask"].sum(1, keepdim=True) - 1
            kwargs = {"input_ids": input_ids[:, -1:], "attention_mask": state["mask"], "position_ids": positions}
        with plain_calls(self.model, state["run"]) as side:
            out = self.model(**kwargs, **{self._cache_kwarg: state["cache"]}, use_cache=True)
        state.update(run=side.run, cache=getattr(out, self._cache_kwarg), ids=input_ids)
        return out.logits[:, -1].float().log_softmax(-1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        with torch.no_grad():
            unconditional = self._text_only_logits(input_ids)
        conditional = scores.float().log_softmax(-1)
        out = self.gamma * (conditional - unconditional) + unconditional
        cutoff = self.log_cutoff + conditional.max(-1, keepdim=True).values
        return out.masked_fill(conditional < cutoff, -float("inf")).to(scores.dtype)
