#!/usr/bin/env bash
# Installs what mlaserve needs (Debian 12) and the Python clients the e2e tests use (.venv),
# checks that every C++ source is clang-formatted
# (tests/check_format.sh), builds, and runs every test that needs no GPU (GPU tests are built
# too and skip themselves without a device).
#   tests/run.sh                 all labels
#   tests/run.sh -L unit         extra arguments go to ctest
# Environment: BUILD_DIR (default: build), JOBS (default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh

BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
mla_install_packages
mla_python_tools
tests/check_format.sh
mla_configure_and_build "$BUILD_DIR" "$JOBS"

echo "== tests"
ctest --test-dir "$BUILD_DIR" --output-on-failure --timeout 600 -j "$JOBS" "$@"
