"""The fast path (wrap(..., fast=True)): the same tokens and logits as the dynamic path on every family, its refusals,
its buffers, unwrap. On CPU the static step runs eagerly; the CUDA graph of the same step is checked by
evals/fast_bench.py on a GPU."""

from __future__ import annotations

import functools
import threading

import pytest
import torch
from torch._dynamo.utils import counters

import vlm_efficient as ve
from test_engine import two_samples
from vlm_efficient.fast_attention import MaskedDecodeRoute
from vlm_efficient.fast_path import BUCKET, SEGMENT_BUCKET, GroupRoute
from vlm_efficient.testing import FAMILIES, image_placeholder, tiny_batch, tiny_image, tiny_model

NEW_TOKENS = 6
PRUNING = ["", "fastv:layer=2,ratio=0.5", "pdrop:layers=1/3,ratio=0.5", "dart:layer=2,ratio=0.75", "visionzip:ratio=0.75"]


def generate(model, batch, **kw):
    kw = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "output_logits": True, "return_dict_in_generate": True,
          **kw}  # fmt: skip
    with torch.no_grad():
        return model.generate(**batch, **kw)


def dynamic_then_fast(model, batch, spec, **kw):
    """The same generate() on the dynamic path (the unwrapped model for spec "") and on the fast path."""
    if spec:
        ve.wrap(model, spec)
    if kw.get("do_sample"):
        torch.manual_seed(0)
    dynamic = generate(model, batch, **kw)
    if spec:
        ve.unwrap(model)
    ve.wrap(model, spec, fast=True)
    if kw.get("do_sample"):
        torch.manual_seed(0)
    fast = generate(model, batch, **kw)
    return dynamic, fast


