"""Shared checks for the token_ops tests (test_token_ops_*.py): decoding with the method's cache against a dense
cache-free reference, and a padded batch against each sample alone.

The reference (tests/reference.py) masks, per layer, the keys the pruned model no longer holds; a method may add
per-row or per-head masks (logit functions) and hidden-state overrides for rows that carry merged features."""

from __future__ import annotations

import contextlib

import torch

import vlm_efficient as ve
from reference import extend_inputs, kept_key_masks, masked_reference
from test_engine import NEW_TOKENS, greedy, two_samples
from vlm_efficient.testing import image_placeholder, tiny_batch, tiny_image, tiny_model

ATOL = 1e-4


def num_layers(model) -> int:
    return len(ve.get_adapter(model).decoder_layers(model))


@contextlib.contextmanager
def hidden_overrides(model, overrides: dict[int, list]):
    """Replace rows of the hidden states entering decoder layers: {layer: [(sample, position, value [d])]}."""
    layers = ve.get_adapter(model).decoder_layers(model)

    def hook(layer):
        def pre(module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            for b, position, value in overrides[layer]:
                hidden[b, position] = value.to(hidden.dtype)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return pre

    handles = [layers[l].register_forward_pre_hook(hook(l), with_kwargs=True) for l in overrides]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_entering(model, layers):
    """The hidden states entering `layers` on their first call (the prefill), as the wrapped model passes them."""
    seen = {}
    decoder = ve.get_adapter(model).decoder_layers(model)

    def hook(layer):
        def pre(module, args, kwargs):
            seen.setdefault(layer, (args[0] if args else kwargs["hidden_states"]).detach().clone())

        return pre

    handles = [decoder[l].register_forward_pre_hook(hook(l), with_kwargs=True) for l in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def generate_and_reference(model, batch, methods, extra=None, **generate_kwargs):
    """Generate with `methods`, then the dense cache-free reference over prompt + generated tokens.

    `extra(run, methods, total_length)` returns (key_masks, logit_fns, overrides) to add to the reference: per-layer
    masks [B, kv] or [B, q, kv] (ANDed with the kept keys), logit functions on [B, H, q, kv] scores, and
    hidden_overrides entries. Returns (generated logits [B, steps, V], reference logits, run, methods)."""
    ve.wrap(model, methods)
    with capture_entering(model, range(num_layers(model))) as entering:
        out = greedy(model, batch, **generate_kwargs)
    engine = ve.engine_of(model)
    engine.run.scratch["test_entering"] = entering
    run, methods = engine.run, engine.methods
    ve.unwrap(model)
    full = out.sequences[:, :-1]
    masks = kept_key_masks(run, full.shape[1], num_layers(model))
    logit_fns, overrides = {}, {}
    if extra is not None:
        more, logit_fns, overrides = extra(run, methods, full.shape[1])
        for layer, mask in more.items():
            base = masks.get(layer)
            if base is None:
                masks[layer] = mask
            else:
                masks[layer] = (base[:, None, :] & mask) if mask.dim() == 3 else base & mask
    prompt = batch["input_ids"].shape[1]
    with masked_reference(model, masks, logit_fns), hidden_overrides(model, overrides), torch.no_grad():
        reference = model(**extend_inputs(batch, full), use_cache=False).logits[:, prompt - 1 :]
    return torch.stack(out.logits, dim=1), reference, run, methods


def assert_close_logits(logits, reference):
    valid = torch.isfinite(logits)
    torch.testing.assert_close(logits[valid], reference[valid], atol=ATOL, rtol=ATOL)
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def check_generate(family, methods, extra=None, model_kwargs=None):
    model, processor = tiny_model(family, **(model_kwargs or {}))
    batch = two_samples(processor)
    logits, reference, run, methods = generate_and_reference(model, batch, methods, extra)
    assert_close_logits(logits, reference)
    return run, methods


def check_batched_equals_alone(family, methods):
    """A left-padded batch (one image / two images) gives each sample the logits it gets alone."""
    model, processor = tiny_model(family)
    ph = image_placeholder(processor)
    samples = [
        (f"what is {ph} this", [tiny_image(0)]),
        (f"a much longer prompt with {ph} and then {ph} compare them", [tiny_image(1), tiny_image(2)]),
    ]
    ve.wrap(model, methods)
    try:
        together = torch.stack(greedy(model, tiny_batch(processor, samples)).logits, 1)
        for b, sample in enumerate(samples):
            alone = torch.stack(greedy(model, tiny_batch(processor, [sample])).logits, 1)
            torch.testing.assert_close(together[b], alone[0], atol=ATOL, rtol=ATOL)
    finally:
        ve.unwrap(model)


def recorded_probs(model, batch, key_masks=None, logit_fns=None, overrides=None):
    """Per layer, the dense reference's attention probabilities [B, H, N, N] (float64) and keys on `batch`."""
    with masked_reference(model, key_masks or {}, logit_fns) as recorded, hidden_overrides(model, overrides or {}):
        with torch.no_grad():
            model(**batch, use_cache=False)
        return {layer: dict(values) for layer, values in recorded.items()}


__all__ = [
    "NEW_TOKENS",
    "assert_close_logits",
    "capture_entering",
    "check_batched_equals_alone",
    "check_generate",
    "generate_and_reference",
    "hidden_overrides",
    "num_layers",
    "recorded_probs",
    "two_samples",
]


def checking_host_counts(monkeypatch) -> list[bool]:
    """Patch the pruning step's row alignment to check every kept count the host gives against the keep's own; the
    list returned records, per alignment, whether the host gave them."""
    from vlm_efficient import shrinking

    given, plain = [], shrinking.left_aligned_index

    def checked(keep, host_counts=None):
        given.append(host_counts is not None)
        if host_counts is not None:
            assert host_counts == keep.sum(1).tolist()
        return plain(keep, host_counts)

    monkeypatch.setattr(shrinking, "left_aligned_index", checked)
    return given
