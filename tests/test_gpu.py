"""CUDA checks of the engine (skipped without a GPU): bf16 on the device, and a model split across devices."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vlm_efficient as ve
from test_engine import greedy, two_samples
from vlm_efficient.testing import FAMILIES, tiny_image, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPECS = ["fastv:layer=2,ratio=0.5", "pdrop:layers=1/2/3", "dart:layer=2,ratio=0.5", "divprune:ratio=0.5"]


@pytest.fixture
def exact_fp32():
    """cuDNN convolutions default to TF32 (Qwen's 3-D patch embedding is one): the H100 run of 2026-11-23 saw
    pdrop on qwen2_vl keep the CPU's kept sets but drift to other tokens late in the sequence."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_same_up_to_near_ties(cpu, gpu, margin=1e-3):
    """Greedy tokens equal, or the first difference falls where the CPU's two best logits were within `margin` (a
    near tie that fp32 rounding on another device may break either way; after it the texts legitimately differ)."""
    tokens_cpu, tokens_gpu = cpu.sequences, gpu.sequences.cpu()
    steps = len(cpu.logits)
    new_cpu, new_gpu = tokens_cpu[:, -steps:], tokens_gpu[:, -steps:]
    assert torch.equal(tokens_cpu[:, :-steps], tokens_gpu[:, :-steps])
    for sample in range(tokens_cpu.shape[0]):
        differ = (new_cpu[sample] != new_gpu[sample]).nonzero()
        if len(differ):
            step = int(differ[0])
            top2 = cpu.logits[step][sample].float().topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < margin, f"sample {sample} differs at step {step}, where the CPU's top-2 gap is {gap:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_cuda_matches_cpu(family, spec, exact_fp32):
    """fp32 on the GPU keeps the CPU's kept sets and greedy tokens (up to near ties)."""
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, spec)
    cpu = greedy(model, batch)
    kept_cpu = ve.stats(model).tokens_per_layer_per_sample
    model.cuda()
    gpu = greedy(model, batch.to("cuda"))
    assert ve.stats(model).tokens_per_layer_per_sample == kept_cpu
    ve.unwrap(model)
    assert_same_up_to_near_ties(cpu, gpu)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_runs_and_prunes(family):
    model, processor = tiny_model(family, dtype=torch.bfloat16)
    model.cuda()
    batch = two_samples(processor).to("cuda")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    ve.wrap(model, "fastv:layer=2,ratio=0.5")
    out = greedy(model, batch)
    assert torch.isfinite(torch.stack(out.logits)).all()
    assert ve.stats(model).visual_tokens_per_layer[2] < ve.stats(model).visual_tokens_per_layer[1]
    ve.unwrap(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_model_split_across_devices(family):
    """Layers on different devices (accelerate device_map): the engine's index tensors follow each layer."""
    from accelerate import dispatch_model

    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, "fastv:layer=2,ratio=0.5")
    reference = greedy(model, batch).sequences
    ve.unwrap(model)
    prefix = "model.language_model.layers"
    device_map = {"model.vision_tower" if family == "llava" else "model.visual": 0,
                  "model.language_model.embed_tokens": 0, f"{prefix}.0": 0, f"{prefix}.1": 0,
                  f"{prefix}.2": "cpu", f"{prefix}.3": "cpu", "model.language_model.norm": "cpu",
                  "model.language_model.rotary_emb": 0, "lm_head": 0}
    if family == "llava":
        device_map["model.multi_modal_projector"] = 0
    model = dispatch_model(model, device_map=device_map)
    ve.wrap(model, "fastv:layer=2,ratio=0.5")
    out = greedy(model, batch.to("cuda")).sequences.cpu()
    ve.unwrap(model)
    assert torch.equal(out, reference)


# ---- kernel routing (vlm_efficient/kernel_plan.py): the Triton kernels against the dense torch path ------------------
ROUTED_SPECS = ["pai:alpha=0.5", "vaf", "var:tau=2", "ocr_sink:heads=1.0/2.1/2.3/3.2", "vhr", "naavit", "window",
                "knockout:edges=question-image/image-last", "fastv:layer=2,ratio=0.5+pai:alpha=0.5",
                "pdrop:layers=1/2/3,ratio=0.5+vaf", "visionzip+var:tau=1"]
KERNEL_ROUTES = {"group", "mask", "stats", "group+scale", "sdpa+scale"}


