# Helpers for the CLI tests: run the built `mlaserve` and check its exit code and output.
# Source it after setting `mlaserve`; each test script ends with `finish`.
set -uo pipefail
failures=0
checks=0

# run ARGS...: runs mlaserve, leaving its exit code in $rc and stdout + stderr in $out.
run() {
  out=$("$mlaserve" "$@" 2>&1)
  rc=$?
}

# fail MESSAGE: records a failure and shows the last command's output.
fail() {
  echo "FAIL: $1"
  echo "--- output (exit $rc):"
  echo "$out"
  echo "---"
  failures=$((failures + 1))
}

expect_ok() {
  checks=$((checks + 1))
  [ "$rc" -eq 0 ] || fail "$1: exited $rc"
}
expect_error() {
  checks=$((checks + 1))
  [ "$rc" -ne 0 ] || fail "$1: exited 0"
}
# expect_output TEXT CONTEXT: the output holds TEXT (a fixed string).
expect_output() {
  checks=$((checks + 1))
  grep -qF -- "$1" <<<"$out" || fail "$2: no \`$1\` in the output"
}
expect_no_output() {
  checks=$((checks + 1))
  ! grep -qF -- "$1" <<<"$out" || fail "$2: \`$1\` in the output"
}

finish() {
  echo "$(basename "$0"): $checks checks, $failures failed"
  [ "$failures" -eq 0 ]
}
