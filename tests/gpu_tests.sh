#!/bin/bash
# The CUDA-only tests (tests/test_gpu.py, tests/test_kernels_gpu.py) on the device tool's GPU, in SHARDS parallel
# pytest processes (Triton compiles on the CPU: one process spends most of its time compiling). From the repository
# root, package installed:   OUT=DIR LIMIT=300 bash tests/gpu_tests.sh     -> DIR/gpu_tests_<i>.txt, DIR/gpu_tests.txt
set -u
OUT=${OUT:-/tmp/gpu_tests}
SHARDS=${SHARDS:-4}
mkdir -p "$OUT"
FILES=${FILES:-"tests/test_gpu.py tests/test_kernels_gpu.py"}
python3 -P -m pytest $FILES --collect-only -q -o addopts="" 2>/dev/null | grep '::' > /tmp/gpu_ids.txt
split -n r/$SHARDS -d /tmp/gpu_ids.txt /tmp/gpu_shard_
pids=()
for shard in /tmp/gpu_shard_*; do
  i=${shard##*_}
  timeout -s INT "${LIMIT:-300}" python3 -P -m pytest $(cat "$shard") -o addopts="" -p no:cacheprovider -rf --tb=short \
    > "$OUT/gpu_tests_$i.txt" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
{ echo "$(wc -l < /tmp/gpu_ids.txt) tests in $SHARDS shards"
  for f in "$OUT"/gpu_tests_*.txt; do tail -1 "$f"; done
  grep -h '^FAILED\|^ERROR' "$OUT"/gpu_tests_*.txt; } > "$OUT/gpu_tests.txt"
cat "$OUT/gpu_tests.txt"
