#!/usr/bin/env bash
# FlashMLA's dense decode and mlaserve's mla_decode on the same GPU, in one run: the peer
# harness every decode-kernel change reports (docs/BENCHMARKS.md).
#   tests/bench/peer_flashmla.sh FLASHMLA_SRC [OUT_DIR]
# FLASHMLA_SRC is a FlashMLA source tree (deepseek-ai/FlashMLA with the CUTLASS headers it pins)
# prepared for a side-by-side run: besides FlashMLA's own files it holds setup_dense.py (builds
# only the SM90 dense decode, its scheduler-metadata and combine kernels) and
# bench_dense_decode.py (times them with CUDA events the way `mlaserve bench-kernels` times
# mla_decode: batch 128, per-sequence context uniform in [m/2, 3m/2] for m = 4096 and 8192,
# pages of 64, heads 16/32/64/128, s_q 1/2, median of 30 after 5 warm-ups, the same byte and
# FLOP accounting, copy and GEMM ceilings measured in the same process). The tree is copied
# under OUT_DIR and built there (PyTorch's extension builder and nvcc, sm_90a; ~1.5 min on 16
# cores). Then `mlaserve bench-kernels --benches mla_decode` runs on the same GPU, and the
# table printed last gives each configuration's time in both and mlaserve / FlashMLA (below 1:
# mlaserve is faster), with each run's ceilings. A second table does the same for one
# unbalanced batch (lengths 4641,45118,1730,1696 at s_q 4, 16 heads: the batch ThunderMLA's
# write-up times FlashMLA on; tests/bench/flashmla_lengths.py times FlashMLA there, `mlaserve
# bench-kernels --lengths` mlaserve). Exits non-zero when a step fails or a configuration is
# missing from either run.
# env: MLASERVE (default build/launch/mlaserve, or mlaserve on PATH), PYTHON (python3),
#      NVCC_THREADS (8), MAX_JOBS (the host's cores), DECODE_KERNELS (bench-kernels'
#      --decode-kernel: default auto, what mla_decode picks; split,paired times both bf16
#      kernels, a table each), BASE_MLASERVE (an earlier build's mlaserve: timed too, after
#      this one, with tables labelled "base", so a kernel change is measured against its base
#      and FlashMLA in one call).
set -euo pipefail
src=${1:?usage: tests/bench/peer_flashmla.sh FLASHMLA_SRC [OUT_DIR]}
out=${2:-${OUT:-$(mktemp -d)}}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # the FlashMLA steps run from inside its copy
python=${PYTHON:-python3}
mlaserve=${MLASERVE:-build/launch/mlaserve}
kernels=${DECODE_KERNELS:-auto}
[ -x "$mlaserve" ] || mlaserve=$(command -v mlaserve)
for f in setup_dense.py bench_dense_decode.py csrc/cutlass/include; do
  [ -e "$src/$f" ] || { echo "peer_flashmla: $src has no $f" >&2; exit 2; }
done
rm -rf "$out/flashmla"
cp -r "$src" "$out/flashmla"

echo "== building FlashMLA's dense decode (log: $out/flashmla_build.log)"
# CUDA 13 keeps libcu++ (cuda/std/...) under include/cccl.
cuda_home=${CUDA_HOME:-/usr/local/cuda}
export CPLUS_INCLUDE_PATH=$cuda_home/include/cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
(cd "$out/flashmla" && FLASH_MLA_DISABLE_FP16=1 FLASH_MLA_DISABLE_SM100=1 \
  NVCC_THREADS=${NVCC_THREADS:-8} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$python" setup_dense.py build_ext --inplace) >"$out/flashmla_build.log" 2>&1 ||
  { tail -30 "$out/flashmla_build.log" >&2; exit 1; }

echo "== FlashMLA (log: $out/flashmla.log)"
(cd "$out/flashmla" && PYTHONPATH=$PWD "$python" bench_dense_decode.py "$out/flashmla.json") \
  >"$out/flashmla.log" 2>&1 || { tail -30 "$out/flashmla.log" >&2; exit 1; }

echo "== mlaserve (log: $out/mlaserve.log)"
"$mlaserve" bench-kernels --benches mla_decode --batch 128 --contexts 4096,8192 \
  --heads 16,32,64,128 --sq 1,2 --iters 30 --warmup 5 --decode-kernel "$kernels" \
  --json "$out/mlaserve.json" \
  >"$out/mlaserve.log" 2>&1 || { tail -30 "$out/mlaserve.log" >&2; exit 1; }

base=()
if [ -n "${BASE_MLASERVE:-}" ]; then
  echo "== base build $BASE_MLASERVE (log: $out/base.log)"
  "$BASE_MLASERVE" bench-kernels --benches mla_decode --batch 128 --contexts 4096,8192 \
    --heads 16,32,64,128 --sq 1,2 --iters 30 --warmup 5 --json "$out/base.json" \
    >"$out/base.log" 2>&1 || { tail -30 "$out/base.log" >&2; exit 1; }
  base=("base=$out/base.json")
fi

here=$(cd "$(dirname "$0")" && pwd)
lengths=4641,45118,1730,1696
echo "== the unbalanced batch $lengths, s_q 4, 16 heads (logs: $out/*_lengths.log)"
(cd "$out/flashmla" && PYTHONPATH=$PWD "$python" "$here/flashmla_lengths.py" \
  "$out/flashmla_lengths.json" --lengths $lengths --heads 16 --sq 4) \
  >"$out/flashmla_lengths.log" 2>&1 || { tail -30 "$out/flashmla_lengths.log" >&2; exit 1; }
"$mlaserve" bench-kernels --benches mla_decode --lengths $lengths --heads 16 --sq 4 --iters 30 \
  --warmup 5 --decode-kernel "$kernels" --json "$out/mlaserve_lengths.json" \
  >"$out/mlaserve_lengths.log" 2>&1 ||
  { tail -30 "$out/mlaserve_lengths.log" >&2; exit 1; }

base_lengths=()
if [ -n "${BASE_MLASERVE:-}" ]; then
  "$BASE_MLASERVE" bench-kernels --benches mla_decode --lengths $lengths --heads 16 --sq 4 \
    --iters 30 --warmup 5 --json "$out/base_lengths.json" >"$out/base_lengths.log" 2>&1 ||
    { tail -30 "$out/base_lengths.log" >&2; exit 1; }
  base_lengths=("base=$out/base_lengths.json")
fi

"$python" "$here/peer_table.py" "$out/flashmla.json" "$out/mlaserve.json" "${base[@]}"
echo
"$python" "$here/peer_table.py" "$out/flashmla_lengths.json" "$out/mlaserve_lengths.json" \
  "${base_lengths[@]}"
