#!/usr/bin/env bash
# `mlaserve simulate` against measurement on the CPU cluster: profiles the make-tiny model's
# steps on this machine (`mlaserve profile`, one worker's settings), starts a coordinator and
# GROUPS single-rank worker groups, runs `mlaserve bench` at each rate, then `mlaserve
# simulate` with the same workload, seed and settings, and prints measured against simulated
# throughput and p50 TTFT / TPOT with their errors. The workers trace their steps
# (--step-trace), and `mlaserve simulate --check-trace` holds the profile's step model against
# each rate's traced steps: how much longer the steps and the workers' loop iterations took
# while serving than the profile says. The highest rate's ratio for the whole loop
# (loop_over_model) then calibrates a second simulation (--step-scale), whose errors are
# printed beside the first: calibrated on one rate, checked on all.
#   tests/bench/simulate_validation.sh [OUT_DIR]
# env: MLASERVE (default build/launch/mlaserve), RATES (5,10,20,40), PROMPTS (200),
#      NUM_GROUPS (2), INPUT_LEN (uniform:32-128), OUTPUT_LEN (32), CONCURRENCY (64),
#      PRESET (v3) and MAKE_TINY_FLAGS (none) for the model, WORKER_FLAGS (none; e.g.
#      "--device cuda": the groups and the profile on the GPU).
set -euo pipefail
out=${1:-$(mktemp -d)}
mkdir -p "$out"
mlaserve=${MLASERVE:-build/launch/mlaserve}
rates=${RATES:-5,10,20,40}
prompts=${PROMPTS:-200}
groups=${NUM_GROUPS:-2}
input_len=${INPUT_LEN:-uniform:32-128}
output_len=${OUTPUT_LEN:-32}
concurrency=${CONCURRENCY:-64}
engine=(--num-pages 256 --max-batch-tokens 512 --max-running 64 ${WORKER_FLAGS:-})
read -r grpc control wport <<<"$(python3 -c "
import socket
s=[socket.socket() for _ in range(3)]
[x.bind(('127.0.0.1',0)) for x in s]
print(' '.join(str(x.getsockname()[1]) for x in s))")"
export MLASERVE_CONTROL_SECRET=simulate-validation-secret OPENBLAS_NUM_THREADS=1
"$mlaserve" --log-level warn make-tiny --preset "${PRESET:-v3}" ${MAKE_TINY_FLAGS:-} --out "$out/tiny" \
  --seed 7

echo "== profile"
"$mlaserve" --log-level warn profile --model "$out/tiny" "${engine[@]}" \
  --prefill 16,32,64,128,256,512 --batch 1,2,4,8,16,32,64 --context 32,64,128,256 \
  --out "$out/profile.json"

echo "== measured: $groups groups"
"$mlaserve" coordinator --address 127.0.0.1:$grpc --control-address 127.0.0.1:$control \
  >"$out/coordinator.log" 2>&1 &
pids=$!
for g in $(seq 0 $((groups - 1))); do
  "$mlaserve" worker --model "$out/tiny" "${engine[@]}" --coordinator 127.0.0.1:$control \
    --port-base $wport --group $g --step-trace "$out/steps$g.jsonl" >"$out/worker$g.log" 2>&1 &
  pids="$pids $!"
done
trap 'kill -TERM $pids 2>/dev/null || true; wait $pids 2>/dev/null || true' EXIT
"$mlaserve" --log-level warn client --address 127.0.0.1:$grpc --wait-ready 60
workload=(--num-prompts "$prompts" --max-concurrency "$concurrency" --input-len "$input_len"
  --output-len "$output_len" --vocab 512 --seed 5)
: >"$out/trace_check.txt"
for rate in ${rates//,/ }; do
  # Each rate's steps: the trace lines the workers add during its run.
  for g in $(seq 0 $((groups - 1))); do
    touch "$out/steps$g.jsonl"
    eval "before$g=$(wc -l <"$out/steps$g.jsonl")"
  done
  "$mlaserve" --log-level warn bench --address 127.0.0.1:$grpc --no-progress --warmup 20 \
    "${workload[@]}" --request-rate "$rate" --result-file "$out/measured.rate$rate.json" \
    >>"$out/measured.txt" 2>&1
  : >"$out/steps.rate$rate.jsonl"
  for g in $(seq 0 $((groups - 1))); do
    eval "skip=\$before$g"
    tail -n +$((skip + 1)) "$out/steps$g.jsonl" >>"$out/steps.rate$rate.jsonl"
  done
  # (The trace also holds the steps of bench's warm-up requests.)
  "$mlaserve" --log-level warn simulate --profile "$out/profile.json" \
    --check-trace "$out/steps.rate$rate.jsonl" | sed "s/^TRACE /TRACE rate=$rate /" \
    >>"$out/trace_check.txt" || echo "check-trace failed at rate $rate" >&2
done
echo "== simulated"
"$mlaserve" --log-level warn simulate --profile "$out/profile.json" --groups "$groups" \
  --num-pages 256 --max-batch-tokens 512 --max-running 64 "${workload[@]}" \
  --request-rate "$rates" --result-file "$out/simulated.json" >"$out/simulated.txt" 2>&1
scale=$(grep "rate=${rates##*,} .*kind=all" "$out/trace_check.txt" |
  sed 's/.* loop_over_model=\([0-9.]*\) .*/\1/')
scale=${scale:-1}
echo "== simulated, every step x $scale (the rate ${rates##*,} trace's loop_over_model)"
"$mlaserve" --log-level warn simulate --profile "$out/profile.json" --groups "$groups" \
  --num-pages 256 --max-batch-tokens 512 --max-running 64 "${workload[@]}" \
  --request-rate "$rates" --step-scale "$scale" --result-file "$out/calibrated.json" \
  >"$out/calibrated.txt" 2>&1

python3 - "$out" "$rates" <<'EOF'
import json, os, sys
out, rates = sys.argv[1], sys.argv[2].split(",")
def load(kind, rate):
    name = f"{kind}.rate{rate}.json"
    if not os.path.exists(os.path.join(out, name)):
        name = f"{kind}.json"  # a one-rate simulate names its file as given
    return json.load(open(os.path.join(out, name)))
print("| simulation | rate | output tok/s measured | simulated | error | TTFT p50 ms measured | simulated | error | TPOT p50 ms measured | simulated | error |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for kind in ("simulated", "calibrated"):
    for rate in rates:
        m, s = load("measured", rate), load(kind, rate)
        row = [kind, rate]
        for key in ("output_throughput", "median_ttft_ms", "median_tpot_ms"):
            a, b = m[key], s[key]
            row += [f"{a:.1f}", f"{b:.1f}", f"{(b - a) / a * 100:+.0f} %" if a else "-"]
        print("| " + " | ".join(row) + " |")
EOF
echo
echo "The profile's step model against the steps the workers traced while serving:"
grep 'kind=all' "$out/trace_check.txt" || true
