#!/usr/bin/env bash
# `mlaserve bench` as a serving benchmark on the CPU cluster: a coordinator (with the OpenAI
# API) and two single-rank worker groups serving a make-tiny model; a short Poisson sweep
# (two rates) through gRPC with per-request detail, one run through HTTP on the same schedule,
# a shared-prefix and a trace workload; then checks that each result JSON is complete and
# consistent (vLLM's keys; output tokens = the sum of the per-request outputs; completed =
# requests; the schedule's mean rate within 30 % of the requested one; goodput counted) and
# that tests/bench/plot_bench.py draws its three plots; `mlaserve profile` on the model and
# `mlaserve simulate` of the same sweep write the same result JSON, for the same workload.
#   bench_sweep.sh MLASERVE REPO_DIR
set -euo pipefail
mlaserve=$1 repo=$2
python=/usr/bin/python3
"$python" -c "import matplotlib" || { echo "FAIL: $python lacks matplotlib (python3-matplotlib)"; exit 1; }
read -r grpc control http wport <<<"$("$python" -c "
import socket
s=[socket.socket() for _ in range(4)]
[x.bind(('127.0.0.1',0)) for x in s]
print(' '.join(str(x.getsockname()[1]) for x in s))")"
work=$(mktemp -d)
export MLASERVE_CONTROL_SECRET=bench-sweep-test-secret
"$mlaserve" --log-level warn make-tiny --preset v3 --out "$work/tiny" --seed 7
"$mlaserve" coordinator --tokenizer "$work/tiny" --address 127.0.0.1:$grpc \
  --control-address 127.0.0.1:$control --http-address 127.0.0.1:$http >"$work/coordinator.log" 2>&1 &
pids=$!
for g in 0 1; do
  "$mlaserve" worker --model "$work/tiny" --coordinator 127.0.0.1:$control --port-base $wport \
    --group $g --step-trace "$work/steps$g.jsonl" >"$work/worker$g.log" 2>&1 &
  pids="$pids $!"
