"""Reliability of the engine: concurrent generate() calls on one wrapped model, generate()'s batch expansion (beam
search, num_return_sequences), use_cache=False, copies, and clear refusals (output_attentions, labels with pruning,
a model without an LM head). Bounded in count; no wall-clock assertion."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import vlm_efficient as ve
from reference import extend_inputs, masked_reference
from vlm_efficient.testing import FAMILIES, image_placeholder, tiny_batch, tiny_image, tiny_model

NEW_TOKENS = 4
FASTV = "fastv:layer=2,ratio=0.5"


def prompts(processor):
    """Two different batches (lengths, images, padding) for the clients to alternate between."""
    ph = image_placeholder(processor)
    return [
        tiny_batch(processor, [(f"what is {ph} this", [tiny_image(0)])]),
        tiny_batch(
            processor,
            [
                (f"a much longer prompt with {ph} and then more words", [tiny_image(1)]),
                (f"short {ph} one", [tiny_image(2)]),
            ],
        ),
    ]


def generate(model, batch, **kw):
    kw = {"do_sample": False, "max_new_tokens": NEW_TOKENS, **kw}
    with torch.no_grad():
        return model.generate(**batch, **kw)


def run_clients(clients, trials: int):
    """Each client (a function of the trial number returning None or an error message) runs `trials` times in its own
    thread, all threads at once; returns the errors and failures."""
    problems: list[str] = []
    start = threading.Barrier(len(clients))

    def body(client):
        start.wait()
        for trial in range(trials):
            try:
                problem = client(trial)
            except Exception as error:  # noqa: BLE001 - every failure is reported, none is swallowed
                problem = f"{type(error).__name__}: {error}"
            if problem:
                problems.append(problem)

    threads = [threading.Thread(target=body, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a client thread hangs"
    return problems


# ---- threads -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("spec", [FASTV, "visionzip:ratio=0.5", "pai", f"{FASTV}+vhr"])
def test_threads_on_one_wrapped_model_get_their_sequential_answers(family, spec):
    model, processor = tiny_model(family)
    batches = prompts(processor)
    ve.wrap(model, spec)
    expected, expected_stats = [], []
    for batch in batches:
        expected.append(generate(model, batch))
        expected_stats.append(ve.stats(model))

    def client(k):
        def one(trial):
            index = (k + trial) % len(batches)
            out = generate(model, batches[index])
            stats = ve.stats(model)  # this thread's last call
            if not torch.equal(out, expected[index]):
                return f"client {k} trial {trial}: tokens differ from the sequential run"
            if stats.tokens_per_layer != expected_stats[index].tokens_per_layer:
                return f"client {k} trial {trial}: stats {stats.tokens_per_layer} != {expected_stats[index]}"
            return None

        return one

    assert run_clients([client(k) for k in range(4)], trials=3) == []
    assert len(ve.stats(model).tokens_per_layer) == len(model.model.language_model.layers)


def test_threads_on_copies_with_different_methods():
    """The server pattern with one method per client: each thread its own wrapped copy (copy.deepcopy of a wrapped
    model), all at once, each equal to its sequential result; the original is unchanged."""
    model, processor = tiny_model("qwen2_5_vl")
    batches = prompts(processor)
    ve.wrap(model, FASTV)
    original = [generate(model, batch) for batch in batches]
    specs = ["visionzip:ratio=0.5", "pai", f"{FASTV}+pai", "vhr"]
    copies = []
    for spec in specs:
        copied = copy.deepcopy(model)
        ve.unwrap(copied)
        copies.append(ve.wrap(copied, spec))
    expected = [[generate(copied, batch) for batch in batches] for copied in copies]

    def client(k):
        def one(trial):
            index = (k + trial) % len(batches)
            if not torch.equal(generate(copies[k], batches[index]), expected[k][index]):
                return f"{specs[k]} trial {trial}: tokens differ from the sequential run"
            return None

        return one

    assert run_clients([client(k) for k in range(4)] + [client_of(model, batches, original)], trials=3) == []


def test_threads_share_one_pai_contrastive_processor():
    """PAI's contrastive decoding keeps a text-only stream between steps: one processor instance serves every thread,
    each with its own stream."""
    from vlm_efficient.heads.pai import PAIContrastive

    model, processor = tiny_model("llava")
    batches = prompts(processor)
    ve.wrap(model, "pai")
    contrastive = PAIContrastive(model)
    expected = [generate(model, batch, logits_processor=[contrastive]) for batch in batches]

    def client(k):
        def one(trial):
            index = (k + trial) % len(batches)
            out = generate(model, batches[index], logits_processor=[contrastive])
            return None if torch.equal(out, expected[index]) else f"client {k} trial {trial}: tokens differ"

        return one

    assert run_clients([client(k) for k in range(4)], trials=2) == []


def client_of(model, batches, expected):
    def one(trial):
        index = trial % len(batches)
        return None if torch.equal(generate(model, batches[index]), expected[index]) else "the original model differs"

    return one


# ---- deepcopy ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava_next", "qwen3_vl"])
def test_deepcopy_is_an_independently_wrapped_copy(family):
    model, processor = tiny_model(family)
    batch = prompts(processor)[1]
    base = generate(model, batch)
    spec = f"{FASTV}+visionzip:ratio=0.5"
    ve.wrap(model, spec)
    pruned = generate(model, batch)
    assert not torch.equal(pruned, base) or ve.stats(model).average_tokens < ve.stats(model).tokens_per_layer[0]
    copied = copy.deepcopy(model)
    assert ve.is_wrapped(copied) and ve.engine_of(copied) is not ve.engine_of(model)
    assert ve.to_spec(ve.engine_of(copied).methods) == ve.to_spec(ve.engine_of(model).methods)
    assert torch.equal(generate(copied, batch), pruned)
    assert ve.stats(copied).tokens_per_layer == ve.stats(model).tokens_per_layer
    ve.unwrap(model)  # the copy stays wrapped, the original is restored
    assert torch.equal(generate(model, batch), base)
    assert torch.equal(generate(copied, batch), pruned)
    ve.unwrap(copied)
    assert copied.config.get_text_config()._attn_implementation == "sdpa"
    assert copied.config.vision_config._attn_implementation == "sdpa"
    assert not copied._forward_pre_hooks and not copied._forward_hooks
    assert torch.equal(generate(copied, batch), base)


# ---- generate()'s batch expansion and use_cache=False --------------------------------------------------------------
@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


EXPANSIONS = [
    dict(num_beams=2),
    dict(num_beams=2, num_return_sequences=2),
    dict(do_sample=True, num_return_sequences=2),
    dict(use_cache=False),
]


def test_noop_wrap_equals_the_unwrapped_model_under_expansion_and_no_cache(family):
    model, processor = tiny_model(family)
    batch = prompts(processor)[1]
    for kw in EXPANSIONS:
        torch.manual_seed(0)
        expected = generate(model, batch, **kw)
        ve.wrap(model, "")
        torch.manual_seed(0)
        assert torch.equal(generate(model, batch, **kw), expected), kw
        ve.unwrap(model)


def reference_log_probs(model, batch, sequences, kept, layer):
    """[R, T] log-probabilities of each generated token of `sequences` (R rows; row r repeats sample r // (R / B)) under
    one cache-free forward of the unwrapped model in which layers >= `layer` cannot see the pruned image tokens."""
    repeat = sequences.shape[0] // batch["input_ids"].shape[0]
    expanded = {k: v.repeat_interleave(repeat, 0) if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                for k, v in batch.items()}  # fmt: skip
    if "image_grid_thw" not in batch:  # LLaVA: one pixel tensor per sample (images of a sample are consecutive)
        expanded["pixel_values"] = batch["pixel_values"].repeat_interleave(repeat, 0)
        if "image_sizes" in batch:
            expanded["image_sizes"] = batch["image_sizes"].repeat_interleave(repeat, 0)
    else:  # Qwen: the patches of each sample's images, repeated sample by sample
        grids = batch["image_grid_thw"]
        patches = list(torch.split(batch["pixel_values"], grids.prod(-1).tolist()))
        expanded["pixel_values"] = torch.cat([p for p in patches for _ in range(repeat)])
        expanded["image_grid_thw"] = grids.repeat_interleave(repeat, 0)
    prompt = batch["input_ids"].shape[1]
    full = sequences[:, :-1]
    allowed = torch.zeros(full.shape, dtype=torch.bool)
    allowed[:, prompt:] = True
    for r in range(full.shape[0]):
        allowed[r, kept[r][kept[r] >= 0]] = True
    key_masks = {i: allowed for i in range(layer, len(model.model.language_model.layers))}
    with masked_reference(model, key_masks), torch.no_grad():
        logits = model(**extend_inputs(expanded, full), use_cache=False).logits[:, prompt - 1 :]
    return logits.double().log_softmax(-1).gather(-1, sequences[:, prompt:, None])[..., 0]


def test_fastv_beam_search_scores_equal_the_reference(family):
    """Beam search with FastV (2 beams, both returned): each returned sequence's score is the sum of its tokens'
    log-probabilities (length_penalty=0) under the cache-free pruned reference."""
    model, processor = tiny_model(family)
    batch = prompts(processor)[1]
    ve.wrap(model, FASTV)
    out = generate(model, batch, num_beams=2, num_return_sequences=2, length_penalty=0.0,
                   return_dict_in_generate=True, output_scores=True)  # fmt: skip
    kept = ve.engine_of(model).run.layer_positions[2]
    ve.unwrap(model)
    log_probs = reference_log_probs(model, batch, out.sequences, kept, layer=2)
    eos = model.generation_config.eos_token_id
    generated = out.sequences[:, batch["input_ids"].shape[1] :]
    # tokens after a sequence's end are padding, not scored
    ended = (generated == eos).long().cumsum(1) - (generated == eos).long() > 0
    expected = log_probs.masked_fill(ended, 0).sum(1)
    torch.testing.assert_close(out.sequences_scores.double(), expected, atol=1e-3, rtol=1e-4)


def test_fastv_sampled_return_sequences_equal_the_reference(family):
    model, processor = tiny_model(family)
    batch = prompts(processor)[1]
    ve.wrap(model, FASTV)
    torch.manual_seed(0)
    out = generate(model, batch, do_sample=True, top_k=0, num_return_sequences=2, return_dict_in_generate=True,
                   output_logits=True)  # fmt: skip
    kept = ve.engine_of(model).run.layer_positions[2]
    assert kept.shape[0] == 4 and torch.equal(kept[0], kept[1]) and torch.equal(kept[2], kept[3])
    ve.unwrap(model)
    log_probs = reference_log_probs(model, batch, out.sequences, kept, layer=2)
    logits = torch.stack(out.logits, 1).double().log_softmax(-1)
    got = logits.gather(-1, out.sequences[:, batch["input_ids"].shape[1] :, None])[..., 0]
    torch.testing.assert_close(got, log_probs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", [FASTV, "visionzip:ratio=0.5+pai"])
def test_use_cache_false_keeps_the_prefill_decision(family, spec):
    """generate(use_cache=False) gives the tokens of the cached generate(): the prefill's pruning is kept."""
    model, processor = tiny_model(family)
    ve.wrap(model, spec)
    for batch in prompts(processor):
        cached = generate(model, batch)
        stats = ve.stats(model)
        assert torch.equal(generate(model, batch, use_cache=False), cached)
        assert ve.stats(model).tokens_per_layer == stats.tokens_per_layer
        assert ve.stats(model).decode_steps == NEW_TOKENS - 1
        assert torch.equal(generate(model, batch, num_beams=2, use_cache=False), generate(model, batch, num_beams=2))


# ---- clear refusals ------------------------------------------------------------------------------------------------
def test_output_attentions_returns_the_edited_attentions(family):
    """No-op wrap: the eager model's attentions. FastV: layers before K the eager ones, pruned layers the reference's
    (pruned keys masked) at the kept rows and keys. PAI: edited from its first layer on. Decoding: the kept keys."""
    model, processor = tiny_model(family, attn_implementation="eager")
    batch = prompts(processor)[1]
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        eager = model(**batch, output_attentions=True).attentions
    model.set_attn_implementation({"text_config": "sdpa"})

    def close(got, want, rows):  # over the real query rows
        torch.testing.assert_close(got.double()[rows], want.double()[rows], atol=1e-5, rtol=1e-4)

    def rows_of(b_rows):  # [B, q] -> index of [B, H, q, kv] entries on real rows
        return b_rows[:, None, :, None].expand(-1, eager[0].shape[1], -1, -1)

    ve.wrap(model, "")
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    for got, want in zip(attentions, eager, strict=True):
        mask = rows_of(valid).expand(-1, -1, -1, want.shape[-1])
        close(got, want, mask)
    ve.unwrap(model)

    ve.wrap(model, "pai")
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    for layer, (got, want) in enumerate(zip(attentions, eager, strict=True)):
        mask = rows_of(valid).expand(-1, -1, -1, want.shape[-1])
        if layer < 2:
            close(got, want, mask)
        else:
            assert not torch.allclose(got[:, :, -1], want[:, :, -1], atol=1e-3), layer
    ve.unwrap(model)

    ve.wrap(model, FASTV)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    run = ve.engine_of(model).run
    kept = run.layer_positions[2]
    ve.unwrap(model)
    allowed = torch.zeros(valid.shape, dtype=torch.bool)
    for b in range(valid.shape[0]):
        allowed[b, kept[b][kept[b] >= 0]] = True
    with masked_reference(model, {i: allowed for i in range(2, 4)}) as recorded, torch.no_grad():
        model(**batch, use_cache=False)
    for layer, got in enumerate(attentions):
        if layer < 2:
            close(got, eager[layer], rows_of(valid).expand(-1, -1, -1, valid.shape[1]))
            continue
        positions = kept.clamp(min=0)
        want = recorded[layer]["probs"]
        want = want.gather(2, positions[:, None, :, None].expand(-1, want.shape[1], -1, want.shape[3]))
        want = want.gather(3, positions[:, None, None, :].expand(-1, want.shape[1], want.shape[2], -1))
        real = (kept >= 0) & valid.gather(1, positions)
        close(got, want, rows_of(real).expand(-1, -1, -1, kept.shape[1]))

    ve.wrap(model, FASTV)
    out = generate(model, batch, output_attentions=True, return_dict_in_generate=True)
    step = out.attentions[1]  # the first decoding step: one row over the layer's cached keys and the new one
    assert [a.shape[-1] for a in step] == [valid.shape[1] + 1] * 2 + [kept.shape[1] + 1] * 2
    assert all(a.shape[-2] == 1 for a in step)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_wrap_without_lm_head_names_the_class_to_use(family):
    model, _ = tiny_model(family)
    name = type(model.model).__name__
    with pytest.raises(ValueError, match=f"{name} has no language-model head: wrap the .*ForConditionalGeneration"):
        ve.wrap(model.model, FASTV)
    assert not ve.is_wrapped(model.model)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_labels(family):
    """Without pruning the loss is the unwrapped model's; with pruning it is refused, naming the pruning method.

    PAI edits only the last prompt row (the first answer step), whose logits no label scores; the other rows run
    SDPA as in the unwrapped model (the engine computes only edited rows densely), so their logits and the loss are
    the unwrapped model's bit for bit, and the last row's logits differ."""
    model, processor = tiny_model(family)
    batch = prompts(processor)[1]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        plain = model(**batch, labels=labels)
    ve.wrap(model, "pai")
    with torch.no_grad():
        wrapped = model(**batch, labels=labels)
    assert torch.equal(wrapped.logits[:, :-1], plain.logits[:, :-1])
    assert not torch.allclose(wrapped.logits[:, -1], plain.logits[:, -1], atol=1e-4)
    assert torch.equal(wrapped.loss, plain.loss)
    ve.unwrap(model)
    ve.wrap(model, f"{FASTV}+pai")
    with pytest.raises(ValueError, match="labels: fastv drops prompt rows"), torch.no_grad():
        model(**batch, labels=labels)
