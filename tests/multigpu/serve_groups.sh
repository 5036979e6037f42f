#!/usr/bin/env bash
# Serving throughput through one coordinator with one GPU worker group, then with one group
# per GPU (tp 1 each; `mpirun -np N` gives local rank r GPU r), on the same model:
# `mlaserve bench` streams REQUESTS requests at CONCURRENCY and reports tokens/s; the groups'
# share of the requests shows the routing. Run from the repository root with the bundle's
# env.sh sourced. Logs under LOG_DIR.
#   tests/multigpu/serve_groups.sh MODEL_DIR GPUS [REQUESTS] [CONCURRENCY] [LOG_DIR]
set -uo pipefail
model=$1 gpus=$2 requests=${3:-512} concurrency=${4:-256} logs=${5:-${OUT:-/tmp}/serve_groups}
mkdir -p "$logs"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
export MLASERVE_CONTROL_SECRET=${MLASERVE_CONTROL_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
status=0
for groups in 1 "$gpus"; do
  port=$((20000 + RANDOM % 20000))
  address=127.0.0.1:$port
  mlaserve coordinator --address "$address" --control-address "127.0.0.1:$((port + 99))" >"$logs/coordinator_$groups.log" 2>&1 &
  coordinator=$!
  mpirun --allow-run-as-root -np "$groups" --bind-to none -x LD_LIBRARY_PATH -x PATH \
    -x NCCL_NVLS_ENABLE mlaserve worker --model "$model" --device cuda --tp 1 \
    --max-running 256 --max-batch-tokens 8192 --coordinator "127.0.0.1:$((port + 99))" --host 127.0.0.1 \
    --port-base $((port + 1)) >"$logs/workers_$groups.log" 2>&1 &
  workers=$!
  # Every group registered (the first one alive is not enough: the others may still load).
  ready=0
  for _ in $(seq 300); do
    mlaserve --log-level warn client --address "$address" --status >"$logs/status_$groups.log" 2>&1
    if grep -q "^workers: $groups ($groups alive)" "$logs/status_$groups.log"; then ready=1; break; fi
    sleep 1
  done
  if [ "$ready" = 1 ]; then
    mlaserve --log-level warn bench --address "$address" --requests "$requests" \
      --concurrency "$concurrency" --warmup 32 --prompt-len 128 --max-tokens 64 --vocab "${VOCAB:-30000}" \
      --timeout 300 >"$logs/bench_$groups.log" 2>&1 || status=1
    echo "== $groups group(s)"
    grep -E '^(requests|wall|tokens|ttft|latency|workers) ' "$logs/bench_$groups.log"
  else
    echo "FAIL: $groups group(s) did not register"; tail -20 "$logs/workers_$groups.log"; status=1
  fi
  pkill -TERM -P "$workers" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$workers" 2>/dev/null || break; sleep 0.2; done
  kill -TERM "$workers" "$coordinator" 2>/dev/null
  wait "$workers" "$coordinator" 2>/dev/null
done
exit $status
