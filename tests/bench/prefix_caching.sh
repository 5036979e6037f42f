#!/usr/bin/env bash
# Prefix caching measured with `mlaserve bench`'s shared-prefix workload (N system prompts of
# PREFIX_LEN tokens, each followed by INPUT_LEN-token questions) against a coordinator and one
# single-rank worker group, with cache.prefix_caching off and then on: output throughput, TTFT
# p50/p99 and, with caching on, the hit rate from the worker's Prometheus counters
# (mlaserve_prefix_cache_hit_tokens_total / mlaserve_prefix_cache_lookup_tokens_total).
#   tests/bench/prefix_caching.sh [OUT_DIR]
# env: MLASERVE (default build/launch/mlaserve), MODEL (default: make-tiny PRESET into OUT_DIR),
#      PRESET (v3), MAKE_TINY_FLAGS, WORKER_FLAGS (e.g. "--device cuda"), PREFIXES (8),
#      PREFIX_LEN (512), INPUT_LEN (64), OUTPUT_LEN (32), PROMPTS (200), RATE (inf),
#      CONCURRENCY (32), NUM_PAGES (512).
set -euo pipefail
out=${1:-$(mktemp -d)}
mkdir -p "$out"
mlaserve=${MLASERVE:-build/launch/mlaserve}
read -r grpc control wport metrics <<<"$(python3 -c "
import socket
s=[socket.socket() for _ in range(4)]
[x.bind(('127.0.0.1',0)) for x in s]
print(' '.join(str(x.getsockname()[1]) for x in s))")"
export MLASERVE_CONTROL_SECRET=prefix-caching-bench-secret OPENBLAS_NUM_THREADS=1
model=${MODEL:-$out/tiny}
if [ -z "${MODEL:-}" ]; then
  "$mlaserve" --log-level warn make-tiny --preset "${PRESET:-v3}" ${MAKE_TINY_FLAGS:-} \
    --out "$model" --seed 7
fi
workload=(--dataset shared-prefix --prefix-groups "${PREFIXES:-8}" --prefix-len "${PREFIX_LEN:-512}"
  --input-len "${INPUT_LEN:-64}" --output-len "${OUTPUT_LEN:-32}" --num-prompts "${PROMPTS:-200}"
  --request-rate "${RATE:-inf}" --max-concurrency "${CONCURRENCY:-32}" --vocab 512 --seed 3)

"$mlaserve" coordinator --address 127.0.0.1:$grpc --control-address 127.0.0.1:$control \
  >"$out/coordinator.log" 2>&1 &
coordinator=$!
trap 'kill -TERM $coordinator ${worker:-} 2>/dev/null || true; wait 2>/dev/null || true' EXIT
printf 'workers:\n  metrics_port_base: %s\n' "$metrics" >"$out/worker.yaml"
for mode in off on; do
  flags=()
  [ "$mode" = on ] && flags=(--prefix-caching)
  # shellcheck disable=SC2086
  "$mlaserve" worker --model "$model" --num-pages "${NUM_PAGES:-512}" ${WORKER_FLAGS:-} \
    "${flags[@]}" --coordinator 127.0.0.1:$control --port-base $wport \
    --config "$out/worker.yaml" \
    >"$out/worker-$mode.log" 2>&1 &
  worker=$!
  "$mlaserve" --log-level warn client --address 127.0.0.1:$grpc --wait-ready 120
  "$mlaserve" --log-level warn bench --address 127.0.0.1:$grpc --no-progress --warmup 8 \
    "${workload[@]}" --result-file "$out/$mode.json" >"$out/$mode.txt" 2>&1
  curl -s "http://127.0.0.1:$metrics/metrics" >"$out/metrics-$mode.txt"
  kill -TERM $worker
  wait $worker || true
  # The coordinator forgets the stopped worker's id binding only after a while: wait until it
  # lists the worker dead before the next one registers on the same port.
  sleep 3
done

python3 - "$out" <<'EOF'
import json, os, re, sys
out = sys.argv[1]
def counter(mode, name):
    text = open(os.path.join(out, f"metrics-{mode}.txt")).read()
    m = re.search(rf"^{name}{{[^}}]*}} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0
print("| prefix caching | output tok/s | TTFT p50 ms | TTFT p99 ms | hit rate |")
print("|---|---:|---:|---:|---:|")
for mode in ("off", "on"):
    r = json.load(open(os.path.join(out, f"{mode}.json")))
    lookup = counter(mode, "mlaserve_prefix_cache_lookup_tokens_total")
    hit = counter(mode, "mlaserve_prefix_cache_hit_tokens_total")
    rate = f"{hit / lookup:.3f}" if lookup else "-"
    print(f"| {mode} | {r['output_throughput']:.1f} | {r['median_ttft_ms']:.1f} | "
          f"{r['p99_ttft_ms']:.1f} | {rate} |")
EOF
