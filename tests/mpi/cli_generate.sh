#!/usr/bin/env bash
# `mpirun -np 4 mlaserve generate --tp 2` forms two groups of two ranks; each group's
# leader prints the transformers greedy tokens of tests/data/v3 prompt 0, in both kv_shard
# modes, and every rank logs the layout.
#   cli_generate.sh MLASERVE MPIEXEC DATA_DIR
set -euo pipefail
mlaserve=$1 mpiexec=$2 data=$3
want="1,118,182,201,135,5,126,142"  # golden.json: greedy[0]
for kv in sequence replicate; do
  out=$("$mpiexec" -np 4 --oversubscribe --bind-to none "$mlaserve" generate --model "$data/v3" \
    --prompt-ids 185,17,139,162,42 --max-tokens 8 --ignore-eos --tp 2 --kv-shard $kv \
    --block-size 4 2>&1)
  echo "$out"
  for g in 0 1; do
    grep -q "^group $g request 1 (length): $want\$" <<<"$out" ||
      { echo "FAIL: group $g did not print $want (kv-shard $kv)"; exit 1; }
  done
  [ "$(grep -c "world 4 = 2 groups x tp 2" <<<"$out")" -eq 4 ] ||
    { echo "FAIL: not every rank logged the layout"; exit 1; }
done
# A group size that does not divide the world is refused with a message saying so.
if out=$("$mpiexec" -np 2 --oversubscribe "$mlaserve" generate --model "$data/v3" --prompt-ids 1 --tp 3 2>&1); then
  echo "FAIL: --tp 3 on 2 ranks succeeded"; exit 1
fi
grep -q "world size 2 is not a multiple of --tp 3" <<<"$out" || { echo "FAIL: no clear error"; exit 1; }
echo "cli_generate: 1 passed, 0 failed"
