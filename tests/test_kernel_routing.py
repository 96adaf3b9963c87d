"""The engine's kernel routing (vlm_efficient/kernel_plan.py): which path each layer's attention call takes, and that
the routed paths (the kernels' torch references; the Triton kernels under Triton's interpreter) give what the dense
torch path gives, with generate() and the KV cache on a left-padded batch of two (the second prompt has two images).

The dense path is itself checked against each paper's formula by test_heads_*.py, so equal here means right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import vlm_efficient as ve  # noqa: E402
from test_engine import greedy, two_samples  # noqa: E402
from vlm_efficient import kernel_plan  # noqa: E402
from vlm_efficient.attention import edited_attention  # noqa: E402
from vlm_efficient.edits import dense_edit  # noqa: E402
from vlm_efficient.heads.act import ACT, act_groups  # noqa: E402
from vlm_efficient.heads.pai import PAI, pai_groups  # noqa: E402
from vlm_efficient.heads.vaf import vaf_groups  # noqa: E402
from vlm_efficient.heads.var import var_groups  # noqa: E402
from vlm_efficient.kernel_plan import ENV, LayerPlan, compose, key_padding, kernel_backend  # noqa: E402
from vlm_efficient.kernels.api import GroupSpec, MaskSpec  # noqa: E402
from vlm_efficient.kernels.group_attention import group_attention_reference  # noqa: E402
from vlm_efficient.kernels.masked_attention import masked_attention_reference  # noqa: E402
from vlm_efficient.method import AttentionContext, KernelEdit  # noqa: E402
from vlm_efficient.testing import FAMILIES, tiny_model  # noqa: E402

LAYERS = 4  # tiny models
OCR_HEADS = "ocr_sink:heads=1.0/2.1/2.3/3.2"


def run_both(family, spec, mode="reference", seed=None, **kw):
    """generate() with the kernels off (the dense torch path) and routed through `mode`; the routes of the second."""
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    if callable(spec):
        spec = spec(model, batch)
    ve.wrap(model, spec)
    engine = ve.engine_of(model)
    try:
        os.environ[ENV] = "off"
        if seed is not None:
            torch.manual_seed(seed)
        dense = greedy(model, batch, **kw)
        assert not engine.router.routes(engine.run), "kernels off: the router must stay out"
        os.environ[ENV] = mode
        if seed is not None:
            torch.manual_seed(seed)
        routed = greedy(model, batch, **kw)
        routes = dict(engine.router.routes(engine.run))
        # layers no method acts on go straight to SDPA (engine.plain_layers): the router never sees their calls
        assert not [key for key in routes if key[1] in engine.plain_layers], routes
        routes |= {(phase, layer): "sdpa" for phase in ("prefill", "decode") for layer in engine.plain_layers}
    finally:
        os.environ.pop(ENV, None)
        ve.unwrap(model)
    return dense, routed, routes


# float32 on both sides; Triton 3.9's interpreter (what pip installs now) sums the masked kernels' tiles in another
# order than 3.6 did, which moves single logits by up to 1.3e-5 (relative 7e-5), on main's code as well
def assert_same(dense, routed, tolerance=5e-5):
    assert torch.equal(dense.sequences, routed.sequences)
    torch.testing.assert_close(torch.stack(routed.logits), torch.stack(dense.logits), atol=tolerance, rtol=tolerance)


def adaptvis_both_ways(model, batch):
    """adaptvis with a threshold between the two samples' confidences: one sample smooths, the other sharpens."""
    with torch.no_grad():
        confidence = model(**batch).logits[:, -1].softmax(-1).amax(-1)
    return f"adaptvis:threshold={float(confidence.mean())}"


def layers(route, chosen, other="sdpa"):
    return {layer: route if layer in chosen else other for layer in range(LAYERS)}


