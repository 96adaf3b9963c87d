"""The Triton kernels on a CUDA GPU against the torch references (skipped without CUDA). Larger shapes than the
interpreter tests: N up to ~1,100, head_dim 64 / 80 / 128, bf16 and fp16, GQA, padding, CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("section", ["plain", "masked", "stats", "group", "group_decode", "masked_decode", "key_sets",
                                     "ragged", "ragged_graph"])
def test_kernel_matches_reference_on_gpu(section):
    pytest.importorskip("triton")
    from vlm_efficient.evals.kernel_checks import Checks

    res = Checks("gpu", "cuda").run([section])
    failed = [f"{name}: {detail}" for name, ok, detail in res if not ok]
    assert not failed, "\n".join(failed)


def test_entry_points_never_sync_on_gpu():
    """Once a layout's caches are built, no kernel entry point waits for the GPU (torch's sync debug mode raises on
    any synchronising call)."""
    pytest.importorskip("triton")
    from vlm_efficient.evals.kernel_host_cost import entry_point_calls

    calls = entry_point_calls(651, device="cuda", heads=8)
    for call in calls.values():
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, call in calls.items():
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
