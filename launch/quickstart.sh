#!/usr/bin/env bash
# The main job on the CPU with a tiny random model: installs what is missing, builds
# `mlaserve`, writes a random DeepSeek-V3-shaped checkpoint, and generates from it in
# every absorption mode (the outputs agree: the modes are exact rewrites).
#   launch/quickstart.sh            uses ./build and ./.quickstart
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh

BUILD_DIR=${BUILD_DIR:-build}
WORK=${WORK:-.quickstart}
mla_configure_and_build "$BUILD_DIR" "${JOBS:-$(nproc)}" mlaserve
MLASERVE="$BUILD_DIR/launch/mlaserve"

echo "== writing a tiny random DeepSeek-V3-shaped model to $WORK/tiny-v3"
"$MLASERVE" make-tiny --preset v3 --out "$WORK/tiny-v3" --seed 7

for mode in auto naive factored premerged; do
  echo "== generate, absorption $mode: 4 concurrent requests, 32 new tokens each"
  "$MLASERVE" --log-level warn generate --model "$WORK/tiny-v3" --prompt-ids 11,12,13,14,15,16,17,18 \
    --max-tokens 32 --batch 4 --ignore-eos --absorb "$mode"
done
