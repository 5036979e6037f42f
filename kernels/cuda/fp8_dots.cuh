// Block-scaled fp8 dot products (kernels/cuda/fp8_gemm.h's numerics): R weight rows against
// up to MT activation rows, e4m3 values with an fp32 scale per 128 columns on both sides. The
// threads of a warp (fp8_warp_dots), or of a whole block splitting k (fp8_thread_dots and a
// reduction of the caller's), take 16-byte chunks of the rows in a fixed pattern (each chunk
// inside one 128-column group) and sum them in an order set by k and that pattern alone, so a
// row's result depends on nothing else in its tile. Shared by the dense fp8 product and the
// fp8 routed experts. Include from .cu files only.
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

// Sixteen e4m3 values as floats.
__device__ __forceinline__ void fp8x16_to_floats(const uint4& v, float (&out)[16]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 lo = fp8x2_to_float2(words[i]), hi = fp8x2_to_float2(words[i] >> 16);
    out[4 * i] = lo.x;
    out[4 * i + 1] = lo.y;
    out[4 * i + 2] = hi.x;
    out[4 * i + 3] = hi.y;
  }
}

// This thread's share of acc[i][r] = sum over k of x_i . w_r with both sides' scales, for
// i < rows (rows <= MT): the 16-byte chunks first, first + stride, ... of the rows, each chunk's
// 16 products summed in order and scaled by both groups' scales. Every value is
// widened once per chunk (a weight chunk serves all MT activation rows). w[r] / ws[r]: weight
// row r ([k] e4m3, 16-byte aligned) and its scales ([k / 128]); x[i] / xs[i] likewise for
// activation row i. k a multiple of 128.
template <int MT, int R>
__device__ __forceinline__ void fp8_thread_dots(const uint8_t* const (&w)[R],
                                                const float* const (&ws)[R],
                                                const uint8_t* const (&x)[MT],
                                                const float* const (&xs)[MT], int rows, int64_t k,
                                                int first, int stride, float (&acc)[MT][R]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[i][r] = 0.0f;
  const int64_t chunks = k / kFp8Chunk;
  for (int64_t c = first; c < chunks; c += stride) {
    const int64_t g = c * kFp8Chunk / 128;
    float wf[R][16];
    float wscale[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      fp8x16_to_floats(*reinterpret_cast<const uint4*>(w[r] + c * kFp8Chunk), wf[r]);
      wscale[r] = ws[r][g];
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (i >= rows) break;
      float xf[16];
      fp8x16_to_floats(*reinterpret_cast<const uint4*>(x[i] + c * kFp8Chunk), xf);
      const float xscale = xs[i][g];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float sum = 0.0f;
#pragma unroll
        for (int e = 0; e < 16; ++e) sum += xf[e] * wf[r][e];
        acc[i][r] += sum * (xscale * wscale[r]);
      }
    }
  }
}

// acc[i][r] (i < rows) summed over the warp's lanes, into every lane.
template <int MT, int R>
__device__ __forceinline__ void fp8_warp_sum(int rows, float (&acc)[MT][R]) {
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

// acc[i][r] = sum over k of x_i . w_r with both sides' scales, for i < rows (rows <= MT), in
// every lane of the warp (fp8_thread_dots over the lanes, then fp8_warp_sum). Arguments as
// fp8_thread_dots'.
template <int MT, int R>
__device__ __forceinline__ void fp8_warp_dots(const uint8_t* const (&w)[R],
                                              const float* const (&ws)[R],
                                              const uint8_t* const (&x)[MT],
                                              const float* const (&xs)[MT], int rows, int64_t k,
                                              int lane, float (&acc)[MT][R]) {
  fp8_thread_dots<MT, R>(w, ws, x, xs, rows, k, lane, 32, acc);
  fp8_warp_sum<MT, R>(rows, acc);
}

}  // namespace mla::cuda
