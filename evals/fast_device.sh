#!/bin/bash
# The fast path on the device tool's GPU in one call (from the repository root): transformers 5.25 from wheels in
# .whl/tf525 where present (the device has 5.17, whose generate() does not encode the images before the prefill),
# the package, then the fast path's benchmark with per-method profiles and the CUDA tests.
# SECTIONS (fast_bench --only, default 1), METHODS and PROFILE (default --profile; PROFILE= for none) choose the bench;
# BENCH_ARGS adds fast_bench arguments (e.g. "--compiled --inductor coordinate_descent_tuning=True").
# KERNEL_CHECKS (kernel_checks sections, e.g. "masked_decode ragged_graph") and KERNEL_BENCH (kernel_bench sections,
# e.g. "k5") run first, into kernels/.
# The wheels (the device reaches no registry; carry .whl/tf525, under 64 MiB): transformers 5.25.0, huggingface_hub
# 2.4.0, tokenizers 0.23.3 and hub 2's own new dependencies (httpx2, httpcore2, h11, anyio, idna, truststore, click,
# hf_xet), for the device's Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl/tf525 transformers==5.25.0 huggingface_hub==2.4.0 tokenizers==0.23.3 \
#     httpx2 httpcore2 h11 anyio idna truststore click hf_xet
#   OUT=DIR BENCH_S=250 TESTS_S=240 bash evals/fast_device.sh   -> DIR/fast_device.tgz (fast_bench/, gpu_tests/),
#                                                                 DIR/fast_bench.md, DIR/gpu_tests.txt
# Into the repository, flat (results/.gitignore ignores a run folder's sub-folders, which lost run 8's files):
#   mkdir results/fast_bench_h100_runN && tar xzf DIR/fast_device.tgz -C results/fast_bench_h100_runN --strip-components=1
set -u
OUT=${OUT:-/tmp/fast_device}
mkdir -p "$OUT/fast_bench" "$OUT/gpu_tests" "$OUT/kernels"
if ls .whl/tf525/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-deps --target /root/tf525 .whl/tf525/*.whl
  export PYTHONPATH=/root/tf525
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
if [ -n "${KERNEL_CHECKS:-}" ]; then
  python3 -m vlm_efficient.evals.kernel_checks --size gpu --only $KERNEL_CHECKS > "$OUT/kernels/checks.txt" 2>&1
  tail -30 "$OUT/kernels/checks.txt"
fi
if [ -n "${KERNEL_BENCH:-}" ]; then
  timeout "${KERNEL_BENCH_S:-150}" python3 -m vlm_efficient.evals.kernel_bench --out "$OUT/kernels" \
    --sections $KERNEL_BENCH --budget $(( ${KERNEL_BENCH_S:-150} - 20 )) > "$OUT/kernels/log.txt" 2>&1
  tail -30 "$OUT/kernels/log.txt"
fi
if [ "${BENCH_S:-250}" -gt 0 ]; then
  timeout "${BENCH_S:-250}" python3 -m vlm_efficient.evals.fast_bench --out "$OUT/fast_bench" --only "${SECTIONS:-1}" \
    --methods "${METHODS:-FastV 75%,VisionZip 75%,PAI}" ${PROFILE---profile} --budget $(( ${BENCH_S:-250} - 40 )) ${BENCH_ARGS:-} \
    > "$OUT/fast_bench/log.txt" 2>&1
  cp "$OUT/fast_bench/fast_bench.md" "$OUT/" 2>/dev/null || tail -20 "$OUT/fast_bench/log.txt"
fi
if [ "${TESTS_S:-240}" -gt 0 ]; then
  OUT="$OUT/gpu_tests" LIMIT="${TESTS_S:-240}" FILES="${FILES:-tests/test_gpu.py tests/test_kernels_gpu.py}" \
    bash tests/gpu_tests.sh > /dev/null
  cp "$OUT/gpu_tests/gpu_tests.txt" "$OUT/"
fi
tar czf "$OUT/fast_device.tgz" -C "$OUT" fast_bench gpu_tests kernels
cat "$OUT/fast_bench.md" "$OUT/gpu_tests.txt" 2>/dev/null
