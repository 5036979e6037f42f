// Matrix products with few rows, as decode at small batch makes them: the GemmParams product of
// gemm.h (C[m, n] = alpha * A[m, k] op(B) + beta * C, batched) for m <= kSkinnyMaxRows. The
// cost is reading B (the weight) once, so the kernel spreads B's rows, in 16-byte chunks, over
// the whole GPU and keeps several loads in flight per thread; cuBLAS's GEMV-shaped kernels read
// these shapes at about half the copy bandwidth (docs/BENCHMARKS.md, batch-1 profile). A and B both
// bf16 (fp32 or bf16 output) or both fp32 (fp32 output); fp32 accumulation. The CPU reference is
// mla::cpu::gemm.
//
// As a programmatic dependent launch (pdl.cuh) the kernel loads its first weights before it
// waits for the previous kernel on the stream, overlapping that kernel's tail; only valid when
// B is not written by kernels still in flight (GemmParams::b_constant).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/gemm.h"

namespace mla::cuda {

inline constexpr int64_t kSkinnyMaxRows = 8;
// gemm() takes this kernel up to this many rows. On an H100 it beat cuBLAS on every decode
// projection of DeepSeek-V2-Lite and V3 at 1 row (1.2-2.3x alone, `mlaserve bench-kernels
// --benches small_gemm`), on all but V3's o_proj at 4 and on few at 8; in the whole
// V2-Lite-shaped decode step (`mlaserve bench-decode`) it took batch 1 from 3.65 to 3.20 ms and
// batch 2 from 4.72 to 4.33 ms, while batch 4 ran 1.7 % slower than with cuBLAS.
inline constexpr int64_t kSkinnyPreferredRows = 2;

// Whether skinny_gemm takes p: 1 <= m <= kSkinnyMaxRows, n, k >= 1, batch <= 65535, leading
// dimensions at least the rows they hold (as gemm() requires); A and B
// both bf16 or both fp32 (then an fp32 C); B 16-byte aligned with ldb and stride_b multiples of
// 16 bytes of elements, and the dimension B is contiguous in (k when b_nk, else n) too; when
// b_nk the same for A (pointer, lda, stride_a).
bool skinny_gemm_supports(const GemmParams& p);

// Enqueues the product on `stream`, as a programmatic dependent of the previous kernel when
// `dependent` (then p.b_constant must hold). Never synchronises. Throws kInvalidArgument when
// !skinny_gemm_supports(p) or dependent && !p.b_constant.
// Each output row's sum runs in an order set by n, k and the thread layout alone (m only
// bounds a loop); the layout widens with the batch to fill the GPU unless `batch_invariant`,
// which keeps it at what one product would get, so a row sums the same in any launch.
void skinny_gemm(const GemmParams& p, cudaStream_t stream, bool dependent = false,
                 bool batch_invariant = false);

// Whether skinny_gemm_pair takes (first, second): each supported alone, bf16 inputs, B stored
// [n, k] (b_nk), batch 1, and the same A (pointer, m, k, lda).
bool skinny_gemm_pair_supports(const GemmParams& first, const GemmParams& second);

// Two products of the same A in one launch (the decode step's kv_a and query products both
// read the normed hidden rows), saving a launch and its dependent-launch wait. Each output
// row's sum runs in an order set by both products' shapes (the group width follows their
// rows together), so it may round unlike the product's own skinny_gemm. Throws kInvalidArgument
// when !skinny_gemm_pair_supports(first, second), or dependent and a B not constant.
void skinny_gemm_pair(const GemmParams& first, const GemmParams& second, cudaStream_t stream,
                      bool dependent = false);

}  // namespace mla::cuda
