#!/usr/bin/env bash
# One GPU-host session's checks, from a bundle made here with
#   launch/bundle.sh bundle build/tests/mla_gpu_tests build/launch/mlaserve
# and the repository copied beside it (the device tool runs this from the repo root):
#   tests/gpu/device_run.sh TAG [GTEST_FILTER]
# 1. writes the real-MLA-dimension golden model (tests/data/v3_mla) with transformers if the
#    tree lacks it (torch + transformers on the GPU host), and copies it to $OUT;
# 2. runs the gpu-labelled tests (gtest XML and log under $OUT);
# 3. prints a pass/fail table last.
set -uo pipefail
tag=${1:-gpu}
filter=${2:-*}
out=${OUT:-/tmp/mla_out}
mkdir -p "$out"
source bundle/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ ! -f tests/data/v3_mla/golden.json ]; then
  echo "== writing tests/data/v3_mla with transformers"
  PYTHONUNBUFFERED=1 python3 tests/parity/make_golden.py --out /tmp/golden --only v3_mla \
    >"$out/make_golden.log" 2>&1 || { tail -30 "$out/make_golden.log"; exit 1; }
  grep SUMMARY "$out/make_golden.log"
  mkdir -p tests/data/v3_mla "$out/v3_mla"
  cp /tmp/golden/v3_mla/* tests/data/v3_mla/
  cp /tmp/golden/v3_mla/* "$out/v3_mla/"
fi

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
