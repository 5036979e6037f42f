#!/usr/bin/env bash
# Packs mlaserve binaries with the shared libraries a node without our dependencies lacks,
# so they run on any x86-64 Linux with a newer glibc and (for GPU code) a CUDA 13 driver
# and toolkit libraries.
#   launch/bundle.sh OUT_DIR BINARY...      e.g. launch/bundle.sh bundle build/launch/mlaserve
# Produces OUT_DIR/bin/*, OUT_DIR/lib/*.so* and OUT_DIR/env.sh (source it before running).
# Left out on purpose: the C/C++ runtime (every node has a compatible one), and the CUDA
# driver, runtime, cuBLAS and NCCL (taken from the node's CUDA installation).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OUT_DIR BINARY..." >&2; exit 2; }
out=$1
shift
mkdir -p "$out/bin" "$out/lib"
skip='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libgcc_s\.|libstdc\+\+\.|libcuda\.|libcudart\.|libcublas|libcublasLt|libnccl\.|libnvidia)'
for bin in "$@"; do
  [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 1; }
  cp -f "$bin" "$out/bin/"
  strip --strip-debug "$out/bin/$(basename "$bin")"
  ldd "$bin" | awk '/=> \// {print $1, $3}' | while read -r name path; do
    if ! [[ $name =~ $skip ]]; then cp -fL "$path" "$out/lib/$name"; fi
  done
done
cat >"$out/env.sh" <<'ENV'
# Source this to run the bundled binaries: bundled libraries first, then the node's CUDA.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LD_LIBRARY_PATH="$here/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}"
export PATH="$here/bin:$PATH"
ENV
echo "bundled $# binaries and $(ls "$out/lib" | wc -l) libraries ($(du -sh "$out" | cut -f1)) into $out"
# A gzip of the folder travels where size counts (OpenBLAS alone is 36 MB); unpack it with
# `tar xzf OUT_DIR.tar.gz` on the node.
tar czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"
echo "packed $(du -sh "$out.tar.gz" | cut -f1) into $out.tar.gz"