def assert_same(dynamic, fast, exact_prefill=True):
    assert torch.equal(fast.sequences, dynamic.sequences)
    assert len(fast.logits) == len(dynamic.logits)
    # the prefill is the same call on both paths (unless the fast path ran its last row as a decoding step); decoding
    # steps differ only in the reduction order of SDPA
    if exact_prefill:
        assert torch.equal(fast.logits[0], dynamic.logits[0])
    torch.testing.assert_close(torch.stack(fast.logits, 1), torch.stack(dynamic.logits, 1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", PRUNING)
def test_fast_path_equals_dynamic_path(family, spec):
    """Left-padded ragged batch, one image in one sample and two in the other: samples keep different numbers of
    keys, so the static buffers hold slot padding and left padding behind the masks."""
    model, processor = tiny_model(family)
    dynamic, fast = dynamic_then_fast(model, two_samples(processor), spec)
    assert_same(dynamic, fast)
    stats = ve.stats(model)
    assert stats.decode_steps == NEW_TOKENS - 1
    ve.unwrap(model)


def test_sampling_equals_dynamic_path():
    model, processor = tiny_model("qwen2_vl")
    dynamic, fast = dynamic_then_fast(model, two_samples(processor), "fastv:layer=2,ratio=0.5", do_sample=True,
                                      top_k=0)  # fmt: skip
    assert_same(dynamic, fast)


def test_stopping_on_eos_equals_dynamic_path():
    """One sample meets eos early (the other goes on, padded), then both do (generation stops early)."""
    model, processor = tiny_model("llava")
    batch = two_samples(processor)
    spec = "fastv:layer=2,ratio=0.5"
    ve.wrap(model, spec)
    reference = generate(model, batch).sequences
    ve.unwrap(model)
    prompt = batch["input_ids"].shape[1]
    first_stop = int(reference[0, prompt + 1])
    for eos in ([first_stop], [first_stop, int(reference[1, prompt + 2])]):
        dynamic, fast = dynamic_then_fast(model, batch, spec, eos_token_id=eos,
                                          pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
        assert_same(dynamic, fast)
        assert (dynamic.sequences.shape[1] < prompt + NEW_TOKENS) == (len(eos) == 2)
        ve.unwrap(model)


@pytest.mark.parametrize("spec", ["fastv:layer=2,ratio=0.5", "vaf", "fastv+pai", "var:tau=1,sink_dims=0/1/2/3"])
def test_buffers_are_reused_and_reloaded_between_calls(spec):
    """A second call of the same shapes reuses the first call's static step (on CUDA: its graph); what the first call
    left in the buffers (keys, masks, positions, edit tensors) must not leak into the second. The second batch has
    its samples the other way round, so every per-sample value moves."""
    model, processor = tiny_model("llava_next")
    ph = image_placeholder(processor)
    other = tiny_batch(processor, [(f"a much longer prompt with {ph} and then {ph} compare them",
                                    [tiny_image(6), tiny_image(7)]), (f"what is {ph} this", [tiny_image(5)])])  # fmt: skip
    ve.wrap(model, spec)
    expected = generate(model, other)
    ve.unwrap(model)
    ve.wrap(model, spec, fast=True)
    generate(model, two_samples(processor))
    fast_path = ve.engine_of(model).fast_path
    first = fast_path.last_step
    second = generate(model, other)
    assert fast_path.last_step is first and len(fast_path.steps) == 1
    assert bool(first.edits) == (spec != "fastv:layer=2,ratio=0.5")
    assert_same(expected, second)


def test_stats_report_the_allocated_buffers():
    model, processor = tiny_model("qwen2_5_vl")
    batch = two_samples(processor)
    ve.wrap(model, "fastv:layer=2,ratio=0.5", fast=True)
    generate(model, batch)
    stats = ve.stats(model)
    step = ve.engine_of(model).fast_path.last_step
    allocated = [k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(step.keys, step.values)]
    assert stats.kv_cache_bytes_per_layer == allocated
    # each layer: its kept prompt keys (slot padding included) plus the new ones, rounded up to the bucket
    config = model.config.get_text_config()
    run = ve.engine_of(model).run
    for idx, size in enumerate(allocated):
        kept = run.layer_positions[idx].shape[1] if run.layer_positions[idx] is not None else run.prompt_length
        length = -(-(kept + NEW_TOKENS - 1) // BUCKET) * BUCKET
        assert size == 2 * batch["input_ids"].shape[0] * config.num_key_value_heads * length * 16 * 4
    assert allocated[2] <= allocated[1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("spec", ["pai", "vaf", "act", "adaptvis", "var:tau=1,sink_dims=0/1/2/3", "fastv+vaf"])
def test_decoding_edits_equal_dynamic_path(family, spec):
    """Head methods whose decoding edit stays the same at every step: the edits are made once over the whole static
    buffer and run inside the step: kernel 3's decoding form where the layer's edits compose into one group edit
    (PAI, VAF, VAR, AdaptVis), else the dense edited attention (ACT: its sinks differ per head)."""
    model, processor = tiny_model(family)
    dynamic, fast = dynamic_then_fast(model, two_samples(processor), spec)
    fast_path = ve.engine_of(model).fast_path
    edits = fast_path.last_step.edits
    assert edits  # the edited attention really ran
    group = spec != "act"
    assert all(isinstance(route, GroupRoute) == group for route in edits.values())
    prefill = fast_path.prefill
    last_row = spec in ("pai", "adaptvis")  # they edit the last prompt row only, as they edit decoding rows
    assert prefill.routed_last_row == last_row and not prefill.deferred_last_row
    if last_row:  # the prompt ran as segments, whose edited layers ran the last row through kernel 3's decoding form
        assert [(start, end) for start, end, _ in prefill.last_segments] == [(0, len(fast_path.parts["layers"]))]
        # one edit for every edited layer (Method.kernel_edit per run): one route, one set of buffers in the step
        assert len({id(route) for route in edits.values()}) == 1
    assert_same(dynamic, fast, exact_prefill=not last_row)
    ve.unwrap(model)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["", "fastv:layer=2,ratio=0.5", "fastv+pai"])
def test_layers_without_edits_decode_through_kernel_5(family, spec, monkeypatch):
    """Where the kernels run, every layer of the decoding step without a decoding edit attends through kernel 5 (the
    masked split-KV decode) over the whole buffer, its mask hiding slot padding, left padding, pruned keys and the
    slots not written yet: on CPU its torch reference (VLM_EFFICIENT_KERNELS=reference; the Triton kernel under the
    interpreter: tests/test_kernel_routing.py) against the dynamic path's SDPA."""
    from vlm_efficient.fast_attention import MaskedDecodeRoute
    from vlm_efficient.kernels import api

    calls = []
    monkeypatch.setattr(api, "masked_decode_attention",
                        functools.partial(_counted, api.masked_decode_attention, calls))  # fmt: skip
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    dynamic, _ = dynamic_then_fast(model, batch, spec)
    fast_path = ve.engine_of(model).fast_path
    assert not any(isinstance(route, MaskedDecodeRoute) for route in fast_path.last_step.routes.values())  # CPU: SDPA
    assert not calls
    monkeypatch.setenv("VLM_EFFICIENT_KERNELS", "reference")
    fast = generate(model, batch)
    step = fast_path.last_step
    masked = [idx for idx, route in step.routes.items() if isinstance(route, MaskedDecodeRoute)]
    assert sorted(masked) == [idx for idx in range(len(step.group_of)) if idx not in step.edits]
    assert masked and (spec != "fastv+pai" or step.edits)
    assert len(calls) == len(masked) * (NEW_TOKENS - 1)
    assert_same(dynamic, fast, exact_prefill=spec != "fastv+pai")
    ve.unwrap(model)


def _counted(function, calls, *args, **kwargs):
    calls.append(1)
    return function(*args, **kwargs)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("spec", ["knockout:edges=question-image/image-last", "naavit", "window", "frame_causal", "aki",
                                  "ee_mllm", "fastv+naavit"])  # fmt: skip
def test_masks_equal_dynamic_path(family, spec):
    """Cross-modal masks on the fast path: the prefill layers they mask run through the wrapped model, the decoding
    step masks its row as the dynamic path does (or, where a mask leaves decoding rows alone, runs plain attention)."""
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    plain = generate(model, batch)
    dynamic, fast = dynamic_then_fast(model, batch, spec)
    assert_same(dynamic, fast)
    assert not torch.allclose(torch.stack(fast.logits, 1), torch.stack(plain.logits, 1))  # the mask acted
    ve.unwrap(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("spec", ["vhr", "vhr+pai"])
def test_head_output_scales_equal_dynamic_path(family, spec):
    """VHR scales head outputs (the o_proj input) at every decoding step: asked once after the prefill, applied by the
    engine's head-output hook inside the step from buffers that a kept step reloads per call
    (test_captured_prefill_reloads_each_calls_inputs alternates prompts)."""
    model, processor = tiny_model(family)
    dynamic, fast = dynamic_then_fast(model, two_samples(processor), spec)
    step = ve.engine_of(model).fast_path.last_step
    chosen = range(len(step.parts["layers"]) // 2, len(step.parts["layers"]))  # VHR's default: the later half
    assert sorted(step.head_scales) == list(chosen)
    assert any(bool((scale != 1).any()) for scale in step.head_scales.values())  # some heads really are scaled
    # the prompt ran as segments and its last row as the first decoding step (a head scale is no group edit)
    prefill = ve.engine_of(model).fast_path.prefill
    assert prefill.deferred_last_row and prefill.last_segments
    assert_same(dynamic, fast, exact_prefill=False)
    ve.unwrap(model)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["avl:interval=2", "fastv:layer=1+avl:interval=3,text_rate=0.5"])
def test_stepping_decode_edits_equal_dynamic_path(family, spec):
    """A-VL changes its decode mask at every step (the core re-picked every `interval` steps from the step's own
    attention, text keys evicted by H2O): on the fast path that state lives on the device over the static buffer and
    the step updates it (Method.static_decode_edit), with the dynamic path's tokens and logits; its step serves one
    call (its post-softmax holds the call's state), and a second call starts from its own prefill's state. Its prefill
    statistics are computed inside the lean prefill's segments and delivered after them; the image keys it deletes are
    left out of the step's buffers."""
    from vlm_efficient.token_ops.avl import AVL

    model, processor = tiny_model(family)
    batch = two_samples(processor)
    dynamic, fast = dynamic_then_fast(model, batch, spec)
    fast_path = ve.engine_of(model).fast_path
    method = next(m for m in ve.engine_of(model).methods if isinstance(m, AVL))
    edits = fast_path.last_step.edits
    assert sorted(edits) == sorted(k for k in ve.engine_of(model).run.memory(method) if isinstance(k, int))
    # its prefill statistics (the last row's) come out of the segments (StatsRoute): segments to the last layer, from
    # layer 0, or 2 (Qwen3-VL's deepstack injections after layers 0 and 1); FastV's selection at layer 1 splits them
    first = 2 if family == "qwen3_vl" else 0
    starts = [first] + ([1] if spec.startswith("fastv") and first < 1 else [])
    layers = len(fast_path.parts["layers"])
    assert [start for start, _, _ in fast_path.prefill.last_segments] == starts
    assert fast_path.prefill.last_segments[-1][1] == layers
    assert all(edit.state for layer_edits in edits.values() for edit in layer_edits)
    # its edits only mask and observe: kernel 5 runs those layers and hands A-VL the head-averaged probabilities
    routes = fast_path.last_step.routes
    assert all(isinstance(routes[idx], MaskedDecodeRoute) and routes[idx].observers for idx in edits)
    assert not fast_path.steps  # not kept for the next call
    assert_same(dynamic, fast)
    # its deleted image keys (outside the secondary set) are not in the buffers (Method.decode_prompt_keep): every
    # edited layer holds fewer keys than the base's, and the step allocates less
    step = fast_path.last_step
    ve.unwrap(model)
    ve.wrap(model, "", fast=True)
    generate(model, batch)
    base = ve.engine_of(model).fast_path.last_step
    assert all(step.valid_keys(idx).sum() < base.valid_keys(idx).sum() for idx in edits)
    assert sum(step.kv_bytes()) < sum(base.kv_bytes())
    ve.unwrap(model)
    ve.wrap(model, spec, fast=True)
    again = generate(model, batch)
    assert_same(dynamic, again)
    ve.unwrap(model)


def test_stepping_state_survives_the_capture_warm_up(monkeypatch):
    """On CUDA the step runs before its first token (a capture's warm-up runs, the capture itself), advancing A-VL's
    state; the fast path puts the state back. Here the capture is stood in for by two eager runs of the step."""
    from vlm_efficient.fast_path import StaticStep

    model, processor = tiny_model("llava")
    dynamic, _ = dynamic_then_fast(model, two_samples(processor), "avl:interval=2")
    fast_path = ve.engine_of(model).fast_path
    warm_ups = []
    monkeypatch.setattr(fast_path, "graphs_on", lambda device: True)  # the steps' capture only (prefill keeps its own)
    monkeypatch.setattr(StaticStep, "capture", lambda step: warm_ups.extend([step.step(), step.step()]))
    assert_same(dynamic, generate(model, two_samples(processor)))
    assert len(warm_ups) == 2
    ve.unwrap(model)


@pytest.mark.parametrize("spec, why", [
    ("gift:words=all", "no form that stays the same"),  # edits recomputed at every step
    ("equal_distance", "no form that stays the same"),  # pre-rotary logits
])  # fmt: skip
def test_other_decoding_edits_are_refused_naming_the_dynamic_path(spec, why):
    model, processor = tiny_model("llava")
    ve.wrap(model, spec, fast=True)
    with pytest.raises(ValueError, match=f"{why}.*dynamic path"):
        generate(model, two_samples(processor))
    ve.unwrap(model)


def test_sliding_window_layers_are_refused_at_wrap():
    model, _ = tiny_model("qwen2_vl")
    model.config.get_text_config().layer_types = ["full_attention", "sliding_attention"] * 2
    with pytest.raises(ValueError, match="sliding_attention.*dynamic path"):
        ve.wrap(model, "fastv", fast=True)
    assert not ve.is_wrapped(model)


@pytest.mark.parametrize("family", [*FAMILIES, "gemma3"])  # gemma3: the stream's sliding-window layers too
def test_pai_contrastive_stream_decodes_on_a_static_step(family, monkeypatch):
    """PAI with its contrastive term (`pai:contrastive=1.1`: the fast path's generate() adds PAIContrastive): the
    text-only stream decodes on a static step of its own beside the call's (FastPath.plain_stream), with the scores
    (the processed logits: the stream's log-probabilities enter them) and tokens of the dynamic path given the
    processor by hand; its step is kept for the next call."""
    from transformers import LogitsProcessorList

    from vlm_efficient.fast_path import FastPath
    from vlm_efficient.heads.pai import PAIContrastive

    model, processor = tiny_model(family)
    batch = two_samples(processor)
    streams = []
    plain_stream = FastPath.plain_stream
    monkeypatch.setattr(FastPath, "plain_stream", lambda self, inputs: streams.append(plain_stream(self, inputs))
                        or streams[-1])  # fmt: skip

    ve.wrap(model, "pai")  # the dynamic path with the processor passed by hand
    dynamic = generate(model, batch, output_scores=True, logits_processor=LogitsProcessorList([PAIContrastive(model)]))
    ve.unwrap(model)
    ve.wrap(model, "pai:contrastive=1.1", fast=True)  # the fast path's generate() adding it (Method.logits_processors)
    fast = generate(model, batch, output_scores=True)
    assert len(streams) == 1  # the stream's prefill, then its static step for every later token
    assert torch.equal(fast.sequences, dynamic.sequences)
    for fast_scores, dynamic_scores in zip(fast.scores, dynamic.scores):
        assert torch.equal(fast_scores.isinf(), dynamic_scores.isinf())
        finite = ~dynamic_scores.isinf()
        torch.testing.assert_close(fast_scores[finite], dynamic_scores[finite], atol=1e-4, rtol=1e-4)
    stream_step = streams[0][1]
    again = generate(model, batch, output_scores=True)
    assert streams[1][1] is stream_step and torch.equal(again.sequences, fast.sequences)
    assert ve.engine_of(model).fast_path.last_step is not stream_step  # the call's own step is another
    ve.unwrap(model)


def test_plain_stream_needs_a_call_in_progress():
    model, processor = tiny_model("llava")
    ve.wrap(model, "pai", fast=True)
    with pytest.raises(RuntimeError, match="beside a fast-path generate"):
        ve.engine_of(model).fast_path.plain_stream({})
    ve.unwrap(model)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["plphp", "fastv:layer=1,ratio=0.5+plphp:layer=2", "streaming:sinks=2,window=6"])
def test_per_head_cache_equals_dynamic_path(family, spec):
    """Per-head pruned caches (PLPHP, streaming) on the fast path: each such layer's buffer holds only its KV heads'
    kept keys and room for the generated ones, and decoding attends per head (kernel 4's torch form on CPU) with the
    dynamic path's tokens and logits; its bytes are what stats reports, fewer than the dense buffers of the base."""
    from vlm_efficient.fast_attention import RaggedRoute

    model, processor = tiny_model(family)
    batch = two_samples(processor)
    dynamic, fast = dynamic_then_fast(model, batch, spec)
    assert_same(dynamic, fast)
    fast_path = ve.engine_of(model).fast_path
    step = fast_path.last_step
    if spec == "plphp":  # its statistics (decoding only) come out of the prefill's segment, from layer 0 (2 where
        # Qwen3-VL's deepstack injections run its first two layers as modules)
        assert fast_path.prefill.last_segments == [(2 if family == "qwen3_vl" else 0, len(step.group_of), False)]
    assert step.ragged and all(isinstance(step.routes[idx], RaggedRoute) for idx in step.ragged)
    assert all(step.keys[idx] is None for idx in step.ragged)  # no dense buffer beside the per-head one
    assert ve.stats(model).kv_cache_bytes_per_layer == step.kv_bytes()
    for idx, ragged in step.ragged.items():
        # the rows: each head's kept keys (fewer than the layer's prompt keys) and its room for the new tokens,
        # rounded up per segment; one spare row
        segments, prompt_keys = ragged.lengths.numel(), ve.engine_of(model).run.prompt_keys(idx, "cpu").shape[1]
        kept = int(ragged.lengths.sum()) - segments * (NEW_TOKENS - 1)
        assert kept < segments * prompt_keys
        room = step.capacities[idx] - prompt_keys
        assert 0 <= ragged.k_buf.shape[0] - 1 - (kept + segments * room) < segments * SEGMENT_BUCKET
        assert step.kv_bytes()[idx] == 2 * ragged.k_buf.nbytes
    ve.unwrap(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_per_head_cache_beside_head_scales_and_a_text_only_sample(family):
    """PLPHP with VHR (head-output scales in the same decoding step as the per-head caches), and PLPHP on a batch
    whose first sample has no image (its heads keep every key)."""
    model, processor = tiny_model(family)
    dynamic, fast = dynamic_then_fast(model, two_samples(processor), "plphp+vhr")
    assert ve.engine_of(model).fast_path.last_step.head_scales
    assert_same(dynamic, fast, exact_prefill=False)
    ve.unwrap(model)
    ph = image_placeholder(processor)
    batch = tiny_batch(processor, [("just text here please", []), (f"look {ph} at this", [tiny_image(1)])])
    dynamic, fast = dynamic_then_fast(model, batch, "plphp")
    assert_same(dynamic, fast)
    ragged = ve.engine_of(model).fast_path.last_step.ragged
    heads = ragged[2].num_kv_heads
    lengths = ragged[2].lengths.view(2, heads) - (NEW_TOKENS - 1)  # the kept prompt keys per (sample, KV head)
    assert (lengths[0] == int(batch["attention_mask"][0].sum())).all()  # the text-only sample keeps every key
    ve.unwrap(model)


def test_per_head_cache_is_laid_out_anew_for_each_call():
    """Two batches of the same shapes with other images, in turn on one kept step: each call's kept keys per head
    are placed again (a step holding the previous call's layout would give the other batch's tokens)."""
    model, processor = tiny_model("qwen2_vl")
    first = two_samples(processor)
    ph = image_placeholder(processor)
    second = tiny_batch(processor, [(f"what is {ph} this", [tiny_image(5)]),
                                    (f"a much longer prompt with {ph} and then {ph} compare them",
                                     [tiny_image(3), tiny_image(4)])])  # fmt: skip
    ve.wrap(model, "plphp")
    expected = [generate(model, batch) for batch in (first, second)]
    ve.unwrap(model)
    ve.wrap(model, "plphp", fast=True)
    fast_path = ve.engine_of(model).fast_path
    for _ in range(2):
        for batch, dynamic in zip((first, second), expected):
            assert_same(dynamic, generate(model, batch))
    assert len(fast_path.steps) == 1
    assert not torch.equal(expected[0].sequences, expected[1].sequences)
    ve.unwrap(model)


@pytest.mark.parametrize("spec, message", [
    ("plphp:layer=2+pai", "per-head pruned KV cache.*dynamic path.*plphp:cache=mask"),  # decoding edits on its layers
    ("plphp+avl", "avl frees prompt keys.*per-head pruned cache.*use one of them"),  # keys freed by both
])  # fmt: skip
def test_per_head_cache_refuses_what_its_layers_cannot_serve(spec, message):
    model, processor = tiny_model("llava")
    ve.wrap(model, spec, fast=True)
    with pytest.raises(ValueError, match=message):
        generate(model, two_samples(processor))
    ve.unwrap(model)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_beams": 2}, "greedily or by sampling"),
    ({"cache_implementation": "static"}, "own static cache"),
    ({"streamer": object()}, "takes no streamer"),
    ({"output_attentions": True, "return_dict_in_generate": True}, "no attentions"),
])  # fmt: skip
def test_unsupported_generate_options_are_refused(kwargs, message):
    model, processor = tiny_model("llava")
    ve.wrap(model, "fastv", fast=True)
    with pytest.raises(ValueError, match=message):
        model.generate(**two_samples(processor), max_new_tokens=2, **kwargs)
    ve.unwrap(model)


def test_unwrap_restores_generate():
    model, processor = tiny_model("qwen3_vl")
    batch = two_samples(processor)
    reference = generate(model, batch).sequences
    ve.wrap(model, "fastv:layer=2,ratio=0.5", fast=True)
    assert "generate" in vars(model)
    ve.unwrap(model)
    assert "generate" not in vars(model)
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)
    assert not model.model.language_model.rotary_emb._forward_pre_hooks
    assert torch.equal(generate(model, batch).sequences, reference)


@pytest.mark.parametrize("family,spec,kernels", [("llava", "fastv:layer=2,ratio=0.5", None), ("qwen2_vl", "pai", None),
                                                 ("qwen2_vl", "fastv:layer=1,ratio=0.5+plphp:layer=2", "reference")])
def test_compiled_step_equals_dynamic_path(family, spec, kernels, monkeypatch):
    """fast="compile": the step compiled by torch.compile (PAI's group kernel an operator in the graph; with the kernels
    routed, kernel 5 and PLPHP's kernel 4 operators too) gives the dynamic path's tokens; the step is built (compiled)
    once and kept for the next call, which gives the same."""
    if kernels:
        monkeypatch.setenv("VLM_EFFICIENT_KERNELS", kernels)
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, spec)
    dynamic = generate(model, batch)
    ve.unwrap(model)
    ve.wrap(model, spec, fast="compile")
    fast_path = ve.engine_of(model).fast_path
    counters.clear()
    compiled = generate(model, batch)
    step, build_s = fast_path.last_step, fast_path.last_build_s
    assert step.compiled and build_s > 0
    assert dict(counters["graph_break"]) == {}  # one graph: the group kernel is an operator, not a break
    if kernels:
        from vlm_efficient.fast_attention import MaskedDecodeRoute, RaggedRoute

        assert {type(route) for route in step.routes.values()} == {MaskedDecodeRoute, RaggedRoute}
    assert_same(dynamic, compiled, exact_prefill=not fast_path.prefill.deferred_last_row)
    assert torch.equal(generate(model, batch).sequences, dynamic.sequences)
    assert fast_path.last_step is step and fast_path.last_build_s == build_s
    ve.unwrap(model)


def test_fast_takes_true_false_or_compile():
    model, _ = tiny_model("llava")
    with pytest.raises(ValueError, match="fast takes False, True or 'compile'"):
        ve.wrap(model, "", fast="graph")
    assert not ve.is_wrapped(model)


def test_fast_bench_runs_on_the_tiny_models(tmp_path):
    """The GPU benchmark script's CPU smoke run: every configuration of its first section runs, and its checks find
    the fast path's tokens equal to the dynamic path's and HF's static route's equal to the dynamic cache's."""
    import json

    from vlm_efficient.evals import fast_bench

    assert fast_bench.main(["--tiny", "--out", str(tmp_path), "--new-tokens", "3", "--repeats", "1",
                            "--sections", "1"]) == 0  # fmt: skip
    result = json.loads((tmp_path / "fast_bench.json").read_text())
    assert result["errors"] == []
    (section,) = result["sections"]
    paths = {(row["path"], row["method"]) for row in section["rows"]}
    assert {("hf-dynamic", ""), ("fast", ""), ("hf-static", ""), ("fast", "FastV 75%"), ("dynamic", "DART 75%"),
            ("hf-static", "FastV 75%"), ("hf-static", "PAI")} <= paths  # fmt: skip
    assert all(row["decode_ms_per_token"] is not None for row in section["rows"])
    # each fast row names what the decoding step's layers ran (CPU: SDPA, kernel 3's torch form for PAI, kernel 4's for
    # PLPHP's per-head layers)
    routes = {row["method"]: row["step_routes"] for row in section["rows"] if row["path"] == "fast"}
    assert all(sum(counts.values()) == 4 for counts in routes.values()) and routes[""] == {"SDPA": 4}
    assert routes["PAI"]["GroupRoute"] > 0 and routes["PLPHP"]["RaggedRoute"] == 2
    # HF's static route: the unwrapped model against itself on the dynamic cache, the wrapped one against the dynamic path
    static = [row for row in section["rows"] if row["path"] == "hf-static"]
    assert [(row["tokens_equal_path"], row["tokens_equal"]) for row in static] == [
        ("hf-dynamic", True)] + [("dynamic", True)] * (len(static) - 1)  # fmt: skip
    assert [check["tokens_equal"] for check in section["checks"]] == [True] * (1 + len(fast_bench.SECTIONS[0].methods))
    assert "| fast | FastV 50% |" in (tmp_path / "fast_bench.md").read_text()
    assert len(result["family_checks"]) == (1 + len(fast_bench.FAMILY_CHECKS)) * len(FAMILIES)
    assert all(check["tokens_equal"] and check["graph_equals_eager"] for check in result["family_checks"])


def test_fast_bench_filters_methods_and_profiles_the_prefill(tmp_path):
    """--methods runs only the labels named, --no-checks skips every check, --profile writes one operator table and one
    Python profile per path and fast-path method, --inductor settings are recorded; an unknown label, an unknown
    inductor setting and a value that is no Python literal are refused."""
    import json

    from vlm_efficient.evals import fast_bench

    assert fast_bench.main(["--tiny", "--out", str(tmp_path), "--new-tokens", "2", "--repeats", "1", "--sections", "1",
                            "--methods", "PAI", "--no-checks", "--profile", "--compiled",
                            "--inductor", "coordinate_descent_tuning=False"]) == 0  # fmt: skip
    result = json.loads((tmp_path / "fast_bench.json").read_text())
    assert result["inductor_config"] == {"coordinate_descent_tuning": False}
    (section,) = result["sections"]
    assert {(row["path"], row["method"]) for row in section["rows"]} == {
        ("hf-dynamic", ""), ("dynamic", ""), ("fast", ""), ("fast", "PAI"), ("dynamic", "PAI"), ("fast-compiled", ""),
        ("fast-compiled", "PAI")}  # fmt: skip
    assert [row["compiled"] for row in section["rows"] if row["path"].startswith("fast")] == [False, False, True, True]
    assert [(row["tokens_equal_path"], row["tokens_equal"]) for row in section["rows"]
            if row["path"] == "fast-compiled"] == [("fast", True)] * 2
    assert section["checks"] == [] and "family_checks" not in result
    for name in ("hf-dynamic", "dynamic", "fast", "fast_PAI"):
        text = (tmp_path / f"profile_{name}.txt").read_text()
        assert "Self CPU" in text and "cProfile" in text and "tottime" in text
    for bad in (["--methods", "FastW"], ["--inductor", "no_such_setting=1"], ["--inductor", "max_autotune=yes"]):
        with pytest.raises(SystemExit):
            fast_bench.main(["--tiny", "--out", str(tmp_path), *bad])


def test_fast_bench_runs_the_sections_named(tmp_path):
    """--only runs the sections named by number (here LLaVA-NeXT at batch 8, on its tiny model) and refuses a number
    that names none."""
    import json

    from vlm_efficient.evals import fast_bench

    assert fast_bench.main(["--tiny", "--out", str(tmp_path), "--new-tokens", "2", "--repeats", "1", "--only", "4",
                            "--no-checks"]) == 0  # fmt: skip
    (section,) = json.loads((tmp_path / "fast_bench.json").read_text())["sections"]
    assert (section["arch"], section["batch_size"]) == ("llava-next-7b", 8)
    assert {(row["path"], row["method"]) for row in section["rows"]} == {
        ("hf-dynamic", ""), ("dynamic", ""), ("fast", ""), ("fast", "FastV 75%"), ("dynamic", "FastV 75%"),
        ("fast", "PLPHP"), ("dynamic", "PLPHP")}
    for bad in ("0", str(len(fast_bench.SECTIONS) + 1), "1,x"):
        with pytest.raises(SystemExit):
            fast_bench.main(["--tiny", "--out", str(tmp_path), "--only", bad])


def test_fast_bench_times_gemma3(tmp_path):
    """Section 6: Gemma3 (its tiny model here; on a GPU the 4B shape of evals/archs.py), whose sliding-window and
    full layers run on the fast path as segments of one layer type each (the tiny model alternates them)."""
    import json

    from vlm_efficient.evals import fast_bench

    assert fast_bench.main(["--tiny", "--out", str(tmp_path), "--new-tokens", "3", "--repeats", "1", "--only", "6",
                            "--no-checks"]) == 0  # fmt: skip
    result = json.loads((tmp_path / "fast_bench.json").read_text())
    assert result["errors"] == []
    (section,) = result["sections"]
    assert section["arch"] == "gemma3-4b"
    fast = [row for row in section["rows"] if row["path"] == "fast"]
    assert {row["method"] for row in fast} == {"", "FastV 75%", "PAI"} and all(row["graph"] is False for row in fast)
    segments = {row["method"]: [(start, end) for start, end, _ in row["prefill_segments"]] for row in fast}
    assert segments[""] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert segments["FastV 75%"] == [(0, 1), (1, 2), (2, 3), (3, 4)]  # its statistics at layer 1 in a segment
    assert segments["PAI"] == [(0, 1), (1, 2)]  # its edited layers (2 and 3) run as modules beside sliding windows


def test_fast_bench_times_the_video_section(tmp_path):
    """Section 5: Qwen2-VL on a 32-frame clip per sample (its tiny model here), the video methods on the fast path and
    the dynamic path, each reducing the clip's tokens."""
    import json

    from vlm_efficient.evals import fast_bench

    assert fast_bench.main(["--tiny", "--out", str(tmp_path), "--new-tokens", "2", "--repeats", "1", "--only", "5",
                            "--no-checks"]) == 0  # fmt: skip
    result = json.loads((tmp_path / "fast_bench.json").read_text())
    assert result["errors"] == []
    (section,) = result["sections"]
    assert (section["arch"], section["video_frames"]) == ("qwen2-vl-7b", 32)
    rows = {(row["path"], row["method"]): row for row in section["rows"]}
    for label in ("DyCoke 75%", "FastV 75%", "DivPrune 90%"):
        assert {("fast", label), ("dynamic", label)} <= set(rows)
        assert rows["fast", label]["prefill_ms"] > 0
        assert rows["fast", label]["kv_cache_mib"] < rows["fast", ""]["kv_cache_mib"]  # fewer keys cached


@pytest.mark.parametrize("family,spec,module_layers", [
    ("llava", "", set()),
    ("llava", "fastv:layer=2,ratio=0.5", set()),  # scores in layer 1's segment; its selection starts the next one
    ("qwen2_vl", "pdrop:layers=1/3,ratio=0.5", {1, 3}),
    ("qwen3_vl", "", {0, 1}),  # deepstack adds visual features after the first layers (adapter.acts_after_layer)
    ("llava", "vaf", {1, 2}),  # VAF edits the middle layers' attention; its other layers are plain
])  # fmt: skip
def test_prefill_runs_plain_layers_as_segments(family, spec, module_layers):
    """The lean prefill calls the layers where something acts as modules and the others as segments, and leaves the
    engine's per-layer record as the dynamic path does."""
    model, processor = tiny_model(family)
    dynamic, fast = dynamic_then_fast(model, two_samples(processor), spec)
    assert_same(dynamic, fast)
    segments = ve.engine_of(model).fast_path.prefill.last_segments
    in_segments = {idx for start, end, _ in segments for idx in range(start, end)}
    layers = ve.engine_of(model).num_layers
    assert in_segments == set(range(layers)) - module_layers
    starts = {start for start, _, _ in segments}
    assert all(idx in starts for idx in ve.engine_of(model).prune_layers & in_segments)  # selections run between
    assert not any(replayed for _, _, replayed in segments)  # CPU: no graph
    run = ve.engine_of(model).run
    assert len(run.tokens_per_layer) == layers and sorted(run.layer_positions) == list(range(layers))
    ve.unwrap(model)


def test_segments_keys_and_values_become_the_cache_uncopied(monkeypatch):
    """The keys and values a segment computes are generate()'s cache layers as they are: the plan copies them into its
    static buffers, and nothing copies them before (a cache update would concatenate them onto an empty tensor). The
    layers called as modules update the cache as on the dynamic path."""
    from vlm_efficient import fast_prefill
    from vlm_efficient.fast_path import FastPath

    model, processor = tiny_model("llava")
    computed, planned = {}, {}
    kv, plan = fast_prefill.Segment.kv, FastPath._plan

    def recording_kv(segment, idx):
        computed[idx] = kv(segment, idx)
        return computed[idx]

    def recording_plan(fast_path, cache, *args, **kwargs):
        planned.update({idx: (layer.keys, layer.values) for idx, layer in enumerate(cache.layers)})
        return plan(fast_path, cache, *args, **kwargs)

    monkeypatch.setattr(fast_prefill.Segment, "kv", recording_kv)
    monkeypatch.setattr(FastPath, "_plan", recording_plan)
    dynamic, fast = dynamic_then_fast(model, two_samples(processor), "vaf")  # its edited layers run as modules
    assert_same(dynamic, fast)
    layers = ve.engine_of(model).num_layers
    assert sorted(planned) == list(range(layers)) and 0 < len(computed) < layers  # segments and module layers
    for idx, (keys, values) in computed.items():
        assert planned[idx][0] is keys and planned[idx][1] is values
    ve.unwrap(model)


def _same_layout(a, b) -> bool:
    same_items = all(len(x) == len(y) and all(torch.equal(i.coords, j.coords) and i.grid == j.grid and i.video == j.video
                                              for i, j in zip(x, y)) for x, y in zip(a.images, b.images))  # fmt: skip
    return (same_items and len(a.images) == len(b.images) and torch.equal(a.kind, b.kind)
            and torch.equal(a.image_index, b.image_index) and torch.equal(a.coords, b.coords)
            and (a.has_visual, a.padded, a.after_visual_text_counts)
            == (b.has_visual, b.padded, b.after_visual_text_counts))  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_is_built_before_the_image_encoding(family, monkeypatch):
    """The layout is built from generate()'s inputs before the images' encoding is queued (by the fast path itself on
    LLaVA-style families, by generate() on Qwen's with transformers 5.25, by the prefill's forward on 5.17) and the
    prefill takes it instead of building its own; on every family it is the dynamic path's layout."""
    from vlm_efficient import hooks

    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, "fastv:layer=2,ratio=0.5")
    generate(model, batch)
    dynamic = ve.engine_of(model).latest_run.layout
    ve.unwrap(model)
    built, events = [], []
    build, encode = hooks.build_layout, model.base_model.get_image_features
    monkeypatch.setattr(hooks, "build_layout", lambda *args: built.append(build(*args)) or events.append("layout")
                        or built[-1])  # fmt: skip
    encoding = functools.wraps(encode)(lambda *args, **kwargs: events.append("encode") or encode(*args, **kwargs))
    monkeypatch.setattr(model.base_model, "get_image_features", encoding)  # its signature kept (LeanEncoder reads it)
    ve.wrap(model, "fastv:layer=2,ratio=0.5", fast=True)
    generate(model, batch)
    engine = ve.engine_of(model)
    assert _same_layout(engine.latest_run.layout, dynamic)
    assert built == [engine.latest_run.layout]  # built once, and taken by the prefill
    assert engine.hooks.prebuilt_layout is None and engine.hooks.confirmed_layout is None
    assert events == ["layout", "encode"]
    built.clear()
    generate(model, tiny_batch(processor, [(f"who is {image_placeholder(processor)} this", [tiny_image(3)])]))
    assert built == [engine.latest_run.layout]  # also where generate() drops a mask of ones (no padding)
    ve.unwrap(model)


