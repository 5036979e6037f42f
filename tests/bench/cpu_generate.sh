#!/usr/bin/env bash
# CPU tokens/s of the tiny random models through `mlaserve generate`, per absorption mode
# and batch size: median of 3 runs, printed as a Markdown table (docs/BENCHMARKS.md).
#   tests/bench/cpu_generate.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
mlaserve="$build/launch/mlaserve"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prompt=$(seq -s, 10 41)  # 32 prompt tokens
new_tokens=64

echo "| model | absorb | batch | prompt | new tokens | tokens/s (median of 3) |"
echo "|---|---|---|---|---|---|"
for preset in v3 v2-lite; do
  "$mlaserve" --log-level warn make-tiny --preset "$preset" --out "$work/$preset" --seed 1
  for absorb in auto naive factored premerged; do
    for batch in 1 16 64; do
      rates=()
      for _ in 1 2 3; do
        rates+=("$("$mlaserve" --log-level warn generate --model "$work/$preset" --prompt-ids "$prompt" \
          --max-tokens $new_tokens --batch $batch --ignore-eos --absorb $absorb |
          sed -n 's/.* s: \([0-9.]*\) tokens\/s.*/\1/p')")
      done
      median=$(printf '%s\n' "${rates[@]}" | sort -g | sed -n 2p)
      echo "| $preset | $absorb | $batch | 32 | $new_tokens | $median |"
    done
  done
done
