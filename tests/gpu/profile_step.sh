#!/usr/bin/env bash
# Where the time of a DeepSeek-V2-Lite-shaped decode step goes on one GPU, kernel by kernel
# (the model-bandwidth utilisation target of docs/BENCHMARKS.md). From a bundle with
# mlaserve (launch/bundle.sh bundle build/launch/mlaserve) and the repository beside it:
#   tests/gpu/profile_step.sh [BATCH] [CONTEXT] [COPY_GBPS]
# env: MODEL (default: the whole V2-Lite shape, made here once), MLASERVE (default: the
# bundle's mlaserve; another build to compare, run on the bundle's libraries), STEP_FLAGS (more
# bench-decode flags, e.g. --fused-attention).
# 1. the step time with CUDA graphs (mlaserve bench-decode, median of 50);
# 2. one uncaptured step under Nsight Compute (kernel durations and DRAM bytes, clocks left
#    alone), summarised by tests/bench/ncu_step_summary.py. Logs and the CSV go to $OUT.
set -uo pipefail
batch=${1:-1} ctx=${2:-512} copy=${3:-2998}
out=${OUT:-/tmp/mla_out}
mkdir -p "$out"
source bundle/env.sh
model=${MODEL:-/tmp/mla_models/v2lite}
[ -f $model/config.json ] ||
  mlaserve --log-level warn make-tiny --preset v2-lite-full --dtype BF16 --out $model
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
run=("${MLASERVE:-mlaserve}" --log-level warn bench-decode --model $model --device cuda --num-pages 2000
  --context "$ctx" --batch "$batch" ${STEP_FLAGS:-})
"${run[@]}" --steps 50 --warmup 5 | tee "$out/bench_decode.log"
step_ms=$(awk -v c="$ctx" -v b="$batch" '$1 == c && $2 == b {print $3}' "$out/bench_decode.log")
"$ncu" --clock-control none --print-units base --csv --page raw \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
  "${run[@]}" --steps 1 --warmup 1 --no-cuda-graphs >"$out/ncu_step.csv" 2>"$out/ncu_step.err"
echo "ncu rc=$? ($(grep -c '^"' "$out/ncu_step.csv") rows)"
tail -3 "$out/ncu_step.err"
python3 tests/bench/ncu_step_summary.py "$out/ncu_step.csv" --copy-gbps "$copy" \
  --step-ms "${step_ms:-0}" --top 30