# spec -> (prefill routes per layer, decode routes per layer); None: not asserted layer by layer
CASES = {
    "pai:alpha=0.5": (layers("group", {2, 3}), layers("group", {2, 3})),
    "vaf": (layers("group", {1, 2}), layers("group", {1, 2})),  # layers 9..14 of 32 scale to 1..2 of 4
    "adaptvis": (layers("group", range(LAYERS)), layers("group", range(LAYERS))),
    "var:tau=2": None,  # sinks (and so edits) depend on the model: "group" where there are some
    OCR_HEADS: (layers("group", {1, 2, 3}), layers("group", {1, 2, 3})),
    "vhr": (layers("sdpa+scale", {2, 3}), layers("sdpa", ())),
    "naavit": (layers("mask", range(LAYERS)), layers("sdpa", ())),
    "ee_mllm": (layers("mask", range(LAYERS)), layers("sdpa", ())),
    "window": (layers("mask", range(LAYERS)), layers("sdpa", ())),
    "knockout:edges=question-image/image-last,layers=1-2": (layers("mask", {1, 2}), layers("sdpa", ())),
    "fastv:layer=2,ratio=0.5": (layers("stats", {1}), layers("sdpa", ())),
    "fastv:layer=2,ratio=0.5+pai:alpha=0.5": ({0: "sdpa", 1: "stats", 2: "group", 3: "group"}, layers("group", {2, 3})),
    "naavit+pai:alpha=0.5": ({0: "mask", 1: "mask", 2: "dense", 3: "dense"}, layers("group", {2, 3})),
    "visionzip+vaf": (layers("group", {1, 2}), layers("group", {1, 2})),
    "pdrop:layers=1/2/3,ratio=0.5+var:tau=2": None,
    "gift:words=all,query_start=1,query_end=1": None,  # no structured form: dense where it edits
    "cmai": (layers("dense", range(LAYERS)), layers("sdpa", ())),
}
# every family for the methods whose layout handling differs by family; llava and qwen2_vl for the others
EVERY_FAMILY = {"pai:alpha=0.5", "var:tau=2", "window", "knockout:edges=question-image/image-last,layers=1-2",
                "fastv:layer=2,ratio=0.5+pai:alpha=0.5", "vhr", "visionzip+vaf"}
PARAMS = [(family, spec) for spec in CASES for family in (FAMILIES if spec in EVERY_FAMILY else ("llava", "qwen2_vl"))]


@pytest.mark.parametrize("family,spec", PARAMS)
def test_routed_equals_dense(family, spec):
    dense, routed, routes = run_both(family, adaptvis_both_ways if spec == "adaptvis" else spec)
    assert_same(dense, routed)
    expected = CASES[spec]
    if expected is not None:
        assert {layer: routes[("prefill", layer)] for layer in range(LAYERS)} == expected[0]
        assert {layer: routes[("decode", layer)] for layer in range(LAYERS)} == expected[1]
    elif spec.startswith("gift"):
        assert "dense" in routes.values()
    else:
        assert "group" in {routes[("prefill", layer)] for layer in range(LAYERS)}


def test_paint_routes_to_kernel_3():
    dense, routed, routes = run_both("llava", "paint")
    assert_same(dense, routed)
    assert {layer: routes[("prefill", layer)] for layer in range(LAYERS)} == layers("group", {2, 3})


def test_a_kernel_route_is_one_declaration(monkeypatch):
    """A Route added to kernel_plan.ROUTES (here kernel 1's torch reference, declared ahead of "mask") runs the calls
    it takes, under its name; the other calls keep their routes."""
    mask_reference = kernel_plan.Route(
        "mask_reference", ("prefill",), "one mask: kernel 1's torch reference",
        takes=lambda plan, call: plan.mask is not None and call.causal_padding,
        run=lambda plan, call: masked_attention_reference(call.query, call.key, call.value,
                                                          mask=call.structured_mask(plan.mask), scaling=call.scaling))
    declared = kernel_plan.ROUTES
    monkeypatch.setattr(kernel_plan, "ROUTES", (mask_reference, *declared))
    dense, routed, routes = run_both("llava", "naavit+pai:alpha=0.5")
    assert_same(dense, routed)
    assert [routes[("prefill", layer)] for layer in range(LAYERS)] == ["mask_reference", "mask_reference", "dense",
                                                                       "dense"]
    assert [routes[("decode", layer)] for layer in range(LAYERS)] == ["sdpa", "sdpa", "group", "group"]
    monkeypatch.undo()
    assert kernel_plan.ROUTES is declared


