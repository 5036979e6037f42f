#!/usr/bin/env bash
# Live migration measured on one host: a coordinator and two single-rank worker groups as
# two processes (on a GPU host both on the same GPU), then `mlaserve bench-migration`: per
# context length, an unmigrated greedy request (reference tokens and replay time) and the
# same request migrated after 16 tokens (tokens must be identical; downtime, copy time and
# bandwidth), next to the memcpy and loopback-gRPC ceilings. Exits non-zero when a migrated
# request's tokens differ or a migration fails.
#   tests/bench/migration.sh MODEL_DIR CONTEXTS [WORKER FLAGS...]
#     e.g. tests/bench/migration.sh tests/data/v3 32,64,128
#          tests/bench/migration.sh /tmp/v3l3 1024,4096,16384,32768 --device cuda --num-pages 1024
# env: MLASERVE (default: mlaserve on PATH, else build/launch/mlaserve), PORT (default 57300),
#      RUNS (default 3), MAX_TOKENS (default 64), OUT (logs; default a temporary folder),
#      LAYOUT (two-jobs: one process per group, latents over gRPC; one-job: both groups in one
#      `mpirun -np 2` job, latents over its MPI, with the MPI transport's ceiling printed first).
set -euo pipefail
model=$1
contexts=$2
shift 2
mlaserve=${MLASERVE:-$(command -v mlaserve || echo build/launch/mlaserve)}
port=${PORT:-57300}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
coordinator_address="127.0.0.1:$port"
control_address="127.0.0.1:$((port + 1))"
export MLASERVE_CONTROL_SECRET=${MLASERVE_CONTROL_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}

pids=""
stop() {
  for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $pids; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT

"$mlaserve" coordinator --address "$coordinator_address" --control-address "$control_address" \
  >"$out/coordinator.log" 2>&1 &
pids="$pids $!"
if [ "${LAYOUT:-two-jobs}" = one-job ]; then
  # Both groups in one mpirun job: the latents move over the job's MPI (MpiTransport).
  mpi=(mpirun -np 2 --oversubscribe --bind-to none)
  "${mpi[@]}" "$mlaserve" --log-level warn bench-transport
  "${mpi[@]}" "$mlaserve" worker --model "$model" --tp 1 --coordinator "$control_address" \
    --port-base $((port + 10)) "$@" >"$out/workers.log" 2>&1 &
  pids="$pids $!"
else
  for g in 0 1; do
    "$mlaserve" worker --model "$model" --tp 1 --coordinator "$control_address" \
      --port-base $((port + 10)) --group $g "$@" >"$out/worker$g.log" 2>&1 &
    pids="$pids $!"
  done
fi

ready=0
for _ in $(seq 300); do
  if "$mlaserve" --log-level error client --address "$coordinator_address" --wait-ready 1 \
    --status 2>/dev/null | grep -q '^workers: 2 (2 alive)'; then
    ready=1
    break
  fi
  sleep 1
done
if [ "$ready" != 1 ]; then
  echo "cluster not ready after 300 s" >&2
  tail -n 20 "$out"/*.log >&2
  exit 1
fi
"$mlaserve" --log-level warn bench-migration --address "$coordinator_address" \
  --control-address "$control_address" --contexts "$contexts" --runs "${RUNS:-3}" \
  --max-tokens "${MAX_TOKENS:-64}" 2>&1 | tee "$out/bench-migration.txt"
