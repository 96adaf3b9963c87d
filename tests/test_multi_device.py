"""A wrapped model placed by accelerate (device_map, disk offload, cpu_offload) and sharded by transformers' tensor
parallelism (tp_plan under torchrun), on CPU: every method keeps the tokens, logits and kept sets of the model on
one device, and unwrap leaves accelerate's placement in place.

On CPU every device is the CPU, so these tests check the big-model hooks' path (the layers' AlignDevicesHook moving
inputs, weights on the meta device between calls, loaded at each forward), not transfers between devices:
tests/test_gpu.py splits the same models between cuda:0 and the CPU. The tensor-parallel test runs two gloo
processes under torchrun (tests/tp_check.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from accelerate.hooks import AlignDevicesHook

import vlm_efficient as ve
from test_engine import greedy, two_samples
from test_gpu import assert_same_up_to_near_ties, exact_fp32  # noqa: F401 (a fixture)
from vlm_efficient.testing import save_tiny, tiny_model

# the methods the issue names, with the layer counts of the tiny models (4 layers)
SPECS = ["fastv:layer=2,ratio=0.5", "visionzip", "pdrop:layers=1/2/3", "pai", "var:tau=2", "naavit", "plphp",
         "dart:layer=2,ratio=0.5"]  # fmt: skip
FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen3_vl"]


def device_map(model, place_layer) -> dict[str, str]:
    """Every part of the VLM on "cpu", decoder layer i on place_layer(i)."""
    text = model.model.language_model
    parts = [name for name, _ in model.model.named_children()] + [name for name, _ in model.model.named_parameters(
        recurse=False)]  # llava_next's image_newline  # fmt: skip
    placement = {f"model.{name}": "cpu" for name in parts if name != "language_model"}
    placement |= {f"model.language_model.{name}": "cpu" for name, _ in text.named_children() if name != "layers"}
    placement |= {f"model.language_model.layers.{i}": place_layer(i) for i in range(len(text.layers))}
    return placement | {"lm_head": "cpu"}


def place(model, how: str, tmp_path):
    """`model` under accelerate's hooks: "cpu" (device_map over cpu, hooks forced), "disk" (layers 2, 3 offloaded
    to disk, loaded at each forward), "cpu_offload" (every weight on the meta device between calls)."""
    if how == "cpu_offload":
        return cpu_offload(model, execution_device="cpu")
    layers = (lambda i: "disk" if i >= 2 else "cpu") if how == "disk" else (lambda i: "cpu")
    return dispatch_model(model, device_map=device_map(model, layers), force_hooks=True, offload_dir=str(tmp_path))


def hooked_layers(model) -> int:
    return sum(isinstance(getattr(m, "_hf_hook", None), AlignDevicesHook) for m in model.modules())


def run(model, batch, spec):
    ve.wrap(model, spec)
    try:
        out = greedy(model, batch)
        return out, ve.stats(model).tokens_per_layer_per_sample
    finally:
        ve.unwrap(model)


@pytest.mark.parametrize("how", ["disk", "cpu_offload"])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("family", FAMILIES)
def test_methods_on_a_dispatched_model_match_one_device(family, spec, how, tmp_path):
    """Batch of two with left padding, generate(): tokens, logits and kept rows per layer equal the undispatched
    run's; unwrap keeps accelerate's hooks and gives the plain model's tokens back."""
    if how == "cpu_offload" and family == "llava_next":
        pytest.skip("cpu_offload leaves LlavaNextModel.image_newline, a parameter read outside any submodule's "
                    "forward, on the meta device: the unwrapped model fails the same way (use device_map)")
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    reference, kept = run(model, batch, spec)
    plain = greedy(model, batch).sequences
    model = place(model, how, tmp_path)
    hooks = hooked_layers(model)
    assert hooks > 0
    if how == "cpu_offload":
        assert next(model.model.language_model.layers[0].parameters()).device.type == "meta"
    out, dispatched_kept = run(model, batch, spec)
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(reference.logits), rtol=0, atol=0)
    assert dispatched_kept == kept
    assert hooked_layers(model) == hooks
    assert torch.equal(greedy(model, batch).sequences, plain)


def test_from_pretrained_with_a_disk_offload_device_map(tmp_path):
    """The user's path: from_pretrained(device_map=...) with layers offloaded to disk, then wrap."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    save_tiny("qwen2_vl", tmp_path / "model")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "model", dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    batch = two_samples(processor)
    reference, kept = run(model, batch, "fastv:layer=2,ratio=0.5")
    offloaded = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "model", dtype=torch.float32, device_map=device_map(model, lambda i: "disk" if i >= 2 else "cpu"),
        offload_folder=str(tmp_path / "offload"),
    )
    assert next(offloaded.model.language_model.layers[3].parameters()).device.type == "meta"
    out, offloaded_kept = run(offloaded, batch, "fastv:layer=2,ratio=0.5")
    assert torch.equal(out.sequences, reference.sequences)
    assert offloaded_kept == kept


def test_layer_inputs_are_built_on_the_layers_execution_device():
    """The engine reads the layer's device from accelerate's hook, not from the hidden states it is handed."""
    from vlm_efficient.placement import execution_device

    layer = torch.nn.Linear(2, 2)
    assert execution_device(layer, torch.device("cpu")) == torch.device("cpu")
    from accelerate.hooks import add_hook_to_module

    add_hook_to_module(layer, AlignDevicesHook(execution_device="meta"))
    assert execution_device(layer, torch.device("cpu")) == torch.device("meta")


# ---- tensor parallelism -------------------------------------------------------------------------------------------
TP_SPECS = ["fastv:layer=2,ratio=0.5", "visionzip", "pdrop:layers=1/2/3", "pai", "var:tau=2", "naavit",
            "dart:layer=2,ratio=0.5"]  # fmt: skip


def torchrun(script_args: list[str], tmp_path, nproc: int = 2) -> list[dict]:
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("torchrun is not installed")
    out = tmp_path / "tp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "--nproc-per-node", str(nproc), "--standalone",
           os.path.join(os.path.dirname(__file__), "tp_check.py"), "--out", str(out), *script_args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_tensor_parallel_keeps_the_single_process_run(family, tmp_path):
    """Two gloo ranks, tp_plan='auto': each rank holds half the heads, and every method's tokens, logits and kept
    rows equal the single-process run's (the methods see all heads: placement.HeadShards)."""
    save_tiny(family, tmp_path / "model")
    single = torchrun(["--model", str(tmp_path / "model"), "--specs", *TP_SPECS, "--single"], tmp_path, nproc=1)[0]
    ranks = torchrun(["--model", str(tmp_path / "model"), "--specs", *TP_SPECS], tmp_path)
    assert ranks[0]["local_heads"] == ranks[1]["local_heads"] == single["local_heads"] // 2
    for spec in ["", *TP_SPECS]:
        for rank in ranks:
            assert rank[spec]["tokens"] == single[spec]["tokens"], spec
            assert rank[spec]["kept"] == single[spec]["kept"], spec
            torch.testing.assert_close(torch.tensor(rank[spec]["logits"]), torch.tensor(single[spec]["logits"]),
                                       rtol=1e-4, atol=1e-4)  # fmt: skip


