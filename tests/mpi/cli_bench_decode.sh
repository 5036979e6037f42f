#!/usr/bin/env bash
# `mpirun -np 2 mlaserve bench-decode --tp 2` on the tiny v3 model: each kv_shard mode reports
# how much context the group holds (sequence-sharded: twice the replicated cache), times the
# points that fit, says which do not, and refuses bad input with a clear message.
#   cli_bench_decode.sh MLASERVE MPIEXEC DATA_DIR
set -euo pipefail
mlaserve=$1 mpiexec=$2 data=$3
run() {
  "$mpiexec" -np 2 --oversubscribe --bind-to none "$mlaserve" --log-level warn bench-decode \
    --model "$data/v3" --tp 2 --block-size 4 --num-pages 16 --context 8,40 --batch 1,8 \
    --steps 5 --warmup 3 "$@" 2>&1
}
fail() { echo "FAIL: $*"; exit 1; }
# Each sequence reaches context + 8 tokens: 16 tokens (4 pages) or 48 (12 pages).
out=$(run --kv-shard sequence)
echo "$out"
grep -q "^tp 2 sequence-sharded: 16 pages of 4 tokens per rank; the group holds 128 tokens" <<<"$out" ||
  fail "sharded capacity line"
for point in "8 1" "8 8" "40 1"; do
  set -- $point
  grep -Eq "^ +$1 +$2 +[0-9.]+ +[0-9.]+" <<<"$out" || fail "sharded: no timing for context $1 batch $2"
done
grep -Eq "^ +40 +8  does not fit: 8 sequences of 12 pages \(384 tokens\) > 128 held" <<<"$out" ||
  fail "sharded: context 40 batch 8 should not fit"

out=$(run --kv-shard replicate)
echo "$out"
grep -q "^tp 2 replicated: 16 pages of 4 tokens per rank; the group holds 64 tokens" <<<"$out" ||
  fail "replicated capacity line"
grep -Eq "^ +8 +8  does not fit" <<<"$out" || fail "replicated: context 8 batch 8 should not fit"
grep -Eq "^ +40 +1 +[0-9.]+ +[0-9.]+" <<<"$out" || fail "replicated: no timing for context 40 batch 1"

if out=$("$mlaserve" bench-decode --model "$data/v3" --num-pages 16 --context 0 2>&1); then
  fail "--context 0 accepted"
fi
grep -q "\-\-context values must be >= 1, got 0" <<<"$out" || fail "no clear error for --context 0"
if out=$("$mlaserve" bench-decode --model "$data/v3" --num-pages 16 --context 300 --batch 1 2>&1); then
  fail "a context past the model's positions accepted"
fi
grep -q "exceeds the model's 256 positions" <<<"$out" || fail "no clear error for --context 300"
echo "cli_bench_decode: 1 passed, 0 failed"
