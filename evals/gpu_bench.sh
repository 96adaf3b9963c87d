#!/bin/bash
# The GPU speed tables of the README, in one run (device tool, one H100; from the repository root, package installed):
#   OUT=DIR bash evals/gpu_bench.sh        -> DIR/<model>_<set>_<kernels>/bench.{json,md,png} and DIR/gpu_bench.md
# Random-weight LLaVA-1.5-7B / LLaVA-NeXT-7B shapes, bf16, batch 1 (prune-b8: batch 8), 32 new tokens, best of 3
# interleaved rounds; each set is timed with the Triton kernels routed (VLM_EFFICIENT_KERNELS=auto) or without (off);
# the unwrapped SDPA base is measured in every run. The "profile" set profiles one prefill and one short generate()
# of a few methods (host ops, syncs, GPU busy time: bench.md's second table). BUDGET (seconds, default 240) bounds the whole script: sets are skipped once it is
# spent; MAX_SET caps one set. SETS restricts the runs, e.g. SETS="llava-1.5-7b_prune_auto llava-1.5-7b_heads_auto".
set -u
OUT=${OUT:-/tmp/vlm_gpu_bench}
mkdir -p "$OUT"
T0=$(date +%s)
HEADS="var:tau=3,sink_dims=0/1/2/3;pai;vaf;gift;vhr;naavit;window"   # random weights have no massive dims: tau=3
# pdrop ratio = share kept per stage (3 stages): 0.794 / 0.63 keep 288 / 144 of 576 after the last one
PRUNE="fastv:layer=2,ratio=0.5;fastv:layer=2,ratio=0.75;pdrop:ratio=0.794;pdrop:ratio=0.63;dart:layer=2,ratio=0.5;dart:layer=2,ratio=0.75;visionzip:ratio=0.5;visionzip:ratio=0.75"
run() {  # model set kernels methods [batch size]
  [ -n "${SETS:-}" ] && [[ " $SETS " != *" ${1}_${2}_$3 "* ]] && return
  local left=$(( ${BUDGET:-240} - ($(date +%s) - T0) ))
  [ "$left" -lt 20 ] && { echo "skip $1 $2 $3: budget spent"; return; }
  [ "$left" -gt "${MAX_SET:-600}" ] && left=${MAX_SET:-600}
  echo "== $1 $2 kernels=$3 (${left} s for it) at $(( $(date +%s) - T0 )) s"
  VLM_EFFICIENT_KERNELS=$3 timeout "$left" python3 -m vlm_efficient.cli bench --model "$1" --device cuda \
    --dtype bfloat16 --max-new-tokens 32 --repeats 3 --batch-size "${5:-1}" ${6:-} --methods "$4" \
    --output "$OUT/${1}_${2}_$3" 2>&1 | grep -v "Warning\|warn\|it/s\|s/it"
}
run llava-1.5-7b heads auto "$HEADS"
run llava-1.5-7b prune auto "$PRUNE"
run llava-1.5-7b prune-b8 auto "$PRUNE" 8
run llava-next-7b prune auto "$PRUNE"
run llava-1.5-7b plphp-b8 auto "plphp;plphp:cache=mask" 8
run llava-next-7b plphp auto "plphp;plphp:cache=mask"
run llava-1.5-7b profile auto "fastv:layer=2,ratio=0.5;pai;var:tau=3,sink_dims=0/1/2/3" 1 --profile
run llava-1.5-7b heads off "$HEADS"
run llava-1.5-7b prune off "$PRUNE"
python3 -m vlm_efficient.evals.bench_summary "$OUT" > "$OUT/gpu_bench.md"
cat "$OUT/gpu_bench.md"
echo "total: $(( $(date +%s) - T0 )) s"