def test_group_edit_with_output_scale_sampling():
    dense, routed, routes = run_both("llava", "pai:alpha=0.5+vhr", seed=0, do_sample=True)
    assert_same(dense, routed)
    assert [routes[("prefill", layer)] for layer in range(LAYERS)] == ["sdpa", "sdpa", "group+scale", "group+scale"]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_act_structured_form(family, monkeypatch):
    """ACT's per-head sink columns make one key group per head set; kernel 3 runs at most two such sets, which the
    tiny models exceed (so ACT takes the dense path there). Allowed anyway, its structured form on the reference
    equals the dense path."""
    _, _, routes = run_both(family, "act")
    assert "group" not in routes.values()
    monkeypatch.setattr(kernel_plan, "kernel_runs", lambda spec: True)
    dense, routed, routes = run_both(family, "act")
    assert_same(dense, routed)
    assert "group" in routes.values()


def test_structured_edits_are_asked_once_per_layer_for_decoding():
    calls = []

    @dataclass
    class CountingPAI(PAI):
        name = "counting_pai"

        def kernel_edit(self, layer, run, prefill):
            calls.append((prefill, layer))
            return super().kernel_edit(layer, run, prefill)

    model, processor = tiny_model("llava")
    batch = two_samples(processor)
    ve.wrap(model, [CountingPAI(alpha=0.5)])
    os.environ[ENV] = "reference"
    try:
        out = greedy(model, batch)
    finally:
        os.environ.pop(ENV)
        ve.unwrap(model)
    assert out.sequences.shape[1] - batch["input_ids"].shape[1] > 2  # several decoding steps
    asked = [(prefill, layer) for prefill in (False, True) for layer in range(LAYERS)]
    assert sorted(calls) == asked  # once per layer for the prefill, once per layer for all decoding steps


# ---- decisions without a model ---------------------------------------------------------------------------------------
def _group(spec, rows=None):
    return KernelEdit(spec=spec, groups=torch.zeros(1, 3, dtype=torch.long), rows=rows)


def test_compose_rules():
    pai, var = pai_groups(4, 0.5), var_groups(4)
    scale = KernelEdit(head_scale=torch.ones(1, 4))
    mask = KernelEdit(mask=MaskSpec.naavit())
    assert compose([], 4) == LayerPlan()
    assert compose([_group(pai)], 4).group.spec is pai
    assert compose([mask, scale], 4).mask == MaskSpec.naavit()
    assert compose([_group(var), scale], 4).scale is scale  # output scale after the redistribution: dense order
    assert compose([scale, _group(pai)], 4) is not None  # logits only: order does not matter
    assert compose([scale, _group(var)], 4) is None  # redistribution after an output scale
    assert compose([_group(pai), _group(var)], 4) is None  # two group edits
    assert compose([_group(pai), mask], 4) is None  # no kernel does both
    assert compose([mask, mask], 4) is None
    assert compose([_group(pai)], 8) is None  # heads differ
    assert compose([KernelEdit(mask=MaskSpec.naavit(), rows=torch.ones(1, 3, dtype=torch.bool))], 4) is None
    three = GroupSpec(4, 4, keep=[1.0, 0.5, 0.4, 0.3], receive=[1.0, 0.0, 0.0, 0.0], sink_group=1)
    assert not kernel_plan.kernel_runs(three) and compose([_group(three)], 4) is None


@pytest.mark.parametrize("heads", [4, 64])
def test_act_head_sets(heads):
    """ACT's structured form: a key's group is the set of heads in which it is a sink (group 0: none), groups in the
    order of the head sets read as binary numbers (head h = bit h), for any number of heads (64: beyond a bit code)."""
    sinks = torch.rand(2, heads, 30, generator=torch.Generator().manual_seed(0)) < 0.1
    edit = ACT(beta=0.4)._kernel_edit(sinks)
    in_heads = edit.spec.tables()[3] == 0.4  # keep [H, G]: beta in the group's heads
    assert torch.equal(in_heads[:, edit.groups].permute(1, 0, 2), sinks)
    assert not in_heads[:, 0].any() and edit.spec.sink_group == 1
    codes = [sum(1 << h for h in range(heads) if in_heads[h, g]) for g in range(in_heads.shape[1])]
    assert codes == sorted(set(codes))


