"""The kernels compiled for an H100 (sm_90) on this CPU machine: Triton's compiler and ptxas, which the interpreter
tests never reach (vlm_efficient/evals/kernel_compile_check.py): every entry point's launches, and the decoding
kernels at their GPU tiles."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)


def test_kernels_compile_for_hopper(tmp_path):
    proc = _run(tmp_path, "-m", "vlm_efficient.evals.kernel_compile_check")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert proc.returncode == 0 and lines and all(line.startswith("ok") for line in lines), proc.stdout + proc.stderr
    names = " ".join(lines)
    assert "kernel 5 d=256" in names and "kernel 4 splits" in names and "kernel 3 decoding merge" in names
    for kernel in ("_attn_fwd_kernel", "_rows_logits_kernel", "_group_rows_kernel", "_group_fwd_kernel",
                   "_masked_decode_kernel", "_group_decode_kernel"):  # every entry point's launches
        assert f": {kernel}:" in names, kernel


def test_the_compile_check_fails_on_what_the_compiler_refuses(tmp_path):
    """A specialization Triton cannot build (a 15-row tile: tl.arange needs a power of two) is reported."""
    code = ("from vlm_efficient.evals import kernel_compile_check as c\n"
            "name, fn, types, consts, options = [case for case in c.cases() if case[0].startswith('kernel 5')][0]\n"
            "c.compile_for_hopper(fn, types, dict(consts, BLOCK_G=15), options)\n")
    proc = _run(tmp_path, "-c", code)
    assert proc.returncode != 0 and "power of 2" in (proc.stdout + proc.stderr).lower(), proc.stderr[-2000:]
