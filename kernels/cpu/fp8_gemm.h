// Block-scaled fp8 products: the numerics of DeepSeek-V3's fp8 inference, and the reference
// the CUDA fp8 products are tested against.
//
// Weights stay as the checkpoint stores them, e4m3 with fp32 scales; the scales are kept per
// row and per `group` columns, w_scale [n, ceil(k / group)], so that a tensor-parallel shard
// of any rows (and of columns starting on a group boundary) and a concatenation of row blocks
// (gate and up) are again of this form. A checkpoint's 128x128 blocks repeat each block's
// scale over its 128 rows. Activations are quantised at run time per row and group
// (fp8_group.h's rule), and each group's products of e4m3 values are summed in fp32 and
// scaled by both scales:
//   y[i][r] = sum_b  sx[i][b] * sw[r][b] * sum_{j in group b} qx[i][j] * qw[r][j]  (+ beta y[i][r])
// Every output row depends on its own input row only (batch-invariant by construction).
// Thread-safe (no shared state), single-threaded, host memory.
#pragma once

#include <cstdint>

namespace mla::cpu {

struct Fp8GemmParams {
  const float* x = nullptr;  // [m, k] activations, row i at x + i * ldx
  int64_t m = 0, k = 0, ldx = 0;
  const uint8_t* w = nullptr;      // [n, k] e4m3
  const float* w_scale = nullptr;  // [n, ceil(k / group)]
  int64_t n = 0;
  int64_t group = 128;  // columns per scale, for the weights and the activations alike
  float* y = nullptr;   // [m, n], row i at y + i * ldy
  int64_t ldy = 0;
  float beta = 0.0f;
};

// q [m, k] e4m3 and scales [m, ceil(k / group)] <- x [m, k] (row stride ldx).
void quantize_rows_fp8(const float* x, int64_t m, int64_t k, int64_t ldx, int64_t group, uint8_t* q,
                       float* scales);

// y = x * W^T (+ beta y) as the header comment says. Throws kInvalidArgument for empty or
// negative sizes, a group < 1, or strides shorter than a row.
void gemm_fp8_blockscaled(const Fp8GemmParams& p);

}  // namespace mla::cpu
