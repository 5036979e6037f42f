#!/usr/bin/env bash
# One 2-GPU host session's work, from a bundle made here with
#   launch/bundle.sh bundle build/tests/mla_multigpu_tests build/tests/mla_gpu_tests \
#     build/launch/mlaserve
# and the repository beside it (the device tool runs this from the repo root):
#   tests/multigpu/device_run.sh tests   # multigpu tests, the GPU cluster, the model-level
#                                        # gpu tests on one GPU
#   tests/multigpu/device_run.sh bench v2lite|v3
#       TP1 / TP2-sharded / TP2-replicated decode tables: DeepSeek-V2-Lite's shape, or
#       DeepSeek-V3's shape cut to its 3 dense layers (128 heads, real dims)
# Logs go to $OUT; a summary table is printed last.
set -uo pipefail
stage=${1:-tests}
which=${2:-v2lite}
out=${OUT:-/tmp/mla_out}
mkdir -p "$out"
source bundle/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export MLA_TEST_DATA=$PWD/tests/data NCCL_NVLS_ENABLE=0
mpi=(mpirun --allow-run-as-root -np 2 --bind-to none -x LD_LIBRARY_PATH -x PATH
  -x NCCL_NVLS_ENABLE -x MLA_TEST_DATA)
summary=()

if [ "$stage" = tests ]; then
  "${mpi[@]}" mla_multigpu_tests --gtest_color=no >"$out/multigpu.log" 2>&1
  summary+=("multigpu_np2 rc=$? passed=$(grep -c '^\[       OK \]' "$out/multigpu.log") failed=$(grep -c '^\[  FAILED  \] .*(' "$out/multigpu.log")")
  grep -E "Failure|Expected|Which is|^\[  FAILED" "$out/multigpu.log" | head -40
  bash tests/multigpu/cluster_tp2.sh "$(command -v mlaserve)" mpirun tests/data "$out/cluster" \
    >"$out/cluster.log" 2>&1
  summary+=("cluster_tp2 rc=$?")
  cat "$out/cluster.log"
  tar czf "$out/cluster_logs.tar.gz" -C "$out" cluster && rm -rf "$out/cluster"
  mla_gpu_tests --gtest_color=no --gtest_filter='*CudaModel*' >"$out/gpu_model.log" 2>&1
  summary+=("gpu CudaModel* rc=$? passed=$(grep -c '^\[       OK \]' "$out/gpu_model.log") failed=$(grep -c '^\[  FAILED  \] .*(' "$out/gpu_model.log")")
  grep -E "Failure|Expected|Which is|^\[  FAILED" "$out/gpu_model.log" | head -40
fi

if [ "$stage" = bench ]; then
  models=/tmp/mla_models
  mkdir -p $models
  t0=$SECONDS
  if [ "$which" = v2lite ] && [ ! -f $models/v2lite/config.json ]; then
    mlaserve --log-level warn make-tiny --preset v2-lite-full --dtype BF16 --out $models/v2lite
    summary+=("make-tiny v2-lite-full $((SECONDS - t0)) s")
  fi
  if [ "$which" = v3 ] && [ ! -f $models/v3x3/config.json ]; then
    mlaserve --log-level warn make-tiny --preset v3-full --layers 3 --dtype BF16 --out $models/v3x3
    summary+=("make-tiny v3-full-3-layers $((SECONDS - t0)) s")
  fi
  bench() {  # NAME MODEL CONTEXTS BATCHES [TP KV]
    local name=$1 model=$2 ctx=$3 batch=$4 tp=${5:-1} kv=${6:-sequence} cmd
    cmd=(mlaserve --log-level warn bench-decode --model "$model" --device cuda --context "$ctx"
      --batch "$batch" --steps 20 --warmup 3)
    local t0=$SECONDS
    if [ "$tp" = 1 ]; then "${cmd[@]}"; else "${mpi[@]}" "${cmd[@]}" --tp "$tp" --kv-shard "$kv"; fi \
      >"$out/bench_$name.log" 2>&1
    summary+=("bench $name rc=$? $((SECONDS - t0)) s")
    cat "$out/bench_$name.log"
  }
  if [ "$which" = v2lite ]; then
    bench v2lite_tp1 $models/v2lite 1024,8192,32768 1,16,64,256
    bench v2lite_tp2_sharded $models/v2lite 1024,8192,32768 1,16,64,256 2 sequence
    bench v2lite_tp2_replicated $models/v2lite 1024,8192,32768 1,16,64,256 2 replicate
  else
    bench v3x3_tp2_sharded $models/v3x3 8192,32768,131072 16,64 2 sequence
    bench v3x3_tp2_replicated $models/v3x3 8192,32768,131072 16,64 2 replicate
  fi
fi
echo
echo "| $stage | result |"
echo "|---|---|"
for s in "${summary[@]}"; do echo "| ${s%% *} | ${s#* } |"; done
