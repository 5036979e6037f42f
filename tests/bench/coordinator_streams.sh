#!/usr/bin/env bash
# The coordinator's threads and memory with many streams open at once: a coordinator and two
# TP2 groups of the tiny V3 model on loopback; for each N, `mlaserve bench` opens N streams at
# once (16 tokens each; most wait in the workers' queues, so all N are open at the
# coordinator together) while the coordinator's thread count, RSS and requests in flight are
# sampled every 0.1 s. Prints a Markdown table.
#   tests/bench/coordinator_streams.sh [BUILD_DIR] [N...]     (default N: 1000 5000)
# env: PORT (default 57300).
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
shift || true
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(1000 5000)
mlaserve=$build/launch/mlaserve
port=${PORT:-57300}
address=127.0.0.1:$port control=127.0.0.1:$((port + 1))
work=$(mktemp -d)
coordinator="" workers=()
cleanup() {
  for pid in "${workers[@]}" $coordinator; do pkill -TERM -P "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${workers[@]}" $coordinator; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_mpi_yield_when_idle=1
export MLASERVE_CONTROL_SECRET=${MLASERVE_CONTROL_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
# Many streams, each a few file descriptors.
ulimit -n 65536 2>/dev/null || true

"$mlaserve" --log-level warn coordinator --address "$address" --control-address "$control" \
  --max-in-flight 10000 >"$work/coordinator.log" 2>&1 &
coordinator=$!
for g in 0 1; do
  mpirun -np 2 --oversubscribe --bind-to none "$mlaserve" --log-level warn worker \
    --model tests/data/v3 --tp 2 --coordinator "$control" --port-base $((port + 10)) --group $g \
    >"$work/workers-$g.log" 2>&1 &
  workers+=($!)
done
for _ in $(seq 60); do
  "$mlaserve" --log-level error client --address "$address" --wait-ready 1 --status 2>/dev/null |
    grep -q '^workers: 2 (2 alive)' && break
  sleep 1
done

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }
status() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
rows=()
for n in "${counts[@]}"; do
  threads_before=$(status "$coordinator" Threads)
  (
    peak_threads=0 peak_rss=0 peak_in_flight=0
    while true; do
      t=$(status "$coordinator" Threads) r=$(status "$coordinator" VmRSS)
      f=$("$mlaserve" --log-level error client --address "$address" --status 2>/dev/null |
        sed -n 's/.*requests in flight: \([0-9]*\).*/\1/p')
      [ "$t" -gt "$peak_threads" ] && peak_threads=$t
      [ "$r" -gt "$peak_rss" ] && peak_rss=$r
      [ "${f:-0}" -gt "$peak_in_flight" ] && peak_in_flight=$f
      echo "$peak_threads $peak_rss $peak_in_flight" >"$work/peaks"
      sleep 0.1
    done
  ) &
  sampler=$!
  cmd=("$mlaserve" --log-level warn bench --address "$address" --requests "$n" --concurrency "$n"
    --prompt-len 8 --max-tokens 16 --timeout 600)
  "${cmd[@]}" >"$work/bench.log" 2>&1 || true
  kill "$sampler"
  wait "$sampler" 2>/dev/null || true
  read -r peak_threads peak_rss peak_in_flight <"$work/peaks"
  result=$(grep '^BENCH ' "$work/bench.log" || echo "BENCH (no summary)")
  rows+=("| $n | $(field ok "$result") ok, $(field errors "$result") errors ($(field error_codes "$result")) | $peak_in_flight | $threads_before -> $peak_threads | $(awk -v k="$peak_rss" 'BEGIN { printf "%.1f", k / 1024 }') MiB | $(field wall_s "$result") s | \`${cmd[*]}\` |")
done
echo
echo "| streams opened at once | result | peak in flight at the coordinator | coordinator threads (idle -> peak) | coordinator peak RSS | wall | command |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
