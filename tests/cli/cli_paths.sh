#!/usr/bin/env bash
# A flag or config field naming a path that does not exist, or a directory where a file is
# expected (or the reverse), fails with one line naming the path and where it came from.
#   cli_paths.sh MLASERVE
mlaserve=$1
source "$(dirname "$0")/cli_test_lib.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run make-tiny --preset v3 --out "$tmp/v3"
expect_ok "make-tiny"
ids=(--prompt-ids 1 --max-tokens 1)

run generate --config "$tmp/none.yaml" "${ids[@]}"
expect_error "missing --config"
expect_output "config file $tmp/none.yaml does not exist" "missing --config"

run generate --config "$tmp" "${ids[@]}"
expect_error "--config a directory"
expect_output "config file $tmp is a directory" "--config a directory"

run generate --model "$tmp/none" "${ids[@]}"
expect_error "missing --model"
expect_output "--model $tmp/none: model directory $tmp/none does not exist" "missing --model"

run generate --model "$tmp/v3/config.json" "${ids[@]}"
expect_error "--model a file"
expect_output "model directory $tmp/v3/config.json is not a directory" "--model a file"

echo "model: $tmp/gone" >"$tmp/deploy.yaml"
run generate --config "$tmp/deploy.yaml" "${ids[@]}"
expect_error "config naming a missing model"
expect_output "\`model\` in $tmp/deploy.yaml: model directory $tmp/gone does not exist" \
  "config naming a missing model"

run make-tiny --preset v3 --out "$tmp/v3/config.json"
expect_error "make-tiny --out a file"
expect_output "output directory $tmp/v3/config.json exists and is not a directory" \
  "make-tiny --out a file"
finish
