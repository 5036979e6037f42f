#!/usr/bin/env bash
# Starts a coordinator and GROUPS tensor-parallel worker groups (one mpirun job for all of
# them) from one deployment config, waits until they serve, and stops everything on
# SIGINT/SIGTERM or when either side exits.
#   launch/cluster.sh --config configs/tiny-cpu.yaml [--groups 2] [--hostfile FILE] [--bin PATH]
# Multi-node: the same command with --hostfile; workers must listen on an address the
# coordinator reaches (workers.host in the config).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
config="" groups=2 hostfile="" bin=${MLASERVE:-build/launch/mlaserve}
while [ $# -gt 0 ]; do
  case $1 in
    --config) config=$2; shift 2 ;;
    --groups) groups=$2; shift 2 ;;
    --hostfile) hostfile=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -n "$config" ] || { echo "usage: $0 --config FILE [--groups N] [--hostfile FILE]" >&2; exit 2; }
tp=$(sed -n 's/^ *tp: *\([0-9]*\).*/\1/p' "$config" | head -1)
tp=${tp:-1}
address=$(sed -n 's/^ *address: *\([^ #]*\).*/\1/p' "$config" | head -1)
address=${address:-127.0.0.1:50051}

export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1} OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} OMPI_MCA_mpi_yield_when_idle=1
"$bin" coordinator --config "$config" &
coordinator=$!
mpi_args=(-np $((groups * tp)) --bind-to none)
[ -n "$hostfile" ] && mpi_args+=(--hostfile "$hostfile")
[ "$((groups * tp))" -gt "$(nproc)" ] && mpi_args+=(--oversubscribe)
mpirun "${mpi_args[@]}" "$bin" worker --config "$config" --coordinator "$address" &
workers=$!

stop() { mla_stop_cluster "$workers" "$coordinator"; }
trap 'stop; exit 0' INT TERM
"$bin" --log-level warn client --address "$address" --wait-ready 120 --status
echo "cluster ready: coordinator $address, $groups group(s) of tp $tp. Ctrl-C stops it."
wait -n "$workers" "$coordinator" || true
echo "a cluster process exited; stopping the rest" >&2
stop
exit 1
