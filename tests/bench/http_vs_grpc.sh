#!/usr/bin/env bash
# The OpenAI-compatible HTTP API against the gRPC API on the same cluster, in one run: a
# coordinator (with --http-address, HTTP_THREADS threads) and two single-rank worker groups
# serving a make-tiny model, loaded by `mlaserve bench` with CONCURRENCY streams open at once,
# first through gRPC (Generate), then through HTTP (streamed POST /v1/completions, the same
# prompts as token ids). Prints each run's figures, the coordinator's thread count at the
# height of each run, and the HTTP / gRPC ratio of streamed tokens/s. Exits non-zero when a
# run has errors or incomplete streams, or when the coordinator needed more than MAX_THREADS
# threads for the HTTP streams (they must not take a thread each).
#   tests/bench/http_vs_grpc.sh [OUT_DIR]
# env: MLASERVE (default build/launch/mlaserve), CONCURRENCY (1000), REQUESTS (3000),
#      MAX_TOKENS (32), PROMPT_LEN (16), HTTP_THREADS (2), NUM_PAGES (2048 per worker),
#      MAX_RUNNING (256), MAX_THREADS (64).
set -euo pipefail
out=${1:-$(mktemp -d)}
mkdir -p "$out"
mlaserve=${MLASERVE:-build/launch/mlaserve}
concurrency=${CONCURRENCY:-1000}
requests=${REQUESTS:-3000}
max_tokens=${MAX_TOKENS:-32}
prompt_len=${PROMPT_LEN:-16}
http_threads=${HTTP_THREADS:-2}
num_pages=${NUM_PAGES:-2048}
max_running=${MAX_RUNNING:-256}
read -r grpc control http wport <<<"$(python3 -c "
import socket
s=[socket.socket() for _ in range(4)]
[x.bind(('127.0.0.1',0)) for x in s]
print(' '.join(str(x.getsockname()[1]) for x in s))")"
export MLASERVE_CONTROL_SECRET=http-vs-grpc-bench-secret
"$mlaserve" --log-level warn make-tiny --preset v3 --out "$out/tiny" --seed 7
cat >"$out/deploy.yaml" <<EOF
coordinator:
  http:
    threads: $http_threads
EOF
"$mlaserve" coordinator --config "$out/deploy.yaml" --tokenizer "$out/tiny" \
  --address 127.0.0.1:$grpc --control-address 127.0.0.1:$control \
  --http-address 127.0.0.1:$http >"$out/coordinator.log" 2>&1 &
coordinator=$!
pids=$coordinator
for g in 0 1; do
  OPENBLAS_NUM_THREADS=1 "$mlaserve" worker --model "$out/tiny" --coordinator 127.0.0.1:$control \
    --port-base $wport --group $g --num-pages $num_pages --max-running $max_running \
    >"$out/worker$g.log" 2>&1 &
  pids="$pids $!"
done
trap 'kill -TERM $pids 2>/dev/null || true; wait $pids 2>/dev/null || true' EXIT
"$mlaserve" --log-level warn client --address 127.0.0.1:$grpc --wait-ready 60
sleep 1

# The coordinator's threads, sampled every 0.2 s while a run goes; the largest count.
watch_threads() {
  local max=0 n
  while kill -0 "$1" 2>/dev/null; do
    n=$(awk '/^Threads:/ {print $2}' /proc/$coordinator/status)
    [ "$n" -gt "$max" ] && max=$n
    sleep 0.2
  done
  echo "$max"
}

common=(--concurrency "$concurrency" --requests "$requests" --warmup 200 --max-tokens "$max_tokens"
  --prompt-len "$prompt_len" --vocab 512 --timeout 600)
declare -A line threads
for api in grpc http; do
  if [ $api = grpc ]; then target=(--address 127.0.0.1:$grpc); else target=(--http http://127.0.0.1:$http); fi
  "$mlaserve" --log-level warn bench "${target[@]}" "${common[@]}" >"$out/bench_$api.txt" 2>&1 &
  bench=$!
  threads[$api]=$(watch_threads $bench)
  wait $bench || { cat "$out/bench_$api.txt"; echo "FAIL: the $api run"; exit 1; }
  cat "$out/bench_$api.txt"
  line[$api]=$(grep '^BENCH ' "$out/bench_$api.txt")
done
field() { sed -E "s/.* $2=([^ ]+).*/\1/" <<<"${line[$1]}"; }
echo
echo "| API | streams open | requests | tokens/s | TTFT p50 ms | TTFT p99 ms | latency p99 ms | coordinator threads (max) |"
echo "|---|---|---|---|---|---|---|---|"
for api in grpc http; do
  echo "| $api | $concurrency | $(field $api ok) | $(field $api tokens_per_s) | $(field $api ttft_p50_ms) | $(field $api ttft_p99_ms) | $(field $api latency_p99_ms) | ${threads[$api]} |"
done
python3 -c "print(f'HTTP / gRPC streamed tokens/s: {$(field http tokens_per_s) / $(field grpc tokens_per_s):.3f}')"
if [ "${threads[http]}" -gt "${MAX_THREADS:-64}" ]; then
  echo "FAIL: the coordinator ran ${threads[http]} threads for $concurrency HTTP streams"
  exit 1
fi
