#!/bin/bash
# Issue 24's checks on a two-GPU machine (the device tool's nvidia-h100-x2), from the repository root with the package
# installed; everything it finds goes under $OUT:
#   OUT=DIR bash tests/multi_gpu.sh
# 1. tests/test_multi_device.py: device_map over cuda:0 + cpu and over cuda:0 + cuda:1 (tiny models of four families,
#    eight methods), the transfer count, disk offload, tensor parallelism with torchrun on the two GPUs (nccl).
# 2. tests/split_7b.py: a random-weight LLaVA-1.5-7B and Qwen2-VL-7B split across the two GPUs vs one GPU.
# 3. data-parallel eval on the testbed suite: one process vs `accelerate launch` on two GPUs, samples and metrics
#    compared, wall-clock time of each (dp.txt).
set -u
OUT=${OUT:-/tmp/multi_gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt" 2>&1

$PY -P -m pytest tests/test_multi_device.py -o addopts="" -p no:cacheprovider -rfs --tb=short -q \
  > "$OUT/test_multi_device.txt" 2>&1
for arch in llava-1.5-7b qwen2-vl-7b; do
  $PY tests/split_7b.py --arch "$arch" --out "$OUT" > "$OUT/split_$arch.txt" 2>&1
done

TASKS=${TASKS:-testbed_pope,testbed_chair,testbed_vqa,testbed_mme}
ARGS=(eval --model testbed --device cuda --dtype bfloat16 --methods "fastv:layer=2,ratio=0.5" --tasks "$TASKS"
      --limit "${LIMIT:-300}" --batch-size 32 --no-progress)
start=$(date +%s.%N)
CUDA_VISIBLE_DEVICES=0 $PY -m vlm_efficient.cli "${ARGS[@]}" --output "$OUT/dp_one" > "$OUT/dp_one.txt" 2>&1
mid=$(date +%s.%N)
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m vlm_efficient.cli "${ARGS[@]}" --output "$OUT/dp_two" > "$OUT/dp_two.txt" 2>&1
end=$(date +%s.%N)
$PY - "$OUT" "$start" "$mid" "$end" <<'PYEOF' > "$OUT/dp.txt" 2>&1
import json, sys, pathlib
out, start, mid, end = pathlib.Path(sys.argv[1]), *map(float, sys.argv[2:])
one, two = (json.loads((out / d / "results.json").read_text()) for d in ("dp_one", "dp_two"))
samples = lambda d: sorted((p.name, [{k: v for k, v in json.loads(l).items() if k != "efficiency"} for l in p.open()])
                           for p in (out / d).glob("samples_*.jsonl"))
print("results equal:", one["results"] == two["results"], " samples equal:", samples("dp_one") == samples("dp_two"))
print(f"one GPU {mid - start:.1f} s, two GPUs {end - mid:.1f} s (wall clock, model loading included): "
      f"{(mid - start) / (end - mid):.2f}x")
PYEOF
cat "$OUT/dp.txt"; tail -3 "$OUT/test_multi_device.txt"; grep -h "tokens_equal" -c "$OUT"/split_*.txt