def _routed_and_dense(model, batch, spec, monkeypatch, **kw):
    """generate() with VLM_EFFICIENT_KERNELS=off (dense torch path) and unset (auto: the Triton kernels on CUDA)."""
    ve.wrap(model, spec)
    engine = ve.engine_of(model)
    try:
        monkeypatch.setenv("VLM_EFFICIENT_KERNELS", "off")
        dense = greedy(model, batch, **kw)
        monkeypatch.delenv("VLM_EFFICIENT_KERNELS")
        routed = greedy(model, batch, **kw)
        routes = dict(engine.router.routes(engine.run))
    finally:
        ve.unwrap(model)
    return dense, routed, routes


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("spec", ROUTED_SPECS)
def test_triton_routes_match_dense_fp32(family, spec, monkeypatch):
    """fp32 tiny models (head_dim 16, GQA, left-padded batch of two): the kernels' tokens and logits equal the dense
    path's (the kernels multiply fp32 operands in full precision, not TF32)."""
    model, processor = tiny_model(family)
    model.cuda()
    batch = two_samples(processor).to("cuda")
    dense, routed, routes = _routed_and_dense(model, batch, spec, monkeypatch)
    assert set(routes.values()) & KERNEL_ROUTES, routes
    assert torch.equal(dense.sequences, routed.sequences)
    torch.testing.assert_close(torch.stack(routed.logits), torch.stack(dense.logits), atol=1e-4, rtol=1e-4)


