#!/usr/bin/env bash
# Serving under load, on loopback: a coordinator and 2 TP2 worker groups of the tiny V3 model
# (4 MPI ranks on this host), measured with `mlaserve bench`:
#   (a) routing overhead: latency of 1-token requests, one at a time, through the coordinator
#       minus directly to one worker (p50 and p99);
#   (b) streamed tokens/s the coordinator sustains at concurrency 64;
#   (c) 1,000 concurrent streams: errors (must be 0), the coordinator's peak RSS and threads,
#       and the workers' RSS.
# Prints a Markdown table with the exact commands (docs/BENCHMARKS.md). Exits non-zero when
# a bench run fails.
#   tests/bench/serving_load.sh [BUILD_DIR]     env: PORT (coordinator, default 57100),
#                                               MODEL (default tests/data/v3)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
mlaserve="$build/launch/mlaserve"
port=${PORT:-57100}
worker_port_base=$((port + 10))
model=${MODEL:-tests/data/v3}
coordinator_address="127.0.0.1:$port"
worker_address="127.0.0.1:$worker_port_base"  # group 0
vocab=256  # tests/data/v3
# 1,000 requests of 32 + 16 tokens need 3 pages of 16 tokens each: 1,500 pages per group
# if all ran at once (each group runs 64 at a time and queues the rest).
worker_flags=(--model "$model" --tp 2 --block-size 16 --num-pages 2048)