def test_a_layer_with_a_foreign_hook_runs_as_a_module():
    """A hook this library did not install (a user's, or a method's own) must run: its layer leaves the segments,
    and the tokens are those of the dynamic path with the same hook."""
    model, processor = tiny_model("llava")
    layer = model.model.language_model.layers[2]
    handle = layer.mlp.register_forward_hook(lambda module, args, output: output * 1.5)
    try:
        dynamic, fast = dynamic_then_fast(model, two_samples(processor), "")
        assert_same(dynamic, fast)
        segments = ve.engine_of(model).fast_path.prefill.last_segments
        assert [(start, end) for start, end, _ in segments] == [(0, 2), (3, 4)]
    finally:
        handle.remove()
        ve.unwrap(model)
    # without the hook the whole model is one segment again, and the tokens change back
    ve.wrap(model, "", fast=True)
    plain = generate(model, two_samples(processor))
    assert [(start, end) for start, end, _ in ve.engine_of(model).fast_path.prefill.last_segments] == [(0, 4)]
    assert not torch.equal(plain.logits[0], fast.logits[0])
    ve.unwrap(model)


def _copy_into(target, source) -> None:
    if isinstance(target, torch.Tensor):
        target.copy_(source)
    elif isinstance(target, (tuple, list)):
        for t, s in zip(target, source):
            _copy_into(t, s)
    elif isinstance(target, dict):  # a ModelOutput too
        for key in target:
            _copy_into(target[key], source[key])


