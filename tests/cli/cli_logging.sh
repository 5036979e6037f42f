#!/usr/bin/env bash
# --version, --log-level (checked against its values, accepted after the subcommand too) and
# the role tag on every log line.
#   cli_logging.sh MLASERVE
mlaserve=$1
source "$(dirname "$0")/cli_test_lib.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

run --version
expect_ok "--version"
checks=$((checks + 1))
grep -qE '^mlaserve [0-9]+\.[0-9]+\.[0-9]+' <<<"$out" || fail "--version: not 'mlaserve X.Y.Z'"

run make-tiny --preset v3 --out "$tmp/v3"
expect_ok "make-tiny"
generate=(generate --model "$tmp/v3" --prompt-ids 1,2,3 --max-tokens 2)

run --log-level bogus "${generate[@]}"
expect_error "--log-level bogus"
expect_output "bogus" "--log-level bogus"
for level in trace debug info warn error off; do expect_output "$level" "--log-level bogus"; done

# Every log line carries the role; a single process has no group or rank to add.
run "${generate[@]}"
expect_ok "generate"
expect_output "] [generate] [info] loaded deepseek_v3" "generate"

# After the subcommand as before it; warn hides the info lines.
for where in before after; do
  if [ $where = before ]; then run --log-level warn "${generate[@]}"; else run "${generate[@]}" --log-level warn; fi
  expect_ok "--log-level warn $where the subcommand"
  expect_output "request 1 (length)" "--log-level warn $where the subcommand"
  expect_no_output "[info]" "--log-level warn $where the subcommand"
done
run "${generate[@]}" --log-level bogus
expect_error "--log-level bogus after the subcommand"

# Not a terminal: no colour codes.
run "${generate[@]}"
checks=$((checks + 1))
! grep -q $'\x1b\[' <<<"$out" || fail "colour codes in output that is not a terminal"
finish
