#!/usr/bin/env bash
# Starts a coordinator and GROUPS tensor-parallel worker groups from one deployment config,
# waits until they serve, and runs until SIGINT/SIGTERM (which stops everything) or until the
# coordinator or every group has exited.
#   launch/cluster.sh --config configs/tiny-cpu.yaml [--groups 2] [--hostfile FILE] [--bin PATH]
#
# Each group is its own mpirun job (`mlaserve worker --group g`): Open MPI aborts a whole job
# when one of its ranks dies, so one job per group keeps a group a failure domain — when any
# rank of group g dies, group g's job ends and the other groups go on serving (the coordinator
# moves g's requests to them). Multi-node: with --hostfile (Open MPI syntax, `node slots=N`
# per line), group g runs on the slots g*tp .. g*tp+tp-1 taken in file order, so a group never
# spans more nodes than it must; workers must listen on an address the coordinator reaches
# (workers.host in the config).
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
[ -f "$config" ] || { echo "$0: config $config: no such file" >&2; exit 2; }
tp=$(sed -n 's/^ *tp: *\([0-9]*\).*/\1/p' "$config" | head -1)
tp=${tp:-1}
address=$(sed -n 's/^ *address: *\([^ #]*\).*/\1/p' "$config" | head -1)
address=${address:-127.0.0.1:50051}

# The slots of the hostfile, one host name per slot, in file order.
slots=()
if [ -n "$hostfile" ]; then
  [ -f "$hostfile" ] || { echo "$0: hostfile $hostfile: no such file" >&2; exit 2; }
  while read -r host rest || [ -n "$host" ]; do
    case $host in "" | \#*) continue ;; esac
    n=$(sed -n 's/\(^\|.*[[:space:]]\)slots=\([0-9]*\).*/\2/p' <<<"$rest")
    for _ in $(seq "${n:-1}"); do slots+=("$host"); done
  done <"$hostfile"
  [ "${#slots[@]}" -ge $((groups * tp)) ] ||
    { echo "$0: $hostfile has ${#slots[@]} slots; $groups groups of tp $tp need $((groups * tp))" >&2; exit 2; }
fi
# The --host argument of group g's job: "node:count,..." for its slots.
group_hosts() {
  local g=$1 i list="" prev="" count=0
  for ((i = g * tp; i < (g + 1) * tp; ++i)); do
    if [ "${slots[$i]}" = "$prev" ]; then count=$((count + 1)); continue; fi
    [ -n "$prev" ] && list+="${list:+,}$prev:$count"
    prev=${slots[$i]} count=1
  done
  echo "$list${list:+,}$prev:$count"
}

export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1} OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} OMPI_MCA_mpi_yield_when_idle=1
# The control plane's shared secret: from the environment, else the config's
# control.secret_file, else a fresh random one for this cluster's processes (`mlaserve admin`
# then needs it too: it is printed nowhere, so set MLASERVE_CONTROL_SECRET yourself to use it).
if [ -z "${MLASERVE_CONTROL_SECRET:-}" ] && ! grep -qE '^ *secret_file: *"?[^ "#]' "$config"; then
  MLASERVE_CONTROL_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  export MLASERVE_CONTROL_SECRET
fi
mpi_env=()
[ -n "${MLASERVE_CONTROL_SECRET:-}" ] && mpi_env=(-x MLASERVE_CONTROL_SECRET)
"$bin" coordinator --config "$config" &
coordinator=$!
workers=()
for ((g = 0; g < groups; ++g)); do
  mpi_args=(-np "$tp" --bind-to none "${mpi_env[@]}")
  if [ -n "$hostfile" ]; then
    mpi_args+=(--host "$(group_hosts "$g")")
  elif [ "$((groups * tp))" -gt "$(nproc)" ]; then
    mpi_args+=(--oversubscribe)
  fi
  mpirun "${mpi_args[@]}" "$bin" worker --config "$config" --group "$g" &
  workers+=($!)
done

stop() { mla_stop_cluster "$coordinator" "${workers[@]}"; }
trap 'stop; exit 0' INT TERM
# Ready when a worker serves; a start that fails (bad config, no secret) ends the wait at once.
for ((waited = 0; ; ++waited)); do
  "$bin" --log-level error client --config "$config" --address "$address" --wait-ready 1 \
    2>/dev/null && break
  alive=0
  for pid in "${workers[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  if ! kill -0 "$coordinator" 2>/dev/null || [ "$alive" = 0 ] || [ "$waited" -ge 300 ]; then
    echo "$0: the cluster did not become ready; see the messages above" >&2
    stop
    exit 1
  fi
done
"$bin" --log-level warn client --config "$config" --address "$address" --status
echo "cluster ready: coordinator $address, $groups group(s) of tp $tp, one mpirun job each." \
  "Ctrl-C stops it."
# A group that dies is reported and the rest go on; the cluster ends with its coordinator or
# its last group.
running=("${workers[@]}")
while true; do
  wait -n "$coordinator" "${running[@]}" || true
  kill -0 "$coordinator" 2>/dev/null || { echo "the coordinator exited; stopping the groups" >&2; break; }
  left=()
  for ((g = 0; g < groups; ++g)); do
    pid=${workers[$g]}
    if kill -0 "$pid" 2>/dev/null; then left+=("$pid")
    elif [[ " ${running[*]} " == *" $pid "* ]]; then echo "worker group $g (mpirun $pid) exited" >&2
    fi
  done
  running=("${left[@]}")
  [ "${#running[@]}" -gt 0 ] || { echo "every worker group exited; stopping the coordinator" >&2; break; }
done
stop
exit 1
