// Products with fp8 weights kept as an fp8 checkpoint stores them (`fp8_weights: keep`), the
// CUDA side of kernels/cpu/fp8_gemm.h, which defines the numerics and is the reference:
// activations are quantised per row and 128 columns to e4m3 (s = amax / 448), and
//   y[i][r] = sum_b  sx[i][b] * sw[r][b] * sum_{j in group b} qx[i][j] * qw[r][j]  (+ beta y)
// Two kernels: fp8_quantize_rows (the activations) and fp8_gemm (the product, reading the
// weights once per kFp8GemmRowTile rows of activations: a weight-streaming kernel for decode's
// few rows; prefill-sized products re-read the weights per tile). A product whose weight rows
// would leave SMs idle (fewer than 32 rows per SM) splits k over a block's warps instead. Launchers
// take a stream and never synchronise. Shapes: k a multiple of 128 (every DeepSeek product's input
// is).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/dtype.h"

namespace mla::cuda {

inline constexpr int64_t kFp8Group = 128;       // columns per scale, weights and activations
inline constexpr int64_t kFp8GemmRowTile = 16;  // activation rows one weight pass serves

struct Fp8QuantizeParams {
  const void* x = nullptr;  // [m, k] fp32 or bf16 (x_dtype), row stride ldx elements
  DType x_dtype = DType::kF32;
  int64_t m = 0, k = 0, ldx = 0;
  uint8_t* q = nullptr;    // [m, k] e4m3
  float* scale = nullptr;  // [m, k / 128]
};

// q, scale <- x, as cpu::quantize_rows_fp8 (bit for bit: the same division and rounding).
// Throws kInvalidArgument for k not a multiple of 128, m < 0 or > 65535, ldx < k or not a
// multiple of 4, an unaligned x (16 bytes) or q (4 bytes), or another x dtype.
void fp8_quantize_rows(const Fp8QuantizeParams& p, cudaStream_t stream);

struct Fp8GemmParams {
  const uint8_t* qx = nullptr;  // [m, k] e4m3 activations (fp8_quantize_rows)
  const float* sx = nullptr;    // [m, k / 128]
  int64_t m = 0, k = 0;
  const uint8_t* w = nullptr;      // [n, k] e4m3 weights, 16-byte aligned
  const float* w_scale = nullptr;  // [n, k / 128]
  int64_t n = 0;
  void* y = nullptr;  // [m, n] fp32 or bf16 (y_dtype), row stride ldy elements
  DType y_dtype = DType::kF32;
  int64_t ldy = 0;
  float beta = 0.0f;  // y = product + beta * y (beta 0 never reads y)
};

// y <- the product above. Each output's sum runs in an order set by k alone (a row's result does
// not depend on m or on the other rows). Throws kInvalidArgument for k not a multiple of 128,
// negative sizes, ldy < n, an unaligned w, or another y dtype.
void fp8_gemm(const Fp8GemmParams& p, cudaStream_t stream);

}  // namespace mla::cuda
