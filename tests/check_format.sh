#!/usr/bin/env bash
# Fails (exit 1) when any C++ source (*.cpp *.h *.cu *.cuh) differs from clang-format's output
# under the root .clang-format, and names each such file. tests/run.sh runs it before building.
# Sources are the tracked files of a git checkout; elsewhere (an unpacked tarball, or a clone
# git refuses to read as another user) the source folders are searched instead.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v clang-format >/dev/null || { echo "clang-format not found (apt-get install clang-format)" >&2; exit 1; }

if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -d '' sources < <(git ls-files -z -- '*.cpp' '*.h' '*.cu' '*.cuh')
else
  mapfile -d '' sources < <(find kernels parallel runtime rpc launch tests -type f \
    \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print0 | sort -z)
fi
[ ${#sources[@]} -gt 0 ] || { echo "check_format: no C++ sources found" >&2; exit 1; }

# One file at a time so the report is a list of files, not clang-format's every changed line.
unformatted=()
for f in "${sources[@]}"; do
  clang-format --dry-run --Werror "$f" >/dev/null 2>&1 || unformatted+=("$f")
done

if [ ${#unformatted[@]} -gt 0 ]; then
  echo "== clang-format: ${#unformatted[@]} of ${#sources[@]} files differ from .clang-format:" >&2
  printf '  %s\n' "${unformatted[@]}" >&2
  echo "Fix with (clang-format $(clang-format --version | grep -oE '[0-9]+\.[0-9.]+' | head -1)," \
    "as Debian 12 ships; see a diff with: clang-format FILE | diff FILE -):" >&2
  echo "  clang-format -i ${unformatted[*]}" >&2
  exit 1
fi
echo "== clang-format: ${#sources[@]} files formatted"
