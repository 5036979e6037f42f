#!/usr/bin/env bash
# The cluster-scale study of issue 16, run by `mlaserve simulate` on a measured step profile:
# G worker groups of the profile's TP size (16 to 1,024 GPUs in TP8 groups by default), the
# offered load growing with G, and per G the deployment choices compared on one workload:
#   base          least-loaded routing
#   cache-aware   prefix caching with cache-aware routing
#   rebalance     base plus the coordinator's rebalancing by migration
#   disaggregated a quarter of the groups prefill, the rest decode (caches handed over; from
#                 two groups on)
#   failure       base with group 0 dying halfway through the arrivals
# and, when PROFILE_REPLICATE names a profile of the replicated cache layout, base on it too.
# Prints a table: throughput, goodput (requests within the SLOs), p50/p99 TTFT, p50 TPOT and
# GPU-hours per million output tokens (multiply by a GPU-hour's price for the cost), and
# writes each run's result JSON under OUT_DIR. Clearly a simulation: its numbers are as good
# as the profile and the calibration (docs/BENCHMARKS.md, simulator validation).
#   tests/bench/cluster_study.sh PROFILE [OUT_DIR]
# env: MLASERVE (default build/launch/mlaserve, or mlaserve on PATH), GROUPS_LIST
#      (2,8,32,128), RATE_PER_GROUP (requests/s per group, 2), PROMPTS_PER_GROUP (200),
#      PREFIXES (64), PREFIX_LEN (2048), INPUT_LEN (lognormal:256,0.6), OUTPUT_LEN
#      (lognormal:256,0.5), NUM_PAGES (pages per rank, 4096), BLOCK_SIZE (64), STEP_SCALE (1),
#      GOODPUT (ttft:2000 tpot:100), PROFILE_REPLICATE (none).
set -euo pipefail
profile=${1:?usage: tests/bench/cluster_study.sh PROFILE [OUT_DIR]}
out=${2:-$(mktemp -d)}
mkdir -p "$out"
mlaserve=${MLASERVE:-build/launch/mlaserve}
[ -x "$mlaserve" ] || mlaserve=$(command -v mlaserve)
groups_list=${GROUPS_LIST:-2,8,32,128}
tp=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('tp', 1))" "$profile")

run() {  # run NAME GROUPS PROFILE FLAGS...: one simulation, its result in $out/NAME.gGROUPS.json
  local name=$1 g=$2 prof=$3
  shift 3
  local prompts=$((g * ${PROMPTS_PER_GROUP:-200}))
  local rate
  rate=$(python3 -c "print($g * ${RATE_PER_GROUP:-2})")
  "$mlaserve" --log-level warn simulate --profile "$prof" --groups "$g" \
    --num-pages "${NUM_PAGES:-4096}" --block-size "${BLOCK_SIZE:-64}" \
    --max-concurrency $((g * 256)) --max-in-flight $((g * 512)) --num-prompts "$prompts" \
    --request-rate "$rate" --dataset shared-prefix --prefix-groups "${PREFIXES:-64}" \
    --prefix-len "${PREFIX_LEN:-2048}" --input-len "${INPUT_LEN:-lognormal:256,0.6}" \
    --output-len "${OUTPUT_LEN:-lognormal:256,0.5}" --vocab 32000 --seed 11 \
    --step-scale "${STEP_SCALE:-1}" --goodput "${GOODPUT:-ttft:2000 tpot:100}" \
    --result-file "$out/$name.g$g.json" "$@" >"$out/$name.g$g.log" 2>&1 ||
    { echo "cluster_study: $name at $g groups failed: $(tail -3 "$out/$name.g$g.log")" >&2; return 1; }
}

for g in ${groups_list//,/ }; do
  echo "== $g groups of TP$tp ($((g * tp)) GPUs)"
  run base "$g" "$profile"
  run cache-aware "$g" "$profile" --prefix-caching --routing cache-aware
  run rebalance "$g" "$profile" --rebalance
  [ "$g" -ge 2 ] && run disaggregated "$g" "$profile" --prefill-groups $(((g + 3) / 4))
  half=$(python3 -c "print(${PROMPTS_PER_GROUP:-200} / ${RATE_PER_GROUP:-2} / 2)")
  run failure "$g" "$profile" --fail-group "0@$half"
  if [ -n "${PROFILE_REPLICATE:-}" ]; then
    run replicated "$g" "$PROFILE_REPLICATE" --kv-shard replicate
  fi
done

python3 - "$out" "$groups_list" "$tp" <<'EOF'
import json, os, sys
out, groups, tp = sys.argv[1], [int(g) for g in sys.argv[2].split(",")], int(sys.argv[3])
print("| groups | GPUs | deployment | output tok/s | goodput req/s | TTFT p50 ms | TTFT p99 ms "
      "| TPOT p50 ms | GPU-hours per 1M output tokens | migrations | prefix hit rate |")
print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for g in groups:
    for name in ("base", "cache-aware", "rebalance", "disaggregated", "failure", "replicated"):
        path = os.path.join(out, f"{name}.g{g}.json")
        if not os.path.exists(path):
            continue
        r = json.load(open(path))
        tps = r["output_throughput"]
        gpu_hours = g * tp / 3600.0 * 1e6 / tps if tps > 0 else float("inf")
        print(f"| {g} | {g * tp} | {name} | {tps:,.0f} | {r.get('request_goodput') or 0:,.2f} | "
              f"{r['median_ttft_ms']:,.1f} | {r['p99_ttft_ms']:,.1f} | {r['median_tpot_ms']:,.2f} | "
              f"{gpu_hours:,.3f} | {r['simulation']['migrations']} | "
              f"{r['simulation']['prefix_hit_rate']:.3f} |")
EOF
