// A warp's block-scaled fp8 dot products (kernels/cuda/fp8_gemm.h's numerics): R weight rows
// against up to MT activation rows, e4m3 values with an fp32 scale per 128 columns on both
// sides. Lane l takes the 16-byte chunks l, l + 32, ... of the rows (each chunk inside one
// 128-column group), scales each chunk's sum by both groups' scales, and the warp adds the
// lanes' sums by a butterfly: every output's sum runs in an order set by k alone, so a row's
// result depends on nothing else in its tile. Shared by the dense fp8 product and the fp8
// routed experts. Include from .cu files only.
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace mla::cuda {

inline constexpr int kFp8Chunk = 16;  // bytes a lane loads per step: 16 e4m3 values

// Two e4m3 values (the low 16 bits of `bits`) as floats; exact (e4m3 fits in fp16).
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t bits) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(bits & 0xffffu), __NV_E4M3);
  return __half22float2(__half2(h));
}

// Sum of 16 products of e4m3 pairs, in a fixed order.
__device__ __forceinline__ float fp8_dot16(const uint4& a, const uint4& b) {
  const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a0 = fp8x2_to_float2(av[i]), a1 = fp8x2_to_float2(av[i] >> 16);
    const float2 b0 = fp8x2_to_float2(bv[i]), b1 = fp8x2_to_float2(bv[i] >> 16);
    sum += a0.x * b0.x;
    sum += a0.y * b0.y;
    sum += a1.x * b1.x;
    sum += a1.y * b1.y;
  }
  return sum;
}

// acc[i][r] = sum over k of x_i . w_r with both sides' scales, for i < rows (rows <= MT), in
// every lane of the warp. w[r] / ws[r]: weight row r ([k] e4m3, 16-byte aligned) and its
// scales ([k / 128]); x[i] / xs[i] likewise for activation row i. k a multiple of 128.
template <int MT, int R>
__device__ __forceinline__ void fp8_warp_dots(const uint8_t* const (&w)[R],
                                              const float* const (&ws)[R],
                                              const uint8_t* const (&x)[MT],
                                              const float* const (&xs)[MT], int rows, int64_t k,
                                              int lane, float (&acc)[MT][R]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[i][r] = 0.0f;
  const int64_t chunks = k / kFp8Chunk;
  for (int64_t c = lane; c < chunks; c += 32) {
    const int64_t g = c * kFp8Chunk / 128;
    uint4 wv[R];
    float wscale[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      wv[r] = *reinterpret_cast<const uint4*>(w[r] + c * kFp8Chunk);
      wscale[r] = ws[r][g];
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (i >= rows) break;
      const uint4 xv = *reinterpret_cast<const uint4*>(x[i] + c * kFp8Chunk);
      const float xscale = xs[i][g];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[i][r] += fp8_dot16(xv, wv[r]) * (xscale * wscale[r]);
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    if (i >= rows) break;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2)
        acc[i][r] += __shfl_xor_sync(0xffffffffu, acc[i][r], offset);
    }
  }
}

}  // namespace mla::cuda
