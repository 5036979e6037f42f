#!/usr/bin/env bash
# launch/cluster.sh as documented, with a hostfile: two TP2 groups of tests/data/v3, each its
# own mpirun job on its own slots. SIGKILL of group 0's follower rank ends group 0's job
# alone: the script reports it and keeps running, group 1 serves every request, and SIGTERM
# to the script stops the rest cleanly (exit 0).
#   cluster_script.sh MLASERVE DATA_DIR REPO_DIR
set -euo pipefail
mlaserve=$1 data=$2 repo=$3
work=$(mktemp -d)
# Two free ports for the coordinator, and a free pair for the groups (port_base, port_base + 1).
read -r cport kport wport <<<"$(/usr/bin/python3 -c "
import socket
def free(n):
    s = [socket.socket() for _ in range(n)]
    for x in s: x.bind(('127.0.0.1', 0))
    return s
def pair():
    while True:
        a = socket.socket(); a.bind(('127.0.0.1', 0)); p = a.getsockname()[1]
        b = socket.socket()
        try:
            b.bind(('127.0.0.1', p + 1))
            return [a, b]
        except OSError:
            a.close()
s = free(2) + pair()
print(s[0].getsockname()[1], s[1].getsockname()[1], s[2].getsockname()[1])")"
cat >"$work/cluster.yaml" <<EOF
model: $data/v3
parallel:
  tp: 2
coordinator:
  address: 127.0.0.1:$cport
  control_address: 127.0.0.1:$kport
workers:
  port_base: $wport
EOF
echo "localhost slots=4" >"$work/hosts"
cluster=""
cleanup() {
  [ -n "$cluster" ] && kill -TERM "$cluster" 2>/dev/null && wait "$cluster" 2>/dev/null
  pkill -KILL -f "$work/cluster.yaml" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  tail -40 "$work/cluster.log"
  exit 1
}

MLASERVE="$mlaserve" "$repo/launch/cluster.sh" --config "$work/cluster.yaml" --groups 2 \
  --hostfile "$work/hosts" >"$work/cluster.log" 2>&1 &
cluster=$!
for _ in $(seq 120); do
  grep -q "cluster ready" "$work/cluster.log" && break
  kill -0 $cluster 2>/dev/null || fail "cluster.sh exited before the cluster was ready"
  sleep 0.5
done
grep -q "cluster ready" "$work/cluster.log" || fail "not ready after 60 s"
[ "$(pgrep -fc "mpirun .*--host localhost:2 .*$work/cluster.yaml")" = 2 ] ||
  fail "not one mpirun job per group on its hostfile slots"

# Group 0's follower: the worker process of group 0 that is MPI world rank 1 of its job.
victim=""
for pid in $(pgrep -f "mlaserve worker --config $work/cluster.yaml --group 0"); do
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1" &&
    [ "$(tr '\0' ' ' <"/proc/$pid/cmdline")" != "${pid}" ] && ! grep -q mpirun "/proc/$pid/cmdline" &&
    victim=$pid
done
[ -n "$victim" ] || fail "no follower rank of group 0 found"
kill -KILL "$victim"
for _ in $(seq 40); do
  grep -q "worker group 0 .* exited" "$work/cluster.log" && break
  sleep 0.25
done
grep -q "worker group 0 .* exited" "$work/cluster.log" || fail "group 0's job did not end"
kill -0 $cluster 2>/dev/null || fail "cluster.sh stopped with group 0"

client=("$mlaserve" --log-level warn client --address 127.0.0.1:$cport)
for i in 1 2 3 4; do
  out=$("${client[@]}" --prompt-ids 185,17,139,162,42 --max-tokens 8 --ignore-eos) ||
    fail "request $i failed after the kill: $out"
  grep -q "^1 118 182 201 135 5 126 142" <<<"$out" || fail "request $i: not the golden tokens"
  grep -q "127.0.0.1:$((wport + 1))" <<<"$("${client[@]}" --status)" || fail "group 1 missing"
done
status=$("${client[@]}" --status)
grep -q "127.0.0.1:$((wport + 1)) .* alive" <<<"$status" || fail "group 1 is not alive: $status"

kill -TERM $cluster
for _ in $(seq 120); do kill -0 $cluster 2>/dev/null || break; sleep 0.25; done
kill -0 $cluster 2>/dev/null && fail "cluster.sh did not stop within 30 s of SIGTERM"
wait $cluster && rc=0 || rc=$?
cluster=""
[ "$rc" = 0 ] || fail "cluster.sh exited $rc after SIGTERM"
echo "cluster_script: group 0's follower killed, group 0's job ended alone, group 1 served 4/4;" \
  "stopped cleanly"