done
cleanup() {
  kill -TERM $pids 2>/dev/null || true
  wait $pids 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  for f in "$work"/*.log; do echo "---- $f"; tail -20 "$f"; done
  exit 1
}
"$mlaserve" --log-level warn client --address 127.0.0.1:$grpc --wait-ready 60
bench() { "$mlaserve" --log-level warn bench --no-progress --vocab 512 --seed 3 "$@"; }

echo "== a Poisson sweep through gRPC"
bench --address 127.0.0.1:$grpc --request-rate 20,40 --num-prompts 120 --max-concurrency 32 \
  --input-len uniform:8-32 --output-len lognormal:16,0.4 --goodput ttft:200,tpot:50 \
  --percentiles 50,90,99,99.9 --result-file "$work/grpc.json" --save-detailed \
  >"$work/sweep.log" 2>&1 || fail "the sweep: $(tail -5 "$work/sweep.log")"
tail -6 "$work/sweep.log"
echo "== the same schedule through HTTP"
bench --http http://127.0.0.1:$http --request-rate 40 --num-prompts 120 --max-concurrency 32 \
  --input-len uniform:8-32 --output-len lognormal:16,0.4 --result-file "$work/http.json" \
  --save-detailed >"$work/http.log" 2>&1 || fail "the HTTP run: $(tail -5 "$work/http.log")"
grep '^BENCH' "$work/http.log"
echo "== shared prefixes, and a trace"
bench --address 127.0.0.1:$grpc --dataset shared-prefix --prefix-groups 4 --prefix-len 64 \
  --input-len 16 --output-len 8 --num-prompts 40 --max-concurrency 8 --request-rate 50 \
  --result-file "$work/prefix.json" >"$work/prefix.log" 2>&1 || fail "shared-prefix run"
"$python" - "$work/trace.jsonl" <<'EOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(30):
        line = {"timestamp": 1000 + i * 0.05, "output_len": 4 + i % 5}
        if i % 3 == 0:
            line["prompt"] = f"Request number {i}: say something."
        else:
            line["input_len"] = 10 + i
        f.write(json.dumps(line) + "\n")
EOF
bench --address 127.0.0.1:$grpc --dataset trace --trace "$work/trace.jsonl" --num-prompts 30 \
  --max-concurrency 8 --result-file "$work/trace.json" --save-detailed >"$work/trace.log" 2>&1 ||
  fail "trace run: $(tail -5 "$work/trace.log")"

echo "== profile and simulate the same sweep"
OPENBLAS_NUM_THREADS=1 "$mlaserve" --log-level warn profile --model "$work/tiny" --prefill 16,64 \
  --batch 1,4 --context 32,64 --repeats 3 --out "$work/profile.json" >"$work/profile.log" 2>&1 ||
  fail "profile: $(tail -3 "$work/profile.log")"
"$mlaserve" --log-level warn simulate --profile "$work/profile.json" --groups 2 --vocab 512 \
  --seed 3 --request-rate 20,40 --num-prompts 120 --max-concurrency 32 --input-len uniform:8-32 \
  --output-len lognormal:16,0.4 --result-file "$work/sim.json" --save-detailed \
  >"$work/sim.log" 2>&1 || fail "simulate: $(tail -3 "$work/sim.log")"
grep '^SIM' "$work/sim.log"
# The workers' step traces against the profile: every kind of step is there, and the "all" line
# counts every traced step.
"$mlaserve" --log-level warn simulate --profile "$work/profile.json" \
  --check-trace "$work/steps0.jsonl" >"$work/check.log" 2>&1 || fail "check-trace: $(cat "$work/check.log")"
cat "$work/check.log"
traced=$(wc -l <"$work/steps0.jsonl")
grep -q "kind=all steps=$traced " "$work/check.log" ||
  fail "check-trace did not count the $traced traced steps"
grep -q "kind=decode " "$work/check.log" || fail "check-trace saw no decode step"
# The same requests all at once, with group 1 drained 2 ms in (its requests migrate with their
# caches) and the coordinator's rebalancing on: every request still completes, and some moved.
"$mlaserve" --log-level warn simulate --profile "$work/profile.json" --groups 2 --vocab 512 \
  --seed 3 --request-rate inf --num-prompts 120 --max-concurrency 32 --input-len uniform:8-32 \
  --output-len lognormal:16,0.4 --drain-group 1@0.002 --rebalance --result-file "$work/drain.json" \
  >"$work/drain.log" 2>&1 || fail "simulate with a drain: $(tail -3 "$work/drain.log")"
grep '^SIM' "$work/drain.log"
grep -q '^SIM .* ok=120 .* migrations=[1-9]' "$work/drain.log" ||
  fail "the drained group's requests did not migrate: $(grep '^SIM' "$work/drain.log")"
"$python" -c "import json,sys; s=json.load(open(sys.argv[1]))['simulation']; \
sys.exit(0 if s['migrations'] > 0 and s['groups'] == 2 and s['steps'] > 0 else 1)" \
  "$work/drain.json" || fail "drain.json's simulation block: $(grep -o '\"simulation.*' "$work/drain.json")"
if "$mlaserve" simulate --profile "$work/profile.json" --drain-group 1at1 >"$work/bad.log" 2>&1 ||
  ! grep -q -- "--drain-group: '1at1' is not GROUP@SECONDS" "$work/bad.log"; then
  fail "a bad --drain-group was not refused by name: $(cat "$work/bad.log")"
fi

# One process as rank 0 of a TP4 group (--emulate), on a checkpoint holding only rank 0's routed
# experts: every step's collectives are counted and priced by the link model, and simulate takes
# the group's size from the profile. One rank alone cannot load that checkpoint.
"$mlaserve" --log-level warn make-tiny --preset v3 --out "$work/rank0of4" --seed 7 \
  --for-emulated-tp 4
if "$mlaserve" generate --model "$work/rank0of4" --prompt-ids 1,2,3 >"$work/bad.log" 2>&1 ||
  ! grep -q "experts.4" "$work/bad.log"; then
  fail "a TP1 load of rank 0's experts did not fail naming the missing expert: $(cat "$work/bad.log")"
fi
OPENBLAS_NUM_THREADS=1 "$mlaserve" --log-level warn profile --model "$work/rank0of4" --prefill 16,64 \
  --batch 1,4 --context 32,64 --repeats 3 --tp 4 --emulate --link-busbw-gbps 100 \
  --link-latency-us 25 --out "$work/emulated.json" >"$work/emulated.log" 2>&1 ||
  fail "emulated profile: $(tail -3 "$work/emulated.log")"
"$python" - "$work/emulated.json" <<'PYEOF2'
import json, sys
p = json.load(open(sys.argv[1]))
assert p["tp"] == 4 and p["emulated"] and p["link"] == {"busbw_gbps": 100.0, "latency_us": 25.0}, p
for s in p["samples"]:
    calls = sum(c["calls"] for c in s["collectives"].values())
    # Every call costs at least the latency, and the step at least its collectives.
    assert calls > 0 and s["collectives_ms"] >= calls * 0.025 - 1e-9, s
    assert s["step_ms"] > s["collectives_ms"], s
    if s["decode_seqs"] > 0:  # a sequence-sharded decode step exchanges partial outputs
        assert "all_to_all" in s["collectives"], s
PYEOF2
"$mlaserve" --log-level warn simulate --profile "$work/emulated.json" --groups 2 --vocab 512 \
  --seed 3 --request-rate 40 --num-prompts 40 --input-len uniform:8-32 --output-len 8 \
  --result-file "$work/emulated_sim.json" >"$work/emulated_sim.log" 2>&1 ||
  fail "simulate on the emulated profile: $(tail -3 "$work/emulated_sim.log")"
"$python" -c "import json,sys; s=json.load(open(sys.argv[1]))['simulation']; \
sys.exit(0 if s['tp'] == 4 else 1)" "$work/emulated_sim.json" ||
  fail "simulate did not take tp 4 from the emulated profile"

echo "== checks"
"$python" - "$work" <<'EOF' || fail "result files"
import json, os, sys
work = sys.argv[1]
keys = ["date", "backend", "model_id", "num_prompts", "request_rate", "burstiness",
        "max_concurrency", "duration", "completed", "total_input_tokens", "total_output_tokens",
        "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
        "max_concurrent_requests"]
for m in ("ttft", "tpot", "itl", "e2el"):
    keys += [f"mean_{m}_ms", f"median_{m}_ms", f"std_{m}_ms", f"p90_{m}_ms", f"p99_{m}_ms"]
def check(name, cond, what):
    print(("ok   " if cond else "FAIL ") + f"{name}: {what}")
    if not cond:
        sys.exit(1)
for name, rate in (("grpc.rate20.json", 20), ("grpc.rate40.json", 40), ("http.json", 40),
                   ("sim.rate20.json", 20), ("sim.rate40.json", 40)):
    r = json.load(open(os.path.join(work, name)))
    missing = [k for k in keys if k not in r]
    check(name, not missing, f"vLLM's keys present (missing: {missing})")
    check(name, r["completed"] == 120 and r["failed"] == 0, f"{r['completed']} completed, {r['failed']} failed")
    check(name, r["total_output_tokens"] == sum(r["output_lens"]),
          f"output tokens {r['total_output_tokens']} = sum of per-request outputs")
    check(name, r["total_input_tokens"] == sum(r["input_lens"]), "input tokens add up")
    starts = sorted(r["start_times"])
    measured = (len(starts) - 1) / (starts[-1] - starts[0])
    check(name, abs(measured - rate) / rate < 0.3, f"mean arrival rate {measured:.1f}/s for {rate}/s")
    check(name, abs(r["output_throughput"] - r["total_output_tokens"] / r["duration"]) < 1e-6,
          "output throughput = tokens / duration")
    check(name, r["p50_ttft_ms"] <= r["p90_ttft_ms"] <= r["p99_ttft_ms"], "percentiles ordered")
    if name.startswith("sim"):
        g = json.load(open(os.path.join(work, name.replace("sim", "grpc"))))
        check(name, r["total_output_tokens"] == g["total_output_tokens"] and
              r["total_input_tokens"] == g["total_input_tokens"], "the same workload as bench's")
    if name.startswith("grpc"):
        check(name, "p99.9_ttft_ms" in r and r.get("good_requests", -1) >= 0 and
              r["request_goodput"] is not None, "extra percentile and goodput reported")
        check(name, sum(r["per_worker"].values()) == 120, f"per-worker share {r['per_worker']}")
p = json.load(open(os.path.join(work, "prefix.json")))
check("prefix.json", p["completed"] == 40 and p["total_input_tokens"] == 40 * (64 + 16),
      f"{p['completed']} requests of 64 + 16 prompt tokens")
t = json.load(open(os.path.join(work, "trace.json")))
check("trace.json", t["completed"] == 30 and t["total_output_tokens"] == sum(4 + i % 5 for i in range(30)),
      f"the trace's 30 requests and their output lengths ({t['total_output_tokens']} tokens)")
check("trace.json", t["duration"] >= 1.4, f"replayed over its 1.45 s ({t['duration']:.2f} s)")
EOF
"$python" "$repo/tests/bench/plot_bench.py" "$work/plots" "$work/grpc.rate20.json" \
  "$work/grpc.rate40.json" || fail "plot_bench.py"
for png in sweep cdf timeline; do
  [ -s "$work/plots/$png.png" ] || fail "no $png.png"
done
echo "PASS"
