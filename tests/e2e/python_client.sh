#!/usr/bin/env bash
# The Python example client (grpcio, generated stubs) streams the golden greedy tokens of
# tests/data/v3 prompt 0 from a real coordinator and worker on loopback.
#   python_client.sh MLASERVE DATA_DIR REPO_DIR
set -euo pipefail
mlaserve=$1 data=$2 repo=$3
python=/usr/bin/python3
"$python" -c "import grpc, google.protobuf" || { echo "FAIL: $python lacks grpcio/protobuf"; exit 1; }
ports=$("$python" -c "
import socket
s=[socket.socket() for _ in range(2)]
[x.bind(('127.0.0.1',0)) for x in s]
print(' '.join(str(x.getsockname()[1]) for x in s))")
read -r cport wport <<<"$ports"
logs=$(mktemp -d)
"$mlaserve" coordinator --address 127.0.0.1:$cport >"$logs/coordinator.log" 2>&1 &
coordinator=$!
"$mlaserve" worker --model "$data/v3" --coordinator 127.0.0.1:$cport --port-base $wport \
  >"$logs/worker.log" 2>&1 &
worker=$!
trap 'kill -TERM $worker $coordinator 2>/dev/null; wait $worker $coordinator 2>/dev/null; rm -rf "$logs"' EXIT
"$mlaserve" --log-level warn client --address 127.0.0.1:$cport --wait-ready 60
out=$("$python" "$repo/rpc/python/mlaserve_client.py" --address 127.0.0.1:$cport \
  --proto-root "$repo/rpc/proto" --prompt-ids 185,17,139,162,42 --max-tokens 8 --ignore-eos 2>&1)
echo "$out"
grep -q "1 118 182 201 135 5 126 142" <<<"$out" || { echo "FAIL: not the golden tokens"; exit 1; }
echo "python_client: 1 passed, 0 failed"
