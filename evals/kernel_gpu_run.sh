#!/bin/bash
# One GPU session (device tool): correctness checks and compile warm-up in parallel, then the timed benchmark.
#   bash evals/kernel_gpu_run.sh            (writes under $OUT: env.txt checks.txt warm.txt bench.log bench.json bench.md)
# The tables (kernel_bench.py docstring): kernel 1 / 2 / 3 against SDPA's default backend and compiled FlexAttention at
# N = 651, 2,955, 8,267 (kernel-only, back-to-back and host timings), host us per call, the Python wrapper's share.
# SECTIONS="k1 k2" restricts the benchmark; CHECKS=0 skips the checks; LIMIT is the wall-clock budget in seconds.
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/kernels_out}
mkdir -p "$OUT" /tmp/shim/vlm_efficient
touch /tmp/shim/vlm_efficient/__init__.py          # import vlm_efficient.kernels and .evals without the engine package
ln -sfn "$PWD/kernels" /tmp/shim/vlm_efficient/kernels
ln -sfn "$PWD/evals" /tmp/shim/vlm_efficient/evals
cd /tmp   # the repo root holds the engine's vlm_efficient/ folder, which would shadow the shim
export PYTHONPATH=/tmp/shim PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
pids=()
if [ "${CHECKS:-1}" = "1" ]; then
  for sec in plain masked stats group group_decode "ragged ragged_graph"; do
    python3 -m vlm_efficient.evals.kernel_checks --size gpu --only $sec > "/tmp/chk_${sec// /_}.txt" 2>&1 &
    pids+=($!)
  done
fi
for sec in ${SECTIONS:-sweep k1 k2 k3 k4}; do
  case "$sec" in ceil|host|launch|wrapper) continue ;; esac   # nothing to compile (launch compiles as it goes)
  python3 -m vlm_efficient.evals.kernel_bench --warm --sections $sec > "/tmp/warm_$sec.txt" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
cat /tmp/chk_*.txt > "$OUT/checks.txt" 2>/dev/null
cat /tmp/warm_*.txt > "$OUT/warm.txt" 2>/dev/null
T1=$(date +%s)
echo "parallel phase: $((T1 - T0)) s"
BUDGET=$(( ${LIMIT:-560} - (T1 - T0) ))
python3 -m vlm_efficient.evals.kernel_bench --out "$OUT" --budget "$BUDGET" --sections ${SECTIONS:-ceil sweep k1 k2 k3 host launch wrapper k4} \
  > "$OUT/bench.log" 2>&1
grep -v '^ROW' "$OUT/bench.log" | tail -80
echo "== checks: $(grep -c '^PASS' "$OUT/checks.txt") pass, $(grep -c '^FAIL' "$OUT/checks.txt") fail"
grep -h -A3 '^FAIL' "$OUT/checks.txt" | head -60
grep -h -i "error\|Traceback" "$OUT/warm.txt" | head -20
echo "total: $(( $(date +%s) - T0 )) s"
