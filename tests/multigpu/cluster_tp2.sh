#!/usr/bin/env bash
# The serving cluster with a GPU tensor-parallel group behind the coordinator: `mlaserve
# coordinator` and one TP2 worker group (`mpirun -np 2 mlaserve worker --device cuda --tp 2`,
# NCCL between the two GPUs) on loopback, for each kv_shard mode. The golden prompts of
# tests/data/v3_mla, sent at once by separate clients through the coordinator, must stream
# transformers' greedy tokens; then `mlaserve bench` sends 64 concurrent requests, all of
# which must complete. Exits 77 (skipped) without two GPUs.
#   cluster_tp2.sh MLASERVE MPIEXEC DATA_DIR [LOG_DIR]
set -uo pipefail
mlaserve=$1 mpiexec=$2 data=$3 logs=${4:-$(mktemp -d)}
mkdir -p "$logs"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "${gpus:-0}" -ge 2 ] || { echo "SKIP: needs 2 GPUs (found ${gpus:-0})"; exit 77; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
export MLASERVE_CONTROL_SECRET=${MLASERVE_CONTROL_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

prompts=("33,18,3,161,62" "92,71,117,49,239,23,3,166,43,255,209"
  "212,117,191,110,142,231,219,153,20,189,187,196,17,235,92,192,124,117,184")
greedy=("28 249 146 172 172 172 172 172" "28 176 217 56 21 7 177 23"
  "45 29 39 101 36 170 56 125")  # golden.json: transformers' greedy tokens

for kv in sequence replicate; do
  port=$((20000 + RANDOM % 20000))
  address=127.0.0.1:$port
  "$mlaserve" coordinator --address "$address" --control-address "127.0.0.1:$((port + 99))" >"$logs/coordinator_$kv.log" 2>&1 &
  coordinator=$!
  "$mpiexec" -np 2 --bind-to none -x LD_LIBRARY_PATH -x PATH -x NCCL_NVLS_ENABLE \
    "$mlaserve" worker --model "$data/v3_mla" --device cuda --tp 2 --kv-shard "$kv" \
    --cache-memory-fraction 0.2 --coordinator "127.0.0.1:$((port + 99))" --host 127.0.0.1 \
    --port-base $((port + 1)) >"$logs/workers_$kv.log" 2>&1 &
  workers=$!
  if ! "$mlaserve" --log-level warn client --address "$address" --wait-ready 180 --status \
    >"$logs/status_$kv.log" 2>&1; then
    fail "$kv: the GPU group did not register within 180 s"
    cat "$logs/status_$kv.log" "$logs/workers_$kv.log"
  else
    cat "$logs/status_$kv.log"
    pids=()
    for i in 0 1 2; do
      "$mlaserve" --log-level warn client --address "$address" --prompt-ids "${prompts[$i]}" \
        --max-tokens 8 --ignore-eos --timeout 120 >"$logs/client_${kv}_$i.log" 2>&1 &
      pids+=($!)
    done
    for i in 0 1 2; do
      wait "${pids[$i]}" || fail "$kv: client $i exited with an error"
      got=$(head -1 "$logs/client_${kv}_$i.log" | sed 's/ *$//')
      if [ "$got" = "${greedy[$i]}" ]; then
        echo "$kv prompt $i: $got (= transformers)"
      else
        fail "$kv prompt $i: got '$got', transformers '${greedy[$i]}'"
      fi
    done
    "$mlaserve" --log-level warn bench --address "$address" --requests 64 --concurrency 64 \
      --prompt-len 24 --max-tokens 32 --vocab 256 --timeout 120 >"$logs/bench_$kv.log" 2>&1 ||
      fail "$kv: bench reported errors"
    grep -E '^(requests|tokens|ttft) ' "$logs/bench_$kv.log"
    grep -q "^requests    64 ok, 0 errors" "$logs/bench_$kv.log" || fail "$kv: not all 64 requests ok"
  fi
  pkill -TERM -P "$workers" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$workers" 2>/dev/null || break; sleep 0.2; done
  kill -TERM "$workers" "$coordinator" 2>/dev/null
  wait "$workers" "$coordinator" 2>/dev/null
  grep -q "uses GPU 1 of" "$logs/workers_$kv.log" || fail "$kv: no rank reported using GPU 1"
done
if [ "$failures" -gt 0 ]; then
  echo "cluster_tp2: $failures failure(s); logs in $logs"
  exit 1
fi
echo "cluster_tp2: 2 passed, 0 failed"