work=$(mktemp -d)
coordinator="" workers="" sampler=""
stop() {
  for pid in $sampler $workers $coordinator; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $sampler $workers $coordinator; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap stop EXIT

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OPENBLAS_NUM_THREADS=1 OMPI_MCA_mpi_yield_when_idle=1

control_address="127.0.0.1:$((port + 1))"
export MLASERVE_CONTROL_SECRET=${MLASERVE_CONTROL_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
coordinator_cmd=("$mlaserve" --log-level warn coordinator --address "$coordinator_address"
  --control-address "$control_address")
workers_cmd=(mpirun -np 4 --oversubscribe --bind-to none "$mlaserve" --log-level warn worker
  "${worker_flags[@]}" --coordinator "$control_address" --port-base "$worker_port_base")
"${coordinator_cmd[@]}" >"$work/coordinator.log" 2>&1 &
coordinator=$!
"${workers_cmd[@]}" >"$work/workers.log" 2>&1 &
workers=$!

# Both groups registered (bounded: 60 polls of 1 s).
ready=0
for _ in $(seq 60); do
  if "$mlaserve" --log-level error client --address "$coordinator_address" --wait-ready 1 \
    --status 2>/dev/null | grep -q '^workers: 2 (2 alive)'; then
    ready=1
    break
  fi
  sleep 1
done
if [ "$ready" != 1 ]; then
  echo "cluster not ready after 60 s" >&2
  tail -n 20 "$work/coordinator.log" "$work/workers.log" >&2
  exit 1
fi

# The worker ranks: the mpirun job's descendants (not mpirun itself) running `mlaserve worker`.
worker_pids() {
  local pids="" next=$workers pid
  for _ in 1 2 3; do
    next=$(for pid in $next; do cat /proc/"$pid"/task/*/children 2>/dev/null || true; done)
    pids="$pids $next"
  done
  for pid in $(echo "$pids" | tr ' ' '\n' | sort -un); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q ' worker ' && echo "$pid"
  done
  return 0
}
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
# CPU seconds (user + system) a process has used so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
# CPU seconds of the coordinator and of all worker ranks together: "COORD WORKERS".
cpu_now() {
  local w=0 pid
  for pid in $(worker_pids); do w=$(awk -v a="$w" -v b="$(cpu_s "$pid")" 'BEGIN { print a + b }'); done
  echo "$(cpu_s "$coordinator") $w"
}
# CPU seconds used since a cpu_now reading: "coordinator C s, workers W s".
cpu_since() {
  read -r c0 w0 <<<"$1"
  read -r c1 w1 <<<"$(cpu_now)"
  awk -v c0="$c0" -v c1="$c1" -v w0="$w0" -v w1="$w1" \
    'BEGIN { printf "coordinator %.1f s, workers %.1f s", c1 - c0, w1 - w0 }'
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# Runs `mlaserve bench ARGS...` and leaves its summary line in $result; a failed run (errors,
# timeouts) is recorded in $failed and the script goes on to report it.
bench_cmds=() result="" failed=0
bench() {
  bench_cmds+=("$mlaserve --log-level warn bench $*")
  "$mlaserve" --log-level warn bench "$@" >"$work/last.log" 2>&1 || {
    failed=1
    echo "bench failed: $mlaserve bench $*" >&2
    cat "$work/last.log" >&2
  }
  result=$(grep '^BENCH ' "$work/last.log" || echo "BENCH (no summary)")
}
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

# (a) Rounds alternate direct and via the coordinator, so that load from elsewhere on the host
# hits both alike; each figure is the median over the rounds.
small=(--requests 300 --warmup 20 --concurrency 1 --prompt-len 8 --max-tokens 1 --vocab "$vocab"
  --timeout 60)
rounds=3
via_p50=() via_p99=() direct_p50=() direct_p99=()
for _ in $(seq $rounds); do
  bench --address "$worker_address" --worker "${small[@]}"
  direct_p50+=("$(field latency_p50_ms "$result")") direct_p99+=("$(field latency_p99_ms "$result")")
  bench --address "$coordinator_address" "${small[@]}"
  via_p50+=("$(field latency_p50_ms "$result")") via_p99+=("$(field latency_p99_ms "$result")")
done
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
p50_via=$(median "${via_p50[@]}") p99_via=$(median "${via_p99[@]}")
p50_direct=$(median "${direct_p50[@]}") p99_direct=$(median "${direct_p99[@]}")

# (b) Streamed tokens/s through the coordinator, and the CPU it and the workers spent on it.
cpu0=$(cpu_now)
bench --address "$coordinator_address" --requests 256 --warmup 16 --concurrency 64 \
  --prompt-len 32 --max-tokens 64 --timeout 180
stream=$result
stream_cpu=$(cpu_since "$cpu0")

# (c) 1,000 streams open at once. The coordinator's peak thread count is sampled every 0.2 s
# (bounded: 300 s at most).
(
  peak=0
  for _ in $(seq 1500); do
    n=$(status_kib "$coordinator" Threads 2>/dev/null || echo 0)
    [ "${n:-0}" -gt "$peak" ] && peak=$n && echo "$peak" >"$work/threads"
    sleep 0.2
  done
) &
sampler=$!
cpu0=$(cpu_now)
bench --address "$coordinator_address" --requests 1000 --concurrency 1000 --prompt-len 32 \
  --max-tokens 16 --timeout 240
wide=$result
wide_cpu=$(cpu_since "$cpu0")
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
sampler=""

coordinator_hwm=$(status_kib "$coordinator" VmHWM)
coordinator_rss=$(status_kib "$coordinator" VmRSS)
worker_rss=""
for pid in $(worker_pids); do
  worker_rss="$worker_rss $(mib "$(status_kib "$pid" VmHWM)")"
done

minus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }

echo
echo "Cluster: \`${coordinator_cmd[*]}\` and \`${workers_cmd[*]}\` ($(nproc) cores)."
echo
echo "| measurement | result | command |"
echo "|---|---|---|"
echo "| latency via coordinator, 1 token, concurrency 1 (median of $rounds rounds) | p50 $p50_via ms, p99 $p99_via ms (rounds: p50 ${via_p50[*]}; p99 ${via_p99[*]}) | \`${bench_cmds[1]}\` |"
echo "| latency direct to worker group 0 (median of $rounds rounds) | p50 $p50_direct ms, p99 $p99_direct ms (rounds: p50 ${direct_p50[*]}; p99 ${direct_p99[*]}) | \`${bench_cmds[0]}\` |"
echo "| routing overhead (via - direct) | p50 $(minus "$p50_via" "$p50_direct") ms, p99 $(minus "$p99_via" "$p99_direct") ms | (the two rows above) |"
echo "| streamed tokens/s via coordinator, concurrency 64, 64 tokens | $(field tokens_per_s "$stream") tokens/s, ttft p50 $(field ttft_p50_ms "$stream") ms, p99 $(field ttft_p99_ms "$stream") ms, errors $(field errors "$stream"); CPU $stream_cpu | \`${bench_cmds[2 * rounds]}\` |"
echo "| 1,000 concurrent streams, 16 tokens | ok $(field ok "$wide"), errors $(field errors "$wide") ($(field error_codes "$wide")), wall $(field wall_s "$wide") s, $(field tokens_per_s "$wide") tokens/s, ttft p50 $(field ttft_p50_ms "$wide") ms, p99 $(field ttft_p99_ms "$wide") ms; per worker $(field per_worker "$wide"); CPU $wide_cpu | \`${bench_cmds[2 * rounds + 1]}\` |"
echo "| coordinator memory | peak RSS (VmHWM) $(mib "$coordinator_hwm") MiB, RSS after $(mib "$coordinator_rss") MiB, peak threads $(cat "$work/threads" 2>/dev/null || echo '?') | /proc/<coordinator>/status |"
echo "| worker ranks' peak RSS (VmHWM), in pid order (rank 0 to 3; ranks 0 and 2 lead and serve gRPC) | ${worker_rss# } MiB | /proc/<rank>/status |"
exit "$failed"
