#!/usr/bin/env bash
# One GPU-host session's checks, from a bundle made here with
#   launch/bundle.sh bundle build/tests/mla_gpu_tests build/launch/mlaserve
# and the repository copied beside it (the device tool runs this from the repo root):
#   tests/gpu/device_run.sh TAG [GTEST_FILTER]
# 1. writes the real-MLA-dimension golden models (tests/data/v3_mla, v3_mla_h8) with
#    transformers where the tree lacks them (torch + transformers on the GPU host), and packs
#    each into $OUT/NAME.tar.gz;
# 2. runs the gpu-labelled tests (gtest XML and log under $OUT);
# 3. prints a pass/fail table last.
set -uo pipefail
tag=${1:-gpu}
filter=${2:-*}
out=${OUT:-/tmp/mla_out}
mkdir -p "$out"
source bundle/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

for name in v3_mla v3_mla_h8; do
  [ -f tests/data/$name/golden.json ] && continue
  echo "== writing tests/data/$name with transformers"
  PYTHONUNBUFFERED=1 python3 tests/parity/make_golden.py --out /tmp/golden --only $name \
    >"$out/make_golden_$name.log" 2>&1 || { tail -30 "$out/make_golden_$name.log"; exit 1; }
  grep SUMMARY "$out/make_golden_$name.log"
  mkdir -p tests/data/$name
  cp /tmp/golden/$name/* tests/data/$name/
  tar czf "$out/$name.tar.gz" -C /tmp/golden $name
done

export MLA_TEST_DATA=$PWD/tests/data
log="$out/$tag.log"
mla_gpu_tests --gtest_filter="$filter" >"$log" 2>&1
rc=$?
grep -E "near-tie|worst logits" "$log" | head -60
grep -E "Failure|error|Expected|Which is|rel err|^\[  FAILED" "$log" | head -60
echo
echo "| $tag | passed | failed | skipped |"
echo "|---|---|---|---|"
echo "| $filter | $(grep -c '^\[       OK \]' "$log") | $(grep -c '^\[  FAILED  \] .*(' "$log") | $(grep -c '^\[  SKIPPED \]' "$log") |"
tail -3 "$log"
exit $rc
