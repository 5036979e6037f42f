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

# Text in, text out: make-tiny writes a byte-level tokenizer beside the model; --prompt goes
# through it and the generated text is printed (as JSON); --stop ends a request before the
# first occurrence of its text, which is not printed.
run generate --model "$tmp/v3" --prompt "Hello, 世界" --max-tokens 24 --ignore-eos
expect_ok "generate --prompt"
expect_output 'request 1 text: "' "generate --prompt"
text_of() { sed -n 's/^request 1 text: //p' <<<"$out" | python3 -c 'import json,sys; print(json.dumps(json.loads(sys.stdin.read())))'; }
full=$(text_of)
stop=$(python3 -c 'import json,sys; t=json.loads(sys.argv[1]); print(t[3:5])' "$full")
want=$(python3 -c 'import json,sys; t=json.loads(sys.argv[1]); print(json.dumps(t[:t.find(sys.argv[2])]))' "$full" "$stop")
run generate --model "$tmp/v3" --prompt "Hello, 世界" --max-tokens 24 --ignore-eos --stop "$stop"
expect_ok "generate --prompt --stop"
expect_output "(stop string)" "generate --prompt --stop"
[ "$(text_of)" = "$want" ] || fail "generate --stop '$stop': text $(text_of), want $want (full $full)"
run generate --model "$tmp/v3" --prompt-ids 1,2 --stop x
expect_error "generate --stop without --prompt"
expect_output "--stop needs a text --prompt" "generate --stop without --prompt"

# --dump-tensors: the prompt's named intermediates, one .npy per tensor, logits of every row;
# it refuses what it cannot dump and a directory that already holds a dump.
run generate --model "$tmp/v3" --prompt-ids 5,6,7,8,9,10,11 --max-tokens 2 --absorb factored \
  --dump-tensors "$tmp/dump"
expect_ok "generate --dump-tensors"
expect_output "dumped 32 tensors to $tmp/dump" "generate --dump-tensors"
for f in L00.attn_norm L00.q_absorbed L02.layer_out final_norm logits; do
  [ -s "$tmp/dump/$f.npy" ] || fail "generate --dump-tensors: no $f.npy"
done
grep -q "'shape': (7, 512)" "$tmp/dump/logits.npy" || fail "generate --dump-tensors: logits not [7, 512]"
run generate --model "$tmp/v3" --prompt-ids 5,6,7 --dump-tensors "$tmp/dump"
expect_error "generate --dump-tensors into an old dump"
expect_output ".npy" "generate --dump-tensors into an old dump"
run generate --model "$tmp/v3" --prompt-len 8 --dump-tensors "$tmp/dump2"
expect_error "generate --dump-tensors --prompt-len"
expect_output "--prompt-ids" "generate --dump-tensors --prompt-len"

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
