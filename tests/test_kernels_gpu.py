"""The Triton kernels on a CUDA GPU against the torch references (skipped without CUDA). Larger shapes than the
interpreter tests: N up to ~1,100, head_dim 64 / 80 / 128, bf16 and fp16, GQA, padding, CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("section", ["plain", "masked", "stats", "group", "group_decode", "ragged", "ragged_graph"])
def test_kernel_matches_reference_on_gpu(section):
    pytest.importorskip("triton")
    from vlm_efficient.kernels.checks import Checks

    res = Checks("gpu", "cuda").run([section])
    failed = [f"{name}: {detail}" for name, ok, detail in res if not ok]
    assert not failed, "\n".join(failed)
