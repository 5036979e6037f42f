#!/usr/bin/env bash
# Under mpirun: every log line names the rank (`[generate g0 r1]`), no colour codes reach a
# file (a rank's stdout is a pseudo-terminal even when mpirun's is not), and an error that
# every rank hits is reported once, by world rank 0 before the ranks form groups and by each
# failing group's rank 0 after, as whole lines.
#   cli_logging.sh MLASERVE MPIEXEC
mlaserve=$1 mpiexec=$2
source "$(dirname "$0")/../cli/cli_test_lib.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# mpirun_run NP ARGS...: like run, under mpirun with NP ranks; stdout goes through a file.
mpirun_run() {
  local np=$1
  shift
  "$mpiexec" -np "$np" --oversubscribe --bind-to none "$mlaserve" "$@" >"$tmp/out" 2>&1
  rc=$?
  out=$(cat "$tmp/out")
}
# expect_lines COUNT PATTERN CONTEXT: COUNT output lines match the extended regex PATTERN.
expect_lines() {
  checks=$((checks + 1))
  local n
  n=$(grep -cE -- "$2" <<<"$out")
  [ "$n" -eq "$1" ] || fail "$3: $n lines match \`$2\`, not $1"
}

run make-tiny --preset v3 --out "$tmp/v3"
expect_ok "make-tiny"

mpirun_run 2 generate --model "$tmp/v3" --prompt-ids 1,2,3 --max-tokens 2 --tp 2
expect_ok "generate --tp 2"
expect_output "] [generate g0 r0] [info] world 2 = 1 group x tp 2" "generate --tp 2"
expect_output "] [generate g0 r1] [info] world 2 = 1 group x tp 2" "generate --tp 2"
checks=$((checks + 1))
! grep -q $'\x1b\[' <<<"$out" || fail "colour codes in a file under mpirun"

# Before the split (a flag names a missing directory): world rank 0 alone.
mpirun_run 2 generate --model "$tmp/none" --prompt-ids 1 --tp 1
expect_error "missing model under mpirun"
expect_lines 1 "error:" "missing model under mpirun"
expect_lines 1 "^mlaserve \[generate rank 0\]: error: --model $tmp/none: model directory $tmp/none does not exist \[NOT_FOUND\]$" \
  "missing model under mpirun"

# After the split (config.json loads on every rank): each group's rank 0.
sed -i 's/"rope_theta": [0-9.]*/"rope_theta": 0.0/' "$tmp/v3/config.json"
mpirun_run 2 generate --model "$tmp/v3" --prompt-ids 1 --tp 2
expect_error "bad config, one group"
expect_lines 1 "error:" "bad config, one group"
expect_lines 1 "^mlaserve \[generate g0 r0\]: error: .*config.json: config field \`rope_parameters.rope_theta\` must be positive, got 0 \[INVALID_ARGUMENT\]$" \
  "bad config, one group"
mpirun_run 2 generate --model "$tmp/v3" --prompt-ids 1 --tp 1
expect_error "bad config, two groups"
expect_lines 2 "error:" "bad config, two groups"
expect_lines 1 "^mlaserve \[generate g1 r0\]: error: .*rope_theta\` must be positive, got 0 \[INVALID_ARGUMENT\]$" \
  "bad config, two groups"
finish
