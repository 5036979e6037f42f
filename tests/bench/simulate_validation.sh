#!/usr/bin/env bash
# `mlaserve simulate` against measurement on the CPU cluster: profiles the make-tiny model's
# steps on this machine (`mlaserve profile`, one worker's settings), starts a coordinator and
# GROUPS single-rank worker groups, runs `mlaserve bench` at each rate, then `mlaserve
# simulate` with the same workload, seed and settings, and prints measured against simulated
# throughput and p50 TTFT / TPOT with their errors. The workers trace their steps
# (--step-trace), and `mlaserve simulate --check-trace` holds the profile's step model against
# each rate's traced steps: how much longer the steps and the workers' loop iterations took
# while serving than the profile says. A second simulation is calibrated on what was measured:
# each kind of step (decode, prefill, mixed) scaled by its ratio for the whole loop
# (loop_over_model) on the highest rate's trace (--step-scale decode=..,prefill=..,mixed=..),
# and the request's way in by the overhead a probe measured before the rates: 30 one-token
# requests of 16 prompt tokens, one at a time, whose median TTFT less their traced steps'
# median is what a request spends outside the step (--request-ms is that less --network-ms).
# Its errors are printed beside the first: calibrated on one rate, checked on all. The
# calibration is also written to OUT_DIR/calibration.env (STEP_SCALE=.., REQUEST_MS=..), for a
# run whose own traces cannot give it: groups sharing a device (GROUPS_PER_DEVICE > 1) trace
# steps stretched by the sharing the simulation models itself, so such a run takes STEP_SCALE
# and REQUEST_MS from a one-group run's file instead.
#   tests/bench/simulate_validation.sh [OUT_DIR]
# env: MLASERVE (default build/launch/mlaserve), RATES (5,10,20,40), PROMPTS (200),
#      NUM_GROUPS (2), INPUT_LEN (uniform:32-128), OUTPUT_LEN (32), CONCURRENCY (64),
#      PRESET (v3) and MAKE_TINY_FLAGS (none) for the model, WORKER_FLAGS (none; e.g.
#      "--device cuda": the groups and the profile on the GPU), WARMUP (20: bench's warm-up
#      requests before each rate), GROUPS_PER_DEVICE (1: simulate's --groups-per-device; the
#      measured groups share one GPU when WORKER_FLAGS puts them there), STEP_SCALE and
#      REQUEST_MS (the calibration, instead of this run's).
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
network_ms=0.3  # simulate's default: a message's way out
# The workers' trace lines added since `mark`, into the file named.
mark() {
  for g in $(seq 0 $((groups - 1))); do
    touch "$out/steps$g.jsonl"
    eval "before$g=$(wc -l <"$out/steps$g.jsonl")"
  done
}
since_mark() {
  : >"$1"
  for g in $(seq 0 $((groups - 1))); do
    eval "skip=\$before$g"
    tail -n +$((skip + 1)) "$out/steps$g.jsonl" >>"$1"
  done
}

workload=(--num-prompts "$prompts" --max-concurrency "$concurrency" --input-len "$input_len"
  --output-len "$output_len" --vocab 512)
# Every step shape the rates will meet, once, before any is timed: the first of a shape can take
# several times its time (lazily loaded kernels), which bench's own warm-up does not cover.
echo "== warm-up: the workload at the highest rate, another seed, left out"
"$mlaserve" --log-level warn bench --address 127.0.0.1:$grpc --no-progress "${workload[@]}" \
  --seed 6 --request-rate "${rates##*,}" >"$out/warmup.txt" 2>&1
workload+=(--seed 5)

echo "== probe: a request's time outside its step"
mark
"$mlaserve" --log-level warn bench --address 127.0.0.1:$grpc --no-progress --warmup 5 \
  --num-prompts 30 --max-concurrency 1 --input-len 16 --output-len 1 --vocab 512 --seed 3 \
  --result-file "$out/probe.json" >"$out/probe.txt" 2>&1
