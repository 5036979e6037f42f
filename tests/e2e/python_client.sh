#!/usr/bin/env bash
# The Python example client (grpcio, generated stubs) against real processes on loopback:
#   1. streams the golden greedy tokens of tests/data/v3 prompt 0 from a coordinator and a
#      worker;
#   2. with two coordinators (the worker registered with both), a long stream whose
#      coordinator is SIGKILLed mid-stream resumes on the other: the same tokens as the
#      unbroken stream, none lost or repeated.
#   python_client.sh MLASERVE DATA_DIR REPO_DIR
set -euo pipefail
mlaserve=$1 data=$2 repo=$3
python=/usr/bin/python3
"$python" -c "import grpc, google.protobuf" || { echo "FAIL: $python lacks grpcio/protobuf"; exit 1; }
ports=$("$python" -c "
import socket
s=[socket.socket() for _ in range(5)]
[x.bind(('127.0.0.1',0)) for x in s]
print(' '.join(str(x.getsockname()[1]) for x in s))")
read -r c1 k1 c2 k2 wport <<<"$ports"
logs=$(mktemp -d)
export MLASERVE_CONTROL_SECRET=python-client-test-secret
"$mlaserve" coordinator --address 127.0.0.1:$c1 --control-address 127.0.0.1:$k1 \
  >"$logs/coordinator1.log" 2>&1 &
coordinator1=$!
"$mlaserve" coordinator --address 127.0.0.1:$c2 --control-address 127.0.0.1:$k2 \
  >"$logs/coordinator2.log" 2>&1 &
coordinator2=$!
"$mlaserve" worker --model "$data/v3" --coordinator 127.0.0.1:$k1,127.0.0.1:$k2 \
  --port-base $wport >"$logs/worker.log" 2>&1 &
worker=$!
cleanup() {
  kill -TERM $worker $coordinator1 $coordinator2 2>/dev/null || true
  wait $worker $coordinator1 $coordinator2 2>/dev/null || true
  rm -rf "$logs"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  for f in "$logs"/*.log; do echo "---- $f"; tail -20 "$f"; done
  exit 1
}
"$mlaserve" --log-level warn client --address 127.0.0.1:$c1 --wait-ready 60
"$mlaserve" --log-level warn client --address 127.0.0.1:$c2 --wait-ready 60
client=("$python" "$repo/rpc/python/mlaserve_client.py" --proto-root "$repo/rpc/proto"
  --stubs-dir "$logs/stubs")

out=$("${client[@]}" --address 127.0.0.1:$c1 --prompt-ids 185,17,139,162,42 --max-tokens 8 \
  --ignore-eos 2>&1)
echo "$out"
grep -q "1 118 182 201 135 5 126 142" <<<"$out" || fail "not the golden tokens"

# The unbroken stream, then the same request while its coordinator is killed.
long=(--prompt-ids 185,17,139,162,42 --max-tokens 240 --ignore-eos)
expected=$("${client[@]}" --address 127.0.0.1:$c1 "${long[@]}" 2>/dev/null | sed -n 1p)
[ "$(wc -w <<<"$expected")" = 240 ] || fail "the unbroken stream has $(wc -w <<<"$expected") tokens"
"${client[@]}" --address 127.0.0.1:$c1,127.0.0.1:$c2 "${long[@]}" >"$logs/resumed.out" \
  2>"$logs/resumed.err" &
resumed=$!
for _ in $(seq 2000); do
  [ -s "$logs/resumed.out" ] && break
  sleep 0.005
done
kill -9 $coordinator1
wait $resumed || fail "the resumed client failed: $(cat "$logs/resumed.err")"
got=$(sed -n 1p "$logs/resumed.out")
grep -q "resuming on 127.0.0.1:$c2" "$logs/resumed.err" || fail "the stream was not resumed: \
$(cat "$logs/resumed.err"); $(wc -w <<<"$got") tokens"
[ "$got" = "$expected" ] || fail "the resumed stream differs from the unbroken one"
echo "resumed after the coordinator was killed: $(grep -o 'after [0-9]* tokens' "$logs/resumed.err"), 240 tokens as unbroken"
echo "python_client: 2 passed, 0 failed"
