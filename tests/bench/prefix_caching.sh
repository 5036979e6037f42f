#!/usr/bin/env bash
# Prefix caching measured with `mlaserve bench`'s shared-prefix workload (N system prompts of
# PREFIX_LEN tokens, each followed by INPUT_LEN-token questions) against a coordinator (routing
# ROUTING) and NUM_GROUPS worker groups of TP ranks, with cache.prefix_caching off and then on:
# output throughput, TTFT p50/p99 and, with caching on, the hit rate from the workers'
# Prometheus counters (mlaserve_prefix_cache_hit_tokens_total /
# mlaserve_prefix_cache_lookup_tokens_total, summed over the workers). Exits non-zero when a
# request did not complete, or caching on served nothing from the cache (ctest
# e2e_prefix_caching runs it small).
#   tests/bench/prefix_caching.sh [OUT_DIR]
# env: MLASERVE (default build/launch/mlaserve), MODEL (default: make-tiny PRESET into OUT_DIR),
#      PRESET (v3), MAKE_TINY_FLAGS, WORKER_FLAGS (e.g. "--device cuda"), PREFIXES (8),
#      PREFIX_LEN (512), INPUT_LEN (64), OUTPUT_LEN (32), PROMPTS (200), RATE (inf),
#      CONCURRENCY (32), NUM_PAGES (512), NUM_GROUPS (1), ROUTING (least-loaded), TP (1: each
#      group one process; more: each group an `mpirun -np TP` job), KV_SHARD (sequence).
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

groups=${NUM_GROUPS:-1}
tp=${TP:-1}
launch=()
[ "$tp" -gt 1 ] && launch=(mpirun -np "$tp" --oversubscribe --bind-to none)
"$mlaserve" coordinator --address 127.0.0.1:$grpc --control-address 127.0.0.1:$control \
  --routing "${ROUTING:-least-loaded}" >"$out/coordinator.log" 2>&1 &
coordinator=$!
trap 'kill -TERM $coordinator ${workers:-} 2>/dev/null || true; wait 2>/dev/null || true' EXIT
printf 'workers:\n  metrics_port_base: %s\n' "$metrics" >"$out/worker.yaml"
for mode in off on; do
  flags=()
  [ "$mode" = on ] && flags=(--prefix-caching)
  workers=""
  for g in $(seq 0 $((groups - 1))); do
    # shellcheck disable=SC2086
    "${launch[@]}" "$mlaserve" worker --model "$model" --num-pages "${NUM_PAGES:-512}" \
      --tp "$tp" --kv-shard "${KV_SHARD:-sequence}" ${WORKER_FLAGS:-} \
      "${flags[@]}" --coordinator 127.0.0.1:$control --port-base $wport --group "$g" \
      --config "$out/worker.yaml" >"$out/worker$g-$mode.log" 2>&1 &
    workers="$workers $!"
  done
  for attempt in $(seq 121); do
    "$mlaserve" --log-level error client --address 127.0.0.1:$grpc --status 2>/dev/null |
      grep -q "^workers: $groups ($groups alive)" && break
    [ "$attempt" = 121 ] && { echo "the workers did not come up" >&2; exit 1; }
    sleep 1
  done
  "$mlaserve" --log-level warn bench --address 127.0.0.1:$grpc --no-progress --warmup 8 \
    "${workload[@]}" --result-file "$out/$mode.json" >"$out/$mode.txt" 2>&1
  : >"$out/metrics-$mode.txt"
  for g in $(seq 0 $((groups - 1))); do
    curl -s "http://127.0.0.1:$((metrics + g))/metrics" >>"$out/metrics-$mode.txt"
  done
  # shellcheck disable=SC2086
  kill -TERM $workers
  # shellcheck disable=SC2086
  wait $workers || true
  # The coordinator forgets the stopped worker's id binding only after a while: wait until it
  # lists the worker dead before the next one registers on the same port.
  sleep 3
done

python3 - "$out" <<'EOF'
import json, os, re, sys
out = sys.argv[1]
def counter(mode, name):
    text = open(os.path.join(out, f"metrics-{mode}.txt")).read()
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} ([0-9.e+]+)$", text, re.M))
print("| prefix caching | output tok/s | TTFT p50 ms | TTFT p99 ms | hit rate |")
print("|---|---:|---:|---:|---:|")
problems = []
for mode in ("off", "on"):
    r = json.load(open(os.path.join(out, f"{mode}.json")))
    lookup = counter(mode, "mlaserve_prefix_cache_lookup_tokens_total")
    hit = counter(mode, "mlaserve_prefix_cache_hit_tokens_total")
    rate = f"{hit / lookup:.3f}" if lookup else "-"
    print(f"| {mode} | {r['output_throughput']:.1f} | {r['median_ttft_ms']:.1f} | "
          f"{r['p99_ttft_ms']:.1f} | {rate} |")
    if r["completed"] != r["num_prompts"]:
        problems.append(f"caching {mode}: {r['completed']} of {r['num_prompts']} completed")
    if mode == "on" and hit <= 0:
        problems.append("caching on: no prompt token came from the cache")
    if mode == "off" and lookup > 0:
        problems.append("caching off: the worker looked prefixes up")
for p in problems:
    print("FAILED:", p)
sys.exit(1 if problems else 0)
EOF
