#!/usr/bin/env bash
# Decode-step timing of two mlaserve builds on the same GPU, interleaved A B A B ... so that
# clock and thermal drift fall on both alike (a before/after check of a change that must not
# cost speed):
#   tests/bench/decode_ab.sh MODEL_DIR A_BIN B_BIN ROUNDS [bench-decode flags...]
# e.g. tests/bench/decode_ab.sh /tmp/v2l before/mlaserve bundle/bin/mlaserve 3 \
#        --device cuda --num-pages 2000 --context 512 --batch 1,64 --steps 50 --warmup 5
# Logs every run under $OUT (default /tmp/mla_out); prints, per (context, batch), the median
# over rounds of each build's median step time and B / A last.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 MODEL_DIR A_BIN B_BIN ROUNDS [bench-decode flags...]" >&2; exit 2; }
model=$1 a=$2 b=$3 rounds=$4
shift 4
out=${OUT:-/tmp/mla_out}
mkdir -p "$out"
for r in $(seq "$rounds"); do
  for side in a b; do
    bin=$a
    [ "$side" = b ] && bin=$b
    "$bin" bench-decode --model "$model" "$@" >"$out/decode_${side}_$r.log" 2>&1 ||
      { tail -20 "$out/decode_${side}_$r.log"; exit 1; }
  done
done
# Rows of bench-decode's table: context, batch, step ms, tokens/s, ...
python3 - "$out" "$rounds" <<'PY'
import statistics, sys, glob, re
out, rounds = sys.argv[1], int(sys.argv[2])
def rows(path):
    got = {}
    for line in open(path):
        f = line.split()
        if len(f) >= 4 and f[0].isdigit() and f[1].isdigit():
            got[(int(f[0]), int(f[1]))] = float(f[2])
    return got
runs = {s: [rows(f"{out}/decode_{s}_{r}.log") for r in range(1, rounds + 1)] for s in "ab"}
print(f"| context | batch | A step ms (median of {rounds}) | B step ms | B / A |")
print("|---:|---:|---:|---:|---:|")
for key in sorted(runs["a"][0]):
    a = statistics.median(r[key] for r in runs["a"])
    b = statistics.median(r[key] for r in runs["b"])
    print(f"| {key[0]} | {key[1]} | {a:.3f} | {b:.3f} | {b / a:.3f} |")
PY
