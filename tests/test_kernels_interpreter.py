"""The Triton kernels on CPU through Triton's interpreter, against the torch references.

TRITON_INTERPRET=1 has to be set before triton is imported, so the checks (vlm_efficient/evals/kernel_checks.py, tiny
shapes) run once in a subprocess and each test below asserts one kernel's share of the results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SECTIONS = ["plain", "masked", "stats", "group", "group_decode", "masked_decode", "key_sets", "ragged"]


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "vlm_efficient.evals.kernel_checks", "--size", "tiny", "--device", "cpu",
                           "--json", "--only", *SECTIONS], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("JSON:")]
    assert lines, f"checks produced no result\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][5:])


def _section(results, prefixes):
    return [r for r in results if any(r[0].startswith(p) for p in prefixes)]


@pytest.mark.parametrize("section,prefixes", [
    ("plain", ["plain"]),
    ("masked", ["masked"]),
    ("stats", ["stats"]),
    ("group", ["group "]),
    ("group_decode", ["group_decode"]),
    ("masked_decode", ["masked_decode"]),
    ("key_sets", ["key_sets"]),
    ("ragged", ["ragged"]),
])
def test_kernel_matches_reference_in_interpreter(results, section, prefixes):
    mine = _section(results, prefixes)
    checks = [r for r in mine if not r[0].endswith(" time")]
    assert checks, f"no checks ran for {section}"
    failed = [f"{name}: {detail}" for name, ok, detail in mine if not ok]
    assert not failed, "\n".join(failed)


def test_negative_checks_ran(results):
    names = [r[0] for r in results]
    assert any("(negative)" in n for n in names if n.startswith("masked"))
    assert any("(negative)" in n for n in names if n.startswith("stats"))
    assert any(n.startswith("masked_decode (negative) head_mean") for n in names)
    assert any("(negative)" in n for n in names if n.startswith("key_sets"))


def smoke_bench_rows(tmp_path, section: str) -> list[dict]:
    """The rows of one kernel_bench section run with --smoke (the interpreter, tiny shapes, no timing)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "vlm_efficient.evals.kernel_bench", "--smoke", "--sections", section,
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in json.loads((tmp_path / "bench.json").read_text())["rows"] if r["section"] == section]
    assert rows
    return rows


def test_kernel_bench_compares_the_masked_decode_with_transformers_sdpa_route(tmp_path):
    """kernel_bench's k5 section (--smoke: the interpreter, tiny shapes, no timing): each row reports the kernel,
    transformers' SDPA route with the boolean mask and SDPA without a mask, and both routes' errors."""
    for row in smoke_bench_rows(tmp_path, "k5"):
        assert {"graph_ms", "hf_masked_graph_ms", "sdpa_unmasked_graph_ms", "eager", "hf_masked_eager"} <= set(row)
        assert row["rel_err"] < 1.5e-2 and row["hf_rel_err"] < 1.5e-2, row
    assert "Kernel 5: masked decode" in (tmp_path / "bench.md").read_text()


def test_kernel_bench_times_avl_decoding_layer_three_ways(tmp_path):
    """kernel_bench's k6 section (--smoke): A-VL's layer on kernel 5 with probabilities and kernel 6 against plain
    kernel 5 and its previous dense form; from the same state both forms give the same output (bf16) and key sets."""
    for row in smoke_bench_rows(tmp_path, "k6"):
        assert {"base_graph_ms", "avl_graph_ms", "avl_before_graph_ms", "overhead_ms"} <= set(row)
        assert row["rel_err"] < 1.5e-2 and row["same_sets"], row
    assert "A-VL's decoding layer on the fast path" in (tmp_path / "bench.md").read_text()
