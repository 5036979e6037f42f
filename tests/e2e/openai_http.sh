#!/usr/bin/env bash
# The OpenAI-compatible HTTP API with the clients users have, unmodified: the official `openai`
# Python SDK (tests/e2e/openai_http.py), curl -N reading server-sent events, and AIPerf
# benchmarking the endpoint. A coordinator with --http-address and two worker groups serve a
# tiny model written by make-tiny (its tokenizer and DeepSeek-V3's chat template beside it); a
# second coordinator without workers (and with an API key) answers 401 without the key, 503
# with it.
#   openai_http.sh MLASERVE REPO_DIR
# The SDK and AIPerf come from the project's Python test tools (REPO_DIR/.venv, made by
# tests/run.sh through launch/setup.sh's mla_python_tools).
set -euo pipefail
mlaserve=$1 repo=$2
python=$repo/.venv/bin/python
"$python" -c "import openai" 2>/dev/null ||
  { echo "FAIL: $python lacks the openai SDK (tests/run.sh installs the Python test tools)"; exit 1; }
aiperf=$repo/.venv/bin/aiperf
ports=$("$python" -c "
import socket
s=[socket.socket() for _ in range(9)]
[x.bind(('127.0.0.1',0)) for x in s]
print(' '.join(str(x.getsockname()[1]) for x in s))")
read -r grpc control http metrics wport grpc2 control2 http2 spare <<<"$ports"
work=$(mktemp -d)
export MLASERVE_CONTROL_SECRET=openai-http-test-secret
"$mlaserve" --log-level warn make-tiny --preset v3 --out "$work/tiny" --seed 7
cat >"$work/deploy.yaml" <<EOF
coordinator:
  http:
    max_body_bytes: 65536
    model_name: tiny-v3
EOF
common=(--config "$work/deploy.yaml" --tokenizer "$work/tiny")
"$mlaserve" coordinator "${common[@]}" --address 127.0.0.1:$grpc --control-address 127.0.0.1:$control \
  --http-address 127.0.0.1:$http --metrics-port $metrics --max-in-flight 6 >"$work/coordinator.log" 2>&1 &
pids=$!
MLASERVE_API_KEY=idle-key "$mlaserve" coordinator "${common[@]}" --address 127.0.0.1:$grpc2 \
  --control-address 127.0.0.1:$control2 --http-address 127.0.0.1:$http2 >"$work/idle.log" 2>&1 &
pids="$pids $!"
worker_pids=""
for g in 0 1; do
  "$mlaserve" worker --model "$work/tiny" --coordinator 127.0.0.1:$control --port-base $wport \
    --group $g >"$work/worker$g.log" 2>&1 &
  pids="$pids $!"
  worker_pids="$worker_pids${worker_pids:+,}$!"
done
cleanup() {
  kill -TERM $pids 2>/dev/null || true
  wait $pids 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  for f in "$work"/*.log "$work"/aiperf/logs/*.log; do [ -f "$f" ] && { echo "---- $f"; tail -20 "$f"; }; done
  exit 1
}
"$mlaserve" --log-level warn client --address 127.0.0.1:$grpc --wait-ready 60
for _ in $(seq 100); do
  [ "$("$mlaserve" --log-level warn client --address 127.0.0.1:$grpc --status | grep -cE '^\S+\s+\S+\s+alive')" = 2 ] && break
  sleep 0.1
done
base=http://127.0.0.1:$http

echo "== curl -N: server-sent events"
sse=$(curl -sN "$base/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "tiny-v3", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
       "temperature": 0, "stream": true, "ignore_eos": true}')
echo "$sse" | head -3
[ "$(grep -c '^data: ' <<<"$sse")" -ge 3 ] || fail "too few SSE events"
[ "$(grep '^data: ' <<<"$sse" | tail -1)" = "data: [DONE]" ] || fail "the stream does not end with [DONE]"
grep -q '"finish_reason":"length"' <<<"$sse" || fail "no finish_reason in the stream"
code=$(curl -s -o "$work/err.json" -w '%{http_code}' "$base/v1/chat/completions" -d '{"model": 1}')
[ "$code" = 400 ] && grep -q '"param":"model"' "$work/err.json" || fail "curl: bad model field gave $code"

echo "== AIPerf against the endpoint"
if [ -x "$aiperf" ]; then
  (cd "$work" && timeout 300 "$aiperf" profile --model tiny-v3 --url "$base" \
    --endpoint-type chat --streaming --tokenizer "$work/tiny" --request-count 24 \
    --concurrency 4 --synthetic-input-tokens-mean 32 --output-tokens-mean 16 \
    --extra-inputs ignore_eos:true --random-seed 1 --ui-type none \
    --artifact-dir "$work/aiperf" >"$work/aiperf.log" 2>&1) || fail "aiperf profile failed"
  result=$(find "$work/aiperf" -name 'profile_export_aiperf.json' | head -1)
  [ -n "$result" ] || fail "aiperf wrote no profile_export_aiperf.json"
  "$python" - "$result" <<'EOF' || fail "aiperf's numbers"
import json, sys
d = json.load(open(sys.argv[1]))
count = d["request_count"]["avg"]
errors = d.get("error_request_count", {}).get("avg", 0) if isinstance(d.get("error_request_count"), dict) else 0
ttft = d["time_to_first_token"]["avg"]
tput = d["output_token_throughput"]["avg"]
print(f"aiperf: {count:.0f} requests, {errors:.0f} errors, ttft {ttft:.1f} ms, {tput:.1f} output tokens/s")
assert count == 24 and errors == 0 and ttft > 0 and tput > 0
EOF
else
  fail "AIPerf is not installed in $repo/.venv"
fi
echo "== the openai SDK (ends by killing a worker group mid-stream)"
"$python" "$repo/tests/e2e/openai_http.py" --http "$base" --grpc 127.0.0.1:$grpc \
  --metrics http://127.0.0.1:$metrics --mlaserve "$mlaserve" --model tiny-v3 \
  --no-worker-http http://127.0.0.1:$http2 --worker-pids "$worker_pids" \
  --worker-port-base $wport || fail "openai SDK checks"
echo "PASS"