def _stand_in_capture(fn, device, warmups=2):
    """A CPU stand-in for fast_prefill.capture_graph: the recorded call's output object, refilled in place by replay() from
    a new run of the same call on the same buffers (what a CUDA graph's replay does to its static outputs). The new run
    happens in another thread: a replay reruns the GPU work only, so the Python state that hooks keep per thread (a
    vision-tower method's records) must not change in the caller's."""
    output = fn()

    class Graph:
        def replay(self):
            results = []

            def run():
                with torch.no_grad():
                    results.append(fn())

            thread = threading.Thread(target=run)
            thread.start()
            thread.join()
            assert results, "the replayed call raised"
            _copy_into(output, results[0])

    return Graph(), output


@pytest.mark.parametrize("spec, vision_plain", [
    ("", True), ("fastv:layer=2,ratio=0.5", True),
    # read the tower's attention through their own hooks, which the encoding's graph replays (EncoderRecord)
    ("visionzip:ratio=0.75", True), ("fastervlm:ratio=0.75", True), ("vmtc:ratio=0.75", True),
    ("paint", False),  # hooks the tower's layers with no EncoderRecord: the encoding stays eager
    # the last prompt row's edits in the segments (their key groups reloaded per call), or deferred to the first step
    ("pai", True), ("adaptvis", True), ("pai+adaptvis", True),
    ("vhr", True),  # head-output scales of the decoding step, reloaded per call
])  # fmt: skip
def test_captured_prefill_reloads_each_calls_inputs(spec, vision_plain, monkeypatch):
    """The capture logic of the lean prefill and of the image encoding (transformers 5.25), with a CPU stand-in for CUDA
    graphs: eager at the first sighting of the input shapes, captured at the second, replayed after; two batches of
    the same shapes but other images and words alternate, and every call gives the dynamic path's tokens for its
    own batch (a replay that kept the previous call's inputs would give the other batch's; so would a vision-tower
    method's records if they were not reset after the forward the lean prefill stops, or not put back after the
    encoding's replay, which reruns no hook)."""
    from vlm_efficient import fast_prefill

    monkeypatch.setattr(fast_prefill, "capture_graph", _stand_in_capture)
    model, processor = tiny_model("llava")
    ph = image_placeholder(processor)
    batches = [two_samples(processor), tiny_batch(processor, [
        (f"who is {ph} this", [tiny_image(3)]),
        (f"a much longer prompt with {ph} and then {ph} compare them", [tiny_image(4), tiny_image(5)]),
    ])]  # fmt: skip
    assert batches[0]["input_ids"].shape == batches[1]["input_ids"].shape
    if spec:
        ve.wrap(model, spec)
    expected = [generate(model, batch) for batch in batches]
    assert not torch.equal(expected[0].sequences, expected[1].sequences)
    if spec:
        ve.unwrap(model)
    ve.wrap(model, spec, fast=True)
    fast_path = ve.engine_of(model).fast_path
    fast_path.prefill.graphs_on = fast_path.encoder.graphs_on = lambda device: True  # the decoding step stays eager
    encodes = getattr(model, "_supports_mm_encoder_outputs", lambda: False)()  # transformers 5.25
    for call, which in enumerate([0, 0, 1, 0, 1]):
        out = generate(model, batches[which])
        prefill = fast_path.prefill
        assert_same(expected[which], out, exact_prefill=not (prefill.deferred_last_row or prefill.routed_last_row))
        assert prefill.routed_last_row == (spec in ("pai", "adaptvis", "paint"))
        # two group edits, or a head scale (no group edit): no one route
        assert prefill.deferred_last_row == (spec in ("pai+adaptvis", "vhr"))
        replayed = [flag for *_, flag in fast_path.prefill.last_segments]
        assert replayed and all(flag == (call >= 1) for flag in replayed)
        assert fast_path.encoder.last_replayed == (encodes and vision_plain and call >= 1)
    assert fast_path.prefill.graphs.capture_error is None and fast_path.encoder.graphs.capture_error is None
    ve.unwrap(model)


def test_sightings_count_the_recent_signatures_only(monkeypatch):
    """A server sees many prompt lengths: the lean prefill counts the MAX_SIGHTINGS most recently seen input signatures
    (a capture is due at the CAPTURE_AFTER-th sighting of one), not every signature ever seen."""
    from vlm_efficient import fast_prefill

    monkeypatch.setattr(fast_prefill, "MAX_SIGHTINGS", 3)
    sightings = fast_prefill._Sightings(keep=2)
    assert [sightings.due(key) for key in "aab"] == [False, True, False]
    for key in "cde":  # 'a' and 'b' are forgotten
        sightings.due(key)
    assert len(sightings.seen) == 3
    assert [sightings.due("a"), sightings.due("e")] == [False, True]