since_mark "$out/steps.probe.jsonl"
request_ms=$(python3 - "$out" "$network_ms" <<'EOF'
import json, statistics, sys
out, network_ms = sys.argv[1], float(sys.argv[2])
ttft = json.load(open(f"{out}/probe.json"))["median_ttft_ms"]
steps = [json.loads(l) for l in open(f"{out}/steps.probe.jsonl") if l.strip()]
loop = statistics.median(s["loop_ms"] for s in steps if s["prefill_tokens"] == 16)
outside = ttft - loop
print(f"PROBE ttft_p50_ms={ttft:.3f} step_loop_p50_ms={loop:.3f} outside_ms={outside:.3f} "
      f"request_ms={outside - network_ms:.3f}", file=sys.stderr)
print(f"{max(outside - network_ms, 0.0):.3f}")
EOF
)
: >"$out/trace_check.txt"
for rate in ${rates//,/ }; do
  # Each rate's steps: the trace lines the workers add during its run.
  mark
  "$mlaserve" --log-level warn bench --address 127.0.0.1:$grpc --no-progress --warmup "${WARMUP:-20}" \
    "${workload[@]}" --request-rate "$rate" --result-file "$out/measured.rate$rate.json" \
    --save-detailed >>"$out/measured.txt" 2>&1
  since_mark "$out/steps.rate$rate.jsonl"
  # (The trace also holds the steps of bench's warm-up requests.)
  "$mlaserve" --log-level warn simulate --profile "$out/profile.json" \
    --check-trace "$out/steps.rate$rate.jsonl" | sed "s/^TRACE /TRACE rate=$rate /" \
    >>"$out/trace_check.txt" || echo "check-trace failed at rate $rate" >&2
done
echo "== simulated"
"$mlaserve" --log-level warn simulate --profile "$out/profile.json" --groups "$groups" \
  --num-pages 256 --max-batch-tokens 512 --max-running 64 "${workload[@]}" \
  --groups-per-device "${GROUPS_PER_DEVICE:-1}" --request-rate "$rates" \
  --result-file "$out/simulated.json" >"$out/simulated.txt" 2>&1
# Each kind's loop_over_model on the highest rate's trace (a kind it lacks, or one the model gave
# no time: the whole trace's; none at all: 1).
ratio() {
  { grep "rate=${rates##*,} .*kind=$1 " "$out/trace_check.txt" || true; } |
    sed 's/.* loop_over_model=\([0-9.]*\) .*/\1/' | grep -v '^0*\.0*$' || true
}
all=$(ratio all)
all=${all:-1}
scale=""
for kind in decode prefill mixed; do
  r=$(ratio $kind)
  scale="$scale${scale:+,}$kind=${r:-$all}"
done
echo "STEP_SCALE=$scale REQUEST_MS=$request_ms" >"$out/calibration.env"
from="the rate ${rates##*,} trace's loop_over_model per kind; --request-ms: the probe"
if [ -n "${STEP_SCALE:-}" ]; then
  scale=$STEP_SCALE request_ms=${REQUEST_MS:-$request_ms}
  from="given (STEP_SCALE, REQUEST_MS)"
fi
echo "== calibrated: --step-scale $scale --request-ms $request_ms ($from)"
"$mlaserve" --log-level warn simulate --profile "$out/profile.json" --groups "$groups" \
  --num-pages 256 --max-batch-tokens 512 --max-running 64 "${workload[@]}" \
  --request-rate "$rates" --step-scale "$scale" --request-ms "$request_ms" \
  --network-ms "$network_ms" --groups-per-device "${GROUPS_PER_DEVICE:-1}" \
  --result-file "$out/calibrated.json" --save-detailed \
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
# Request by request (the same work items in the same order in both): p50 TTFT of the
# calibrated run against the measured one, by the prompt's chunks (of --max-batch-tokens 512).
print()
print("| rate | prompt chunks | requests | TTFT p50 ms measured | calibrated | error |")
print("|---|---|---|---|---|---|")
def median(v):
    v = sorted(v)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2 if v else 0.0
for rate in rates:
    m, s = load("measured", rate), load("calibrated", rate)
    if "ttfts" not in m or "ttfts" not in s or m["input_lens"] != s["input_lens"]:
        continue
    by = {}
    for n, a, b, e in zip(m["input_lens"], m["ttfts"], s["ttfts"], m["errors"]):
        if not e:
            by.setdefault(min((n + 511) // 512, 3), []).append((a * 1000, b * 1000))
    for chunks, pairs in sorted(by.items()):
        a, b = median([p[0] for p in pairs]), median([p[1] for p in pairs])
        label = f"{chunks}" if chunks < 3 else "3+"
        print(f"| {rate} | {label} | {len(pairs)} | {a:.1f} | {b:.1f} | {(b - a) / a * 100:+.0f} % |")
EOF
echo
echo "The profile's step model against the steps the workers traced while serving:"
grep 'kind=all' "$out/trace_check.txt" || true