@pytest.mark.parametrize("name", ["pai", "vaf", "var", "act"])
def test_dense_edit_is_the_kernel_reference(name):
    """A group edit's derived dense form (edits.dense_edit through the dense attention) computes what kernel 3's
    torch reference computes, on the edit's rows, with causal attention and a left-padded sample."""
    batch, heads, n, dim = 2, 4, 12, 8
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen) for _ in range(3))
    groups = torch.randint(0, 3, (batch, n), generator=gen)
    rows = torch.rand(batch, n, generator=gen) < 0.5
    spec = {"pai": pai_groups(heads, 0.5, num_groups=3), "vaf": vaf_groups(heads, [1.0, 1.2, 0.9], heads=[1, 3]),
            "var": var_groups(heads, p=0.6, rho=0.3, min_image_mass=0.1), "act": act_groups(heads, 0.4, 2, 3)}[name]
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, :3] = False
    positions = torch.arange(n).expand(batch, -1)
    context = AttentionContext(positions, positions, prefill=True, num_heads=heads)
    edit = dense_edit(KernelEdit(spec=spec, groups=groups, rows=rows), None, context)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = (causal & valid[:, None, :])[:, None]
    dense = edited_attention(q, k, v, mask, dim ** -0.5, [edit])
    reference = group_attention_reference(q, k, v, key_group=groups, spec=spec, key_valid=valid, scaling=dim ** -0.5,
                                          query_select=rows)
    real = valid[:, :, None, None]  # padding rows: blocked everywhere by the reference, unread by the model
    torch.testing.assert_close(dense * real, reference * real, atol=1e-6, rtol=1e-6)


def test_dense_edit_refuses_what_it_cannot_state():
    decoding = AttentionContext(torch.full((1, 1), 3), torch.arange(4)[None], prefill=False, num_heads=4)
    with pytest.raises(ValueError, match="prefill only"):
        dense_edit(KernelEdit(mask=MaskSpec.naavit()), None, decoding)
    with pytest.raises(ValueError, match="8 heads"):
        dense_edit(_group(pai_groups(8, 0.5)), None, decoding)
    with pytest.raises(ValueError, match="needs `groups`"):
        dense_edit(KernelEdit(spec=pai_groups(4, 0.5)), None, decoding)


def test_key_padding():
    q = kv = 5
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    causal = torch.ones(q, kv, dtype=torch.bool).tril()
    mask = (causal & valid[:, None, :])[:, None]
    assert key_padding(None, q, kv) == (True, None)
    ok, key_valid = key_padding(mask, q, kv)
    assert ok and torch.equal(key_valid, valid)
    padding_rows = mask.clone()
    padding_rows[0, 0, :2] = True  # rows of padding tokens may see anything: never read
    assert key_padding(padding_rows, q, kv)[0]
    ok, key_valid = key_padding(causal[None, None].expand(2, 1, q, kv), q, kv)
    assert ok and key_valid is None
    window = mask.clone()
    window[1, 0, 4, 0] = False  # a real row missing a key: not causal + padding
    assert not key_padding(window, q, kv)[0]
    additive = torch.zeros(2, 1, q, kv).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert key_padding(additive, q, kv)[0]
    ok, key_valid = key_padding(mask[:, :, -1:], 1, kv)  # a decoding row
    assert ok and torch.equal(key_valid, valid)


def test_backend_setting(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV, raising=False)
    assert kernel_backend(cpu) is None  # auto: the dense torch path off CUDA
    for mode, backend in (("off", None), ("reference", "reference"), ("triton", "triton"), ("auto", None)):
        monkeypatch.setenv(ENV, mode)
        assert kernel_backend(cpu) == backend
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ValueError, match="VLM_EFFICIENT_KERNELS"):
        kernel_backend(cpu)


