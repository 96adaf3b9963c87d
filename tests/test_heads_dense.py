"""A dense, cache-free reference forward for the head methods' tests, plus the prompt facts the formulas need,
computed from input_ids (not from the engine's layout).

`dense(model, logits=..., probs=..., masks=..., head_scale=...)` runs the UNWRAPPED model over prompt + generated
tokens with a float64 attention in which, per layer, `logits[l](scores)` changes the scaled logits [B, H, T, T],
`masks[l]` [B, T, T] blocks pairs, and `probs[l](probs)` changes the probabilities after the softmax;
`allow[l]` [B, T, T] adds pairs to the causal mask and `unrotated[l]` [B, T, T] marks pairs whose logit uses the
query and key before rotary position (undone with the layer's own cos / sin: reference.unrotate). It records
each layer's unedited probabilities (after logit changes and masks, before `probs`) and the hidden state entering
each layer. `head_scale[l]` [B, T, H] multiplies each head's output (the o_proj input)."""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import vlm_efficient as ve
from reference import attention_implementation, dense_attention, extend_inputs, unrotate
from test_engine import greedy, two_samples
from vlm_efficient.testing import FAMILIES, tiny_model

DENSE = "vlm_efficient_test_heads_dense"
_STATE: dict = {}


def _dense_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = module.layer_idx
    mask, allow, marked = (_STATE[name].get(layer) for name in ("masks", "allow", "unrotated"))
    unrotated = None
    if marked is not None:
        unrotated = (marked[:, None], *unrotate(module, query, key, _STATE["rotary"][layer]))
    out, probs, _ = dense_attention(
        query, key, value, attention_mask, scaling, logits=_STATE["logits"].get(layer),
        pairs=None if mask is None else mask[:, None], post=_STATE["probs"].get(layer), zero_blocked=True,
        allow=None if allow is None else allow[:, None], unrotated=unrotated,
    )
    _STATE["recorded"][layer] = probs
    return out, None


AttentionInterface.register(DENSE, _dense_attention)
AttentionMaskInterface.register(DENSE, sdpa_mask)


@contextlib.contextmanager
def dense(model, logits=None, probs=None, masks=None, head_scale=None, allow=None, unrotated=None):
    layers = ve.get_adapter(model).decoder_layers(model)
    hidden: dict[int, torch.Tensor] = {}
    rotary: dict[int, tuple] = {}
    _STATE.update(logits=logits or {}, probs=probs or {}, masks=masks or {}, recorded={}, hidden=hidden,
                  allow=allow or {}, unrotated=unrotated or {}, rotary=rotary)
    handles = [layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: hidden.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).detach()),
        with_kwargs=True) for i, layer in enumerate(layers)]  # fmt: skip
    handles += [layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: rotary.__setitem__(i, kwargs.get("position_embeddings")),
        with_kwargs=True) for i, layer in enumerate(layers)]  # fmt: skip
    for i, factors in (head_scale or {}).items():
        def scale(module, args, factors=factors):
            out = args[0]
            per_head = out.view(*out.shape[:-1], factors.shape[-1], -1) * factors[..., None].to(out.dtype)
            return (per_head.view_as(out),)

        handles.append(layers[i].self_attn.o_proj.register_forward_pre_hook(scale))
    try:
        with attention_implementation(model, DENSE):
            yield {"hidden": hidden, "probs": _STATE["recorded"]}
    finally:
        for handle in handles:
            handle.remove()


def live_hidden(layer: int) -> torch.Tensor:
    """Inside a dense forward: the hidden state that entered `layer` (for edits that read it, like sink detection)."""
    return _STATE["hidden"][layer]


# ---- prompt facts from input_ids ----------------------------------------------------------------------------------
class Prompt:
    """Per-position facts [B, T] of prompt + generated tokens (T = full length), from input_ids only."""

    def __init__(self, model, batch, full_length: int):
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        self.batch, self.length = ids.shape
        self.total = full_length
        image_id = ve.get_adapter(model).image_token_id(model)
        pad = torch.zeros(self.batch, full_length - self.length, dtype=torch.bool)
        visual = (ids == image_id) & mask
        positions = torch.arange(self.length)
        first = torch.where(visual, positions, self.length).amin(1, keepdim=True)
        last = torch.where(visual, positions, -1).amax(1, keepdim=True)
        text = mask & ~visual
        grow = lambda x: torch.cat([x, pad], 1)  # noqa: E731
        self.valid = torch.cat([mask, ~pad], 1)
        self.visual = grow(visual)
        self.text = grow(text)
        self.before = grow(text & (positions < first))
        self.after_first = grow(text & (positions > first))
        self.question = grow(text & (positions > last))
        self.generated = torch.cat([torch.zeros_like(mask), ~pad], 1)
        self.predicting = self.generated.clone()  # rows that predict a token: the last prompt row and generated rows
        self.predicting[:, self.length - 1] = True

    def rows_after_image(self) -> torch.Tensor:
        return self.after_first | self.generated


# ---- one generate() against its dense reference -------------------------------------------------------------------
def run_wrapped(family: str, spec, batch_fn=two_samples, **model_kw):
    model, processor = tiny_model(family, **model_kw)
    batch = batch_fn(processor)
    plain = greedy(model, batch)
    ve.wrap(model, spec)
    engine = ve.engine_of(model)
    out = greedy(model, batch)
    run, methods = engine.run, list(engine.methods)
    ve.unwrap(model)
    return model, batch, out, plain, run, methods


def reference_logits(model, batch, out, **edits) -> tuple[torch.Tensor, dict]:
    full = out.sequences[:, :-1]
    prompt = batch["input_ids"].shape[1]
    with dense(model, **edits) as recorded, torch.no_grad():
        logits = model(**extend_inputs(batch, full), use_cache=False).logits[:, prompt - 1 :]
    return logits, recorded


def assert_matches(out, reference, plain=None):
    """generate()'s logits equal the dense reference; and the method changed the model (so the test can fail)."""
    logits = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(logits, reference.to(logits.dtype), atol=1e-4, rtol=1e-4)
    if plain is not None:
        assert (logits[:, 0] - plain.logits[0]).abs().max() > 1e-3, "the method changed nothing"


def test_dense_reference_without_edits_equals_the_model():
    for family in FAMILIES[:1] + FAMILIES[2:3]:
        model, processor = tiny_model(family)
        batch = two_samples(processor)
        out = greedy(model, batch)
        reference, _ = reference_logits(model, batch, out)
        assert_matches(out, reference)