def test_tensor_parallel_refuses_what_cannot_run_sharded(tmp_path):
    """Methods keeping per-head state outside the attention call, and a plan not sharding o_proj by heads."""
    save_tiny("llava", tmp_path / "model")
    ranks = torchrun(["--model", str(tmp_path / "model"), "--refusals", "plphp", "vhr", "equal_distance"], tmp_path)
    for rank in ranks:
        assert "per-head pruned KV cache" in rank["refused"]["plphp"]
        assert "o_proj" in rank["refused"]["vhr"]
        assert "pre-rotary" in rank["refused"]["equal_distance"]
        assert "row-wise (by heads)" in rank["refused"]["o_proj by rows"]


# ---- on GPUs (skipped without CUDA; tests/multi_gpu.sh runs them on a two-GPU machine) ------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def split_map(model, first, second) -> dict:
    """Everything on `first`, decoder layers 2 and 3 on `second`."""
    placement = device_map(model, lambda i: second if i >= 2 else first)
    return {name: second if name.endswith((".2", ".3")) else first for name in placement}


@needs_cuda
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("family", FAMILIES)
def test_split_between_cuda_and_cpu_matches_the_cpu_run(family, spec, exact_fp32):
    """Layers 0-1 on cuda:0, 2-3 on the CPU: the CPU run's kept rows, and its tokens up to near ties."""
    model, processor = tiny_model(family)
    batch = two_samples(processor)
    reference, kept = run(model, batch, spec)
    model = dispatch_model(model, device_map=split_map(model, 0, "cpu"))
    out, split_kept = run(model, batch.to("cuda"), spec)
    assert split_kept == kept
    assert_same_up_to_near_ties(reference, out)


@needs_two_gpus
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("family", FAMILIES)
def test_split_across_two_gpus_matches_one_gpu(family, spec, exact_fp32):
    """Layers 0-1 on cuda:0, 2-3 on cuda:1: the tokens, logits and kept rows of the model on cuda:0 alone."""
    model, processor = tiny_model(family)
    batch = two_samples(processor).to("cuda:0")
    model.to("cuda:0")
    reference, kept = run(model, batch, spec)
    model = dispatch_model(model, device_map=split_map(model, 0, 1))
    out, split_kept = run(model, batch, spec)
    assert split_kept == kept
    assert torch.equal(out.sequences.cpu(), reference.sequences.cpu())
    torch.testing.assert_close(torch.stack(out.logits).cpu(), torch.stack(reference.logits).cpu(), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


class CrossDeviceCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the copies of a tensor from one device to another."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = out if func is torch.ops.aten._to_copy.default else args[0]
            self.count += source.device != target.device
        return out


@needs_cuda
@pytest.mark.parametrize("spec", ["fastv:layer=2,ratio=0.5", "pdrop:layers=1/2/3", "naavit", "var:tau=2"])
def test_tensors_move_only_where_the_layers_device_changes(spec):
    """Split at layer 2 (cuda:0 | cpu): the wrapped model copies no more tensors between devices than the unwrapped
    one, which accelerate hands the same masks and rotary tables to every CPU layer (the engine builds a layer's
    inputs once per device: placement.execution_device)."""
    model, processor = tiny_model("llava")
    model = dispatch_model(model, device_map=split_map(model, 0, "cpu"))
    batch = two_samples(processor).to("cuda")
    counts = {}
    for wrapped in (False, True):
        if wrapped:
            ve.wrap(model, spec)
        with CrossDeviceCopies() as copies:
            greedy(model, batch)
        counts[wrapped] = copies.count
        if wrapped:
            ve.unwrap(model)
    assert 0 < counts[True] <= counts[False], counts


def test_tensor_parallel_refuses_a_family_whose_plan_leaves_the_layers_whole(tmp_path):
    """Qwen3-VL's plan in transformers shards only embed_tokens and lm_head."""
    save_tiny("qwen3_vl", tmp_path / "model")
    for rank in torchrun(["--model", str(tmp_path / "model"), "--no-plan"], tmp_path):
        assert rank["local_heads"] == 4
        assert "no decoder layer" in rank["refused"]["no plan"] and "device_map" in rank["refused"]["no plan"]