LONG = {"max_new_tokens": 70, "min_new_tokens": 70}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_plphp_ragged_cache_on_kernel_4_matches_the_decode_mask(family, monkeypatch):
    """PLPHP's per-head pruned cache decoded by kernel 4 gives the tokens and logits of its dense decode mask."""
    model, processor = tiny_model(family)
    model.cuda()
    batch = two_samples(processor).to("cuda")
    spec = "plphp:layer=1,alpha=0.05,beta=0.02"
    _, masked, _ = _routed_and_dense(model, batch, spec + ",cache=mask", monkeypatch, **LONG)
    _, ragged, routes = _routed_and_dense(model, batch, spec, monkeypatch, **LONG)  # the cache grows once
    assert {routes[("decode", layer)] for layer in range(1, 4)} == {"ragged"}
    assert torch.equal(masked.sequences, ragged.sequences)
    torch.testing.assert_close(torch.stack(ragged.logits), torch.stack(masked.logits), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def llava_7b_shapes():
    """LLaVA-1.5-7B shapes (32 heads, head_dim 128, 576 image tokens) with 4 layers and random weights, bf16, and a
    left-padded batch of two prompts."""
    from vlm_efficient.evals.archs import build_arch
    from vlm_efficient.models import build_prompt

    model, processor = build_arch("llava-1.5-7b", "cuda", torch.bfloat16, layers=4)
    prompts = [build_prompt(processor, question) for question in ("Please describe this image in detail.", "What?")]
    images = [tiny_image(i, size=(336, 336)) for i in range(2)]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt").to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return model, inputs


@pytest.mark.parametrize("spec", ["pai:alpha=0.5", "vaf", "var:tau=3,sink_dims=0/1/2/3", "ocr_sink:heads=2.0/2.5/3.31",
                                  "vhr", "naavit", "window", "fastv:layer=2,ratio=0.5",
                                  "fastv:layer=2,ratio=0.5+pai:alpha=0.5"])
def test_triton_routes_on_7b_shapes_bf16(llava_7b_shapes, spec, monkeypatch):
    """The kernels' first-token logits are the dense path's within bf16 rounding, at real shapes."""
    model, inputs = llava_7b_shapes
    dense, routed, routes = _routed_and_dense(model, inputs, spec, monkeypatch)
    assert set(routes.values()) & KERNEL_ROUTES, routes
    first_dense, first_routed = dense.logits[0].float(), routed.logits[0].float()
    assert torch.isfinite(first_routed).all()
    error = float((first_routed - first_dense).norm() / first_dense.norm())
    assert error < 3e-2, f"{spec}: relative error {error:.2e}, routes {routes}"


def fast_calls(family: str, spec: str, count: int):
    """(model, reference, calls): the dynamic path's greedy output of `spec` on two samples, on the CPU as
    assert_same_up_to_near_ties takes it; then the model wrapped with fast=True (left wrapped) and `count` greedy calls
    on the same batch, each with the prefill segments it ran (`segments`)."""
    model, processor = tiny_model(family)
    model.cuda()
    batch = two_samples(processor).to("cuda")
    ve.wrap(model, spec)
    dynamic = greedy(model, batch)
    ve.unwrap(model)
    ve.wrap(model, spec, fast=True)
    prefill = ve.engine_of(model).fast_path.prefill
    calls = []
    for _ in range(count):
        calls.append(greedy(model, batch))
        calls[-1].segments = list(prefill.last_segments)
    reference = SimpleNamespace(sequences=dynamic.sequences.cpu(), logits=[step.cpu() for step in dynamic.logits])
    return model, reference, calls


def assert_segments_replay_as_eager(prefill, calls) -> None:
    """Three calls: segments eager at the first sighting, captured at the second, replayed at the third; the same
    tokens and first logits each time."""
    assert prefill.graphs.capture_error is None
    assert calls[0].segments and not any(replayed for *_, replayed in calls[0].segments)
    assert all(replayed for *_, replayed in calls[2].segments)
    for call in calls[1:]:
        assert torch.equal(call.sequences, calls[0].sequences)
        torch.testing.assert_close(call.logits[0], calls[0].logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("spec", ["", "fastv:layer=2,ratio=0.5", "vaf", "pai", "visionzip:ratio=0.75", "vmtc:ratio=0.75",
                                  "plphp"])
def test_fast_prefill_segment_graphs_replay_as_eager(family, spec, exact_fp32):
    """The fast path's prefill segments (and image encoding): eager on the first sighting of their shapes, captured
    on the second, replayed after; the same tokens and first logits each time, and the dynamic path's tokens. The
    vision-tower methods' recording, choosing and merging are inside the encoding's graph on LLaVA; PAI's prompt is
    one segment whose edited layers run its last row through kernel 3's decoding form inside the graph. The decoding
    step's graph runs kernel 5 in its layers without edits, and PLPHP's per-head caches on kernel 4."""
    model, reference, calls = fast_calls(family, spec, 3)
    fast_path = ve.engine_of(model).fast_path
    prefill, encoder = fast_path.prefill, fast_path.encoder
    assert_segments_replay_as_eager(prefill, calls)
    assert encoder.graphs.capture_error is None
    assert prefill.routed_last_row == (spec == "pai") and not prefill.deferred_last_row
    # transformers 5.25 encodes the images before the prefill: LLaVA's encoding is captured too (Qwen's engine reads
    # the grids from its vision tower's calls, so its encoding stays eager)
    encodes_first = getattr(model, "_supports_mm_encoder_outputs", lambda: False)()
    assert encoder.last_replayed == (family == "llava" and encodes_first)
    ve.unwrap(model)
    assert_same_up_to_near_ties(reference, calls[2])


@pytest.mark.parametrize("spec", ["", "fastv:layer=2,ratio=0.5"])
def test_gemma3_segments_of_one_layer_type_replay_as_eager(spec, exact_fp32):
    """Gemma3's prefill segments (one layer type each, on that type's mask and rotary tables): eager on the first
    sighting, captured on the second, replayed after; the same tokens and first logits, and the dynamic path's."""
    model, reference, calls = fast_calls("gemma3", spec, 3)
    assert_segments_replay_as_eager(ve.engine_of(model).fast_path.prefill, calls)
    assert len(calls[0].segments) > 1
    ve.unwrap(model)
    assert_same_up_to_near_ties(reference, calls[2])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_stepping_decode_edits_in_the_step_graph_give_the_dynamic_tokens(family, exact_fp32):
    """A-VL on the fast path: its decode mask's state (core re-picks, H2O eviction) is updated in place inside the
    step's CUDA graph (by kernel 6, from kernel 5's head-averaged probabilities), captured for each call after warm-up
    runs whose updates are undone; the dynamic path's tokens, and the same tokens again on a second call (a new
    capture from that call's state)."""
    model, reference, calls = fast_calls(family, "avl:interval=2", 2)
    fast_path = ve.engine_of(model).fast_path
    assert fast_path.capture_error is None and fast_path.last_step.graph is not None
    assert all(edit.state for edits in fast_path.last_step.edits.values() for edit in edits)
    from vlm_efficient.fast_attention import MaskedDecodeRoute

    step = fast_path.last_step  # A-VL's layers: kernel 5 with the head-averaged probabilities, then kernel 6
    assert all(isinstance(step.routes[idx], MaskedDecodeRoute) and step.routes[idx].observers for idx in step.edits)
    ve.unwrap(model)
    for call in calls:
        assert_same_up_to_near_ties(reference, call)


@pytest.mark.parametrize("spec", ["fastv:layer=2,ratio=0.5", "pai:alpha=0.5"])
def test_static_cache_on_the_gpu_decodes_uncompiled_with_the_dynamic_tokens(spec, exact_fp32):
    """On a GPU generate() would compile the decoding forward on a static cache (CUDA graphs); the wrapped model is
    not compiled there (hooks.STATIC_UNCOMPILED, said in a warning) and gives the dynamic cache's tokens. Compiled,
    FastV and PAI failed at LLaVA-1.5-7B shapes on an H100 (run 10: a CUDA graph's overwritten output, an inductor
    C++ compile error)."""
    model, processor = tiny_model("llava")
    model.cuda()
    batch = two_samples(processor).to("cuda")
    ve.wrap(model, spec)
    dynamic = greedy(model, batch)
    with pytest.warns(RuntimeWarning, match="decodes uncompiled"):
        static = greedy(model, batch, cache_implementation="static")
    ve.unwrap(model)
    assert torch.equal(static.sequences, dynamic.sequences)
