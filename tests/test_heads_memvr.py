"""MemVR on every family: generate() with the KV cache on a left-padded batch against a slow reference written after
the authors' code (memvr.py), run on each sample alone, cache-free, one forward call per decoding step."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import vlm_efficient as ve
from reference import extend_inputs
from test_engine import greedy, two_samples
from test_heads_interventions import samples_alone
from vlm_efficient.heads.memvr import MemVR, retracing_events
from vlm_efficient.testing import FAMILIES, tiny_model

SPEC = "memvr:starting_layer=0,ending_layer=3,retracing_ratio=0.3"


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@contextlib.contextmanager
def recorded_layers(model):
    """Every decoder layer's output and the inputs_embeds of the language model, per forward."""
    adapter = ve.get_adapter(model)
    seen = {"out": {}}

    def grab_embeds(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    def grab(idx):
        def hook(module, args, output):
            seen["out"][idx] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [adapter.text_model(model).register_forward_pre_hook(grab_embeds, with_kwargs=True)]
    handles += [layer.register_forward_hook(grab(i)) for i, layer in enumerate(adapter.decoder_layers(model))]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def retrace(model, decisions, z, ratio):
    """The code's LlamaMLP with adpt_sign = 1, row groups at a time: decisions = [(layer, rows)], one per call whose
    entropy triggered; the means run over that call's rows (batch 1: all its rows)."""
    layers = ve.get_adapter(model).decoder_layers(model)
    handles = []
    for layer, rows in decisions:
        mlp = layers[layer].mlp

        def hook(module, args, output, rows=rows, mlp=mlp):
            x = args[0][:, rows]
            w1 = mlp.up_proj.weight.abs().mean() / z.abs().mean() * z  # adpt_w1, as the code initialises it
            w2 = mlp.down_proj.weight.abs().mean() / z.abs().mean() * z.T  # adpt_w2
            adapter_out = torch.matmul(torch.matmul(x, w1.T), w2.T)
            ffn_out = output[:, rows]
            norm_adapter_out = ffn_out.abs().mean() / adapter_out.abs().mean() * adapter_out
            output = output.clone()
            output[:, rows] = ffn_out * (1 - ratio) + norm_adapter_out * ratio
            return output

        handles.append(mlp.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def memvr_reference(model, batch, sequence, steps, start, end, threshold, ratio):
    """Logits [steps, V] of one sample (batch 1, no padding) teacher-forced on `sequence` [1, T]: at each call the
    entropy after layers start < l < end of the newest row, as the code computes it, decides the retracing layer."""
    prompt = batch["input_ids"].shape[1]
    lm_head, norm = model.get_output_embeddings(), ve.get_adapter(model).text_model(model).norm
    image = (batch["input_ids"][0] == model.config.image_token_id)
    decisions, logits, z = [], [], None
    for step in range(steps):
        inputs = extend_inputs(batch, sequence[:, : prompt + step])
        rows = list(range(prompt)) if step == 0 else [prompt + step - 1]
        with recorded_layers(model) as seen, retrace(model, decisions, z, ratio), torch.no_grad():
            model(**inputs, use_cache=False)
        z = seen["embeds"][0, image] if z is None else z
        for layer in range(len(seen["out"])):
            with torch.no_grad():
                top = lm_head(norm(seen["out"][layer]))[:, -1].float()
            probs = top.topk(10).values.softmax(-1)
            entropy = float((-probs * probs.log()).sum() / math.log(10))
            if entropy > threshold and start < layer < end:
                decisions.append((layer + 1, rows))
                break
        with retrace(model, decisions, z, ratio), torch.no_grad():
            logits.append(model(**inputs, use_cache=False).logits[0, -1])
    return torch.stack(logits), decisions


@pytest.mark.parametrize("threshold", [0.0, 0.9])  # 0.9: some calls skip, some retrace at layer 3 instead of 2
def test_memvr_matches_the_codes_reference(family, threshold):
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    plain = greedy(model, batch)
    ve.wrap(model, f"{SPEC},entropy_threshold={threshold}")
    out = greedy(model, batch)
    run, method = ve.engine_of(model).run, ve.engine_of(model).methods[0]
    ve.unwrap(model)
    logits = torch.stack(out.logits, 1)
    events = retracing_events(run, method)
    seen_decisions = []
    for b, alone in enumerate(samples_alone(processor)):
        real = batch["attention_mask"][b].bool()
        sequence = torch.cat([out.sequences[b, : real.shape[0]][real], out.sequences[b, real.shape[0]:]])[None]
        reference, decisions = memvr_reference(model, alone, sequence, logits.shape[1], 0, 3, threshold, 0.3)
        torch.testing.assert_close(logits[b], reference, atol=1e-4, rtol=1e-4)
        assert sum(counts[b] for counts in events.values()) == len(decisions)
        seen_decisions += decisions
    assert seen_decisions, "no retracing happened: the test cannot fail"
    assert (logits - torch.stack(plain.logits, 1)).abs().max() > 1e-3


def test_memvr_default_layers_scale_with_depth():
    model, _ = tiny_model("llava", num_layers=6)
    ve.wrap(model, "memvr")
    method = ve.engine_of(model).methods[0]
    assert isinstance(method, MemVR) and list(method.checked) == [2]  # layers 5..16 of 32 -> 1..3 of 6
    ve.unwrap(model)


@pytest.mark.parametrize("spec, message", [
    ("memvr:entropy_threshold=2", "entropy_threshold"),
    ("memvr:retracing_ratio=-0.1", "retracing_ratio"),
    ("memvr:starting_layer=1,ending_layer=2", "starting_layer \\+ 2"),
    ("memvr:starting_layer=0,ending_layer=9", "ending_layer"),
    ("memvr", "starting_layer"),  # 4 layers: 5..16 of 32 scale to 1..2, no layer in between
])
def test_memvr_bad_parameters(spec, message):
    model, _ = tiny_model("llava")
    with pytest.raises(ValueError, match=message):
        ve.wrap(model, spec)
    assert not ve.is_wrapped(model)


def test_memvr_refuses_the_fast_path():
    model, processor = tiny_model("llava")
    ve.wrap(model, SPEC, fast=True)
    with pytest.raises(ValueError, match="fast=True"):
        greedy(model, two_samples(processor))
    ve.unwrap(model)
