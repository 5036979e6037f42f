#!/usr/bin/env bash
# generate --prompt-len draws ids within the model's vocabulary; the README's
# `generate --config configs/tiny-cpu.yaml` (tp 2) says how to run it without mpirun, and runs
# with --tp 1.
#   cli_generate.sh MLASERVE SOURCE_DIR
mlaserve=$1 src=$2
source "$(dirname "$0")/cli_test_lib.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for preset in v3 v2-lite; do
  run make-tiny --preset "$preset" --out "$tmp/$preset"
  expect_ok "make-tiny $preset"
  run generate --model "$tmp/$preset" --prompt-len 64 --max-tokens 2 --batch 1,3
  expect_ok "generate --prompt-len on $preset"
  expect_output "batch 3: 6 tokens generated" "generate --prompt-len on $preset"
done

# The README's example, run from a directory holding the model the config names.
cd "$tmp"
run make-tiny --preset v3 --out .quickstart/tiny-v3
expect_ok "make-tiny for configs/tiny-cpu.yaml"
run generate --config "$src/configs/tiny-cpu.yaml" --prompt-ids 1,2,3 --max-tokens 4
expect_error "tp 2 without mpirun"
expect_output "mpirun -np 2" "tp 2 without mpirun"
expect_output "--tp 1" "tp 2 without mpirun"
run generate --config "$src/configs/tiny-cpu.yaml" --tp 1 --prompt-ids 1,2,3 --max-tokens 4
expect_ok "generate --config configs/tiny-cpu.yaml --tp 1"
expect_output "request 1 (length): " "generate --config configs/tiny-cpu.yaml --tp 1"
finish