# ---- the Triton kernels under the interpreter ------------------------------------------------------------------------
INTERPRETED = [("llava", "pai:alpha=0.5"), ("llava", "var:tau=2"), ("llava", OCR_HEADS), ("llava", "vhr"),
               ("llava", "naavit"), ("llava_next", "window"), ("llava", "knockout:edges=question-image/image-last"),
               ("qwen2_vl", "fastv:layer=2,ratio=0.5+vaf"), ("qwen2_vl", "visionzip+pai:alpha=0.5")]


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("JSON:")]
    assert lines, f"no result\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][5:])


# the fast path's decoding step: kernel 5 in its layers without edits, kernel 3's decoding form in PAI's, kernel 4 on
# PLPHP's per-head caches, kernel 5 with the head-averaged probabilities and kernel 6 in A-VL's
FAST_INTERPRETED = [("llava", ""), ("qwen2_vl", "fastv:layer=2,ratio=0.5+pai:alpha=0.5"), ("qwen2_vl", "plphp"),
                    ("llava", "avl:interval=2"), ("qwen2_vl", "fastv:layer=1+avl:interval=3,text_rate=0.5")]


@pytest.mark.parametrize("family,spec", FAST_INTERPRETED)
def test_triton_interpreter_fast_path_equals_sdpa_step(interpreted, family, spec):
    result = interpreted[f"fast {family} {spec}"]
    assert result["error"] is None, result["error"]
    assert result["same_tokens"] and result["max_diff"] < 1e-4, result
    assert result["kernel_5_layers"] > 0, result
    assert result["kernel_4_layers"] == (2 if "plphp" in spec else 0), result
    assert (result["observed_layers"] > 0) == ("avl" in spec), result


@pytest.mark.parametrize("family,spec", INTERPRETED)
def test_triton_interpreter_equals_dense(interpreted, family, spec):
    result = interpreted[f"{family} {spec}"]
    assert result["error"] is None, result["error"]
    assert result["same_tokens"] and result["max_diff"] < 1e-4, result
    assert set(result["routes"]) - {"sdpa"}, result  # a kernel ran


def _interpreter_main() -> None:
    """TRITON_INTERPRET=1: every INTERPRETED case with VLM_EFFICIENT_KERNELS=triton against the dense path."""
    results = {}
    for family, spec in INTERPRETED:
        try:
            dense, routed, routes = run_both(family, spec, mode="triton")
            diff = float((torch.stack(routed.logits) - torch.stack(dense.logits)).abs().max())
            results[f"{family} {spec}"] = {"error": None, "same_tokens": torch.equal(dense.sequences, routed.sequences),
                                           "max_diff": diff, "routes": sorted(set(routes.values()))}
        except Exception as error:  # reported by the test
            results[f"{family} {spec}"] = {"error": f"{type(error).__name__}: {error}"}
    for family, spec in FAST_INTERPRETED:
        try:
            results[f"fast {family} {spec}"] = _fast_both(family, spec)
        except Exception as error:  # reported by the test
            results[f"fast {family} {spec}"] = {"error": f"{type(error).__name__}: {error}"}
    print("JSON:" + json.dumps(results))


def _fast_both(family, spec) -> dict:
    """The fast path with the kernels off (SDPA in the step) and on (Triton under the interpreter)."""
    from vlm_efficient.fast_attention import MaskedDecodeRoute, RaggedRoute

    model, processor = tiny_model(family)
    batch = two_samples(processor)
    ve.wrap(model, spec, fast=True)
    try:
        os.environ[ENV] = "off"
        sdpa = greedy(model, batch)
        os.environ[ENV] = "triton"
        routed = greedy(model, batch)
        routes = ve.engine_of(model).fast_path.last_step.routes.values()
    finally:
        os.environ.pop(ENV, None)
        ve.unwrap(model)
    diff = float((torch.stack(routed.logits) - torch.stack(sdpa.logits)).abs().max())
    return {"error": None, "same_tokens": torch.equal(sdpa.sequences, routed.sequences), "max_diff": diff,
            "kernel_5_layers": sum(isinstance(route, MaskedDecodeRoute) for route in routes),
            "kernel_4_layers": sum(isinstance(route, RaggedRoute) and route.kernel for route in routes),
            "observed_layers": sum(isinstance(route, MaskedDecodeRoute) and bool(route.observers) for route in routes)}


if __name__ == "__main__":
    _interpreter_main()
