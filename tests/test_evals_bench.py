"""`vlm-efficient bench` and `sweep`, and the random-weight 7B architectures."""

import json

import pytest
import torch

from vlm_efficient.cli import main
from vlm_efficient.evals.bench_summary import summary
from vlm_efficient.evals.archs import ARCHS, DEFAULT_IMAGE_SIZE, arch_on_meta, build_arch
from vlm_efficient.evals.sweep import specs_for

# Parameter counts of the released checkpoints (vision tower + projector + language model).
PARAMS_B = {"llava-1.5-7b": 7.063, "llava-next-7b": 7.063, "qwen2-vl-7b": 8.291, "qwen2.5-vl-7b": 8.292,
            "gemma3-4b": 4.315}  # gemma3-4b: counted from the published config's shapes (its card rounds to 4.3 B)
# LLM image tokens of one image at DEFAULT_IMAGE_SIZE (LLaVA-NeXT at 672 px: 576 base + 2x2 tiles of 576 cropped
# to the image and 48 row newlines)
IMAGE_TOKENS = {"llava-1.5-7b": 576, "llava-next-7b": 2928, "qwen2-vl-7b": 576, "qwen2.5-vl-7b": 576,
                "gemma3-4b": 256}


@pytest.mark.parametrize("name", ARCHS)
def test_arch_shapes_on_meta(name):
    from vlm_efficient.models import build_prompt
    from vlm_efficient.testing import tiny_image

    model, processor = arch_on_meta(name)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(PARAMS_B[name], abs=0.002)
    size = DEFAULT_IMAGE_SIZE[name]
    inputs = processor(images=[tiny_image(0, (size, size))], text=[build_prompt(processor, "hi")], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == IMAGE_TOKENS[name]
    small, _ = arch_on_meta(name, layers=2)
    assert small.config.get_text_config().num_hidden_layers == 2


def test_build_arch_materialises_random_weights():
    # the smallest real shapes: LLaVA-1.5-7B with one decoder and one vision layer (0.5 B parameters)
    model, processor = build_arch("llava-1.5-7b", layers=1, dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" for p in model.parameters())
    text = model.model.language_model
    assert text.rotary_emb.inv_freq.dtype == torch.float32 and text.rotary_emb.inv_freq[0] == 1.0
    assert 0.015 < text.layers[0].mlp.up_proj.weight.float().std() < 0.025
    assert (text.norm.weight == 1).all() and torch.isfinite(model.lm_head.weight).all()
    with pytest.raises(ValueError, match="unknown architecture"):
        arch_on_meta("llava-13b")


def test_bench_cli_tiny(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--model", "tiny:llava", "--methods", "fastv:layer=2,ratio=0.5;fastv:layer=2,ratio=0.75",
            "--repeats", "1", "--max-new-tokens", "4", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "| fastv:layer=2,ratio=0.75 | 4 / 16 |" in capsys.readouterr().out
    result = json.loads((out / "bench.json").read_text())
    base, half = result["runs"]["base"], result["runs"]["fastv:layer=2,ratio=0.5"]
    assert base["prefill_speedup"] == 1.0 and base["kv_ratio"] == 1.0
    assert half["visual_tokens_kept"] == 8 and half["kv_ratio"] < 1 and half["flops_ratio"] < 1
    for key in ("prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_memory_bytes", "kv_cache_bytes", "prefill_flops"):
        assert half[key] > 0, key
    assert (out / "bench.png").stat().st_size > 1000 and (out / "bench.md").exists()
    # the summary's FLOP-allowed share counts the vision tower the timed prefill runs
    assert result["vision_flops"] > 0
    (tmp_path / "runs").mkdir()
    out.rename(tmp_path / "runs" / "tiny:llava_prune_auto")
    allowed = (half["prefill_flops"] + result["vision_flops"]) / (base["prefill_flops"] + result["vision_flops"])
    lines = summary(tmp_path / "runs").splitlines()
    row = next(line for line in lines if line.startswith("| fastv:layer=2,ratio=0.5 |"))
    assert f"| {allowed:.2f} |" in row and f"| {half['prefill_speedup'] * allowed:.0%} |" in row
    assert main(["bench", "--model", "tiny:llava", "--layers", "2"]) == 2
    assert "--layers applies to the random architectures" in capsys.readouterr().err


def test_sweep_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLM_EFFICIENT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    args = ["sweep", "--model", "tiny:llava", "--methods", "fastv:layer=2", "--ratios", "0.5,0.75",
            "--tasks", "testbed_pope,testbed_vqa", "--limit", "4", "--batch-size", "4", "--max-new-tokens", "2",
            "--output", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    table = json.loads((out / "sweep.json").read_text())
    assert [r["methods"] for r in table["rows"]] == ["base", "fastv:layer=2,ratio=0.5", "fastv:layer=2,ratio=0.75"]
    assert [r["visual_tokens_kept"] for r in table["rows"]] == [16, 8, 4]
    assert table["main_metric"] == {"testbed_pope": "f1", "testbed_vqa": "accuracy"}
    for name in ("sweep.md", "accuracy_vs_tokens.png", "latency_vs_accuracy.png", "base/results.json"):
        assert (out / name).exists(), name
    assert "| fastv:layer=2,ratio=0.75 |" in capsys.readouterr().out
    assert specs_for(["fastv", "pool:size=2", "random:ratio=0.3"], [0.5, 0.9]) == (
        ["", "fastv:ratio=0.5", "fastv:ratio=0.9", "pool:size=2", "random:ratio=0.3"], {})  # fmt: skip
    with pytest.raises(ValueError, match="unknown parameter 'ratios'"):
        specs_for(["fastv:ratios=2"], [0.5])
    bad = ["sweep", "--model", "tiny:llava", "--methods", "fastv:layer=2", "--ratios", "0.5,1.5", "--tasks",
           "testbed_pope", "--output", str(tmp_path / "bad")]  # fmt: skip
    assert main(bad) == 2  # every spec is checked before the first run
    assert "ratio" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_sync_report_counts_the_package_sites(monkeypatch):
    """sync_report attributes each synchronizing-call warning (what torch.cuda.set_sync_debug_mode("warn") emits) to
    the package line that led to it; here a fake one from RunState.row_counts, which the engine asks at each layer."""
    import warnings

    import vlm_efficient as ve
    from vlm_efficient import engine
    from vlm_efficient.evals import sync_report
    from vlm_efficient.evals.runner import describe_inputs
    from vlm_efficient.evals.runner import load_eval_model

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    plain = engine.RunState.row_counts

    def syncing(self):
        warnings.warn("called a synchronizing CUDA operation")
        return plain(self)

    monkeypatch.setattr(engine.RunState, "row_counts", syncing)
    model, processor = load_eval_model("tiny:llava")
    inputs = describe_inputs(processor, 336, 2, model)
    ve.wrap(model, "fastv:layer=2,ratio=0.5")
    try:
        sites = sync_report.sync_sites(model, inputs, 3, cuda=True)
    finally:
        ve.unwrap(model)
    assert not sites["decode"] and sum(sites["prefill"].values()) >= 1, sites
    # the engine's layer hook records each layer (RunState.enter_layer), which asks row_counts
    assert all(site.startswith("run_state.py:") and "<- hooks.py:" in site for site in sites["prefill"]), sites


@pytest.mark.parametrize("spec", ["fastv:layer=2,ratio=0.5", "pdrop", "dart", "visionzip", "pai", "vaf", "var:tau=1",
                                  "plphp:layer=1"])
def test_decoding_steps_read_nothing_on_the_host(monkeypatch, spec):
    """The engine's decoding steps never read a device value on the host (each read is a GPU sync, and decoding is
    host-bound): on CPU, sync_report counts those reads through a TorchFunctionMode; with the kernels' routing
    (reference backend) the package's reads in decoding must not grow with the number of steps (PLPHP builds its
    per-head cache once, at the first step)."""
    import vlm_efficient as ve
    from vlm_efficient.evals import sync_report
    from vlm_efficient.evals.runner import describe_inputs
    from vlm_efficient.evals.runner import load_eval_model

    monkeypatch.setenv("VLM_EFFICIENT_KERNELS", "reference")
    model, processor = load_eval_model("tiny:llava")
    inputs = describe_inputs(processor, 336, 2, model)
    ve.wrap(model, spec)
    try:
        reads = [sync_report.sync_sites(model, inputs, n)["decode"] for n in (3, 6)]
    finally:
        ve.unwrap(model)
    package = [sum(c for site, c in r.items() if site != "(outside)") for r in reads]
    assert package[0] == package[1], reads
    assert reads[1]["(outside)"] > reads[0]["(outside)"]  # the counter sees generate()'s own per-step reads


@pytest.mark.parametrize("spec, expected",
                         [("fastv:layer=2,ratio=0.5", 0), ("pdrop", 0), ("dart", 0), ("visionzip", 0)])
def test_pruning_reads_the_host_only_for_counts_it_cannot_know(monkeypatch, spec, expected):
    """At prefill, batch 2, a pruning method reads the device on the host once per pruning layer (the kept counts,
    which size the shrunk tensors) unless the host knows them (Selection.visual_kept): FastV, PyramidDrop and DART
    keep a number of image tokens set by the layout's counts, VisionZip on untiled images one set by the vision
    tower's grid size. Beyond that only the layout, built before the vision tower has queued any GPU work. A batch-1
    prefill of a 7B model is host-bound (evals/README.md): every mid-forward read stalls the host until the GPU
    drains."""
    import vlm_efficient as ve
    from vlm_efficient.evals import sync_report
    from vlm_efficient.evals.runner import describe_inputs
    from vlm_efficient.evals.runner import load_eval_model

    monkeypatch.setenv("VLM_EFFICIENT_KERNELS", "reference")
    model, processor = load_eval_model("tiny:llava")
    inputs = describe_inputs(processor, 336, 2, model)
    ve.wrap(model, spec)
    try:
        reads = sync_report.sync_sites(model, inputs, 2)["prefill"]
    finally:
        ve.unwrap(model)
    package = {site: count for site, count in reads.items() if site != "(outside)"}
    outside_layout = sum(count for site, count in package.items() if not site.startswith("layout.py"))
    assert outside_layout == expected, package


def test_host_read_detection():
    from vlm_efficient.evals.sync_report import reads_host

    x = torch.arange(4)
    assert reads_host(torch.Tensor.__bool__, (x,), {}) and reads_host(torch.Tensor.__getitem__, (x, x > 1), {})
    assert not reads_host(torch.Tensor.__getitem__, (x, x), {}) and not reads_host(torch.where, (x > 1, x, x), {})
    assert reads_host(torch.where, (x > 1,), {}) and reads_host(torch.repeat_interleave, (x, x), {})
    assert not reads_host(torch.repeat_interleave, (x, x), {"output_size": 6})


def test_profile_counts_ops_and_syncs_per_phase():
    from vlm_efficient.evals.bench import format_profile, profile_spec
    from vlm_efficient.evals.runner import describe_inputs
    from vlm_efficient.evals.runner import load_eval_model

    model, processor = load_eval_model("tiny:llava")
    inputs = describe_inputs(processor, 336, 2, model)
    profiles = {name: profile_spec(model, inputs, spec) for name, spec in (("base", ""), ("fastv", "fastv:layer=2"))}
    for phases in profiles.values():
        assert phases["generate"]["aten_ops"] > phases["prefill"]["aten_ops"] > 0
        assert phases["generate"]["syncs"] >= phases["prefill"]["syncs"] > 0
    assert profiles["fastv"]["prefill"]["syncs"] > profiles["base"]["prefill"]["syncs"]  # the pruning step's reads
    assert format_profile(profiles).count("\n") == 1 + 4


def test_host_overhead_times_every_method_against_the_base(tmp_path):
    """evals/host_overhead.py: LLaVA-1.5-7B's depth at tiny widths on CPU, base first, ratios to it, JSON + table."""
    import json

    from vlm_efficient.evals.host_overhead import host_overhead

    result = host_overhead(["fastv:layer=2,ratio=0.5"], repeats=1, rounds=1, new_tokens=2, output=tmp_path)
    runs = result["runs"]
    assert list(runs) == ["base", "fastv:layer=2,ratio=0.5"]
    assert runs["base"]["prefill_ratio"] == 1 and runs["base"]["decode_ratio"] == 1
    assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in runs.values())
    assert json.loads((tmp_path / "host_overhead.json").read_text())["runs"].keys() == runs.keys()
    assert "| fastv:layer=2,ratio=0.5 |" in (tmp_path / "host_overhead.md").read_text()


def test_bench_cli_video_clips(tmp_path, capsys):
    """--video-frames: each sample of a left-padded batch is a synthetic clip (Qwen: 8 frames of 56 px -> 4 temporal
    steps of 2x2 merged tokens); DyCoke merges across frames; the tower's FLOPs count the clip; an image-only model
    refuses it with the fix."""
    out = tmp_path / "bench"
    args = ["bench", "--model", "tiny:qwen2_vl", "--video-frames", "8", "--image-size", "56", "--batch-size", "2",
            "--methods", "dycoke:ratio=0.75", "--repeats", "1", "--max-new-tokens", "3", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "8-frame clip of 56 px, a clip of 4 temporal steps of 56x56 px" in capsys.readouterr().out
    result = json.loads((out / "bench.json").read_text())
    base, merged = result["runs"]["base"], result["runs"]["dycoke:ratio=0.75"]
    assert base["visual_tokens_kept"] == 16 and merged["visual_tokens_kept"] < 16 and merged["flops_ratio"] < 1
    assert result["video_frames"] == 8 and result["vision_flops"] > 0
    assert main(["bench", "--model", "tiny:llava", "--video-frames", "4"]) == 2
    assert "takes no videos" in capsys.readouterr().err


def test_vision_flops_count_the_tower_and_projector():
    """The FLOP-allowed speed-up counts the vision tower and projector the timed prefill also runs: on the meta
    device, LLaVA-1.5-7B's count equals CLIP-L/336's hand count (24 layers on 577 tokens, patch convolution,
    two-layer projector on 576) per image."""
    from vlm_efficient.evals.bench import arch_vision_flops

    n, d, f, text = 577, 1024, 4096, 4096
    layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * f  # q, k, v, o; scores and values; MLP
    conv = 2 * (n - 1) * (3 * 14 * 14) * d
    projector = 2 * (n - 1) * (d * text + text * text)
    assert arch_vision_flops("llava-1.5-7b", 2, 336) == 2 * (24 * layer + conv + projector)
