#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "kernels/cpu/fp8_group.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_gemm.h"
#include "kernels/cuda/vec_io.cuh"
#include "kernels/error.h"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Output rows (of the weight) per warp; a block covers kWarps * kRowsPerWarp of them.
constexpr int kRowsPerWarp = 4;
// Bytes a lane loads per step: 16 e4m3 values, all in one 128-column group.
constexpr int kChunk = 16;

// One warp per (row, group): lane l holds values 4l .. 4l + 3 of the group's 128.
template <typename T>
__global__ void __launch_bounds__(32)
    quantize_kernel(const T* x, int64_t ldx, int64_t k, uint8_t* q, float* scale) {
  const int64_t row = blockIdx.y, group = blockIdx.x, groups = k / 128;
  const int lane = threadIdx.x;
  float v[4];
  load_floats<4>(x + row * ldx + group * 128 + 4 * lane, v);
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  const float s = amax > 0.0f ? amax / cpu::kFp8Max : 1.0f;
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t b = __nv_cvt_float_to_fp8(v[i] / s, __NV_SATFINITE, __NV_E4M3);
    packed |= b << (8 * i);
  }
  *reinterpret_cast<uint32_t*>(q + row * k + group * 128 + 4 * lane) = packed;
  if (lane == 0) scale[row * groups + group] = s;
}

// Two e4m3 values (the low 16 bits of `bits`) as floats; exact (e4m3 fits in fp16).
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t bits) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(bits & 0xffffu), __NV_E4M3);
  return __half22float2(__half2(h));
}

// Sum of 16 products of e4m3 pairs, in a fixed order.
__device__ __forceinline__ float dot16(const uint4& a, const uint4& b) {
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

// A warp computes kRowsPerWarp outputs for each of the (at most kFp8GemmRowTile) activation
// rows of blockIdx.y's tile: lane l takes 16-byte chunks l, l + 32, ... of the weight rows
// (each inside one group), scales each chunk's dot by both groups' scales, and the warp adds
// the lanes' sums at the end.
template <typename OutT>
__global__ void __launch_bounds__(kThreads) gemm_kernel(Fp8GemmParams p) {
  constexpr int MT = static_cast<int>(kFp8GemmRowTile), R = kRowsPerWarp;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row0 = (int64_t{blockIdx.x} * kWarps + warp) * R;
  const int64_t i0 = int64_t{blockIdx.y} * MT;
  const int rows_here = p.m - i0 < MT ? static_cast<int>(p.m - i0) : MT;
  if (row0 >= p.n) return;
  const int64_t groups = p.k / kFp8Group, chunks = p.k / kChunk;
  float acc[MT][R] = {};
  for (int64_t c = lane; c < chunks; c += 32) {
    const int64_t g = c * kChunk / kFp8Group;
    uint4 wv[R];
    float ws[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = min(row0 + r, p.n - 1);  // rows past n re-read row n - 1, dropped
      wv[r] = *reinterpret_cast<const uint4*>(p.w + row * p.k + c * kChunk);
      ws[r] = p.w_scale[row * groups + g];
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (i >= rows_here) break;
      const int64_t xi = i0 + i;
      const uint4 xv = *reinterpret_cast<const uint4*>(p.qx + xi * p.k + c * kChunk);
      const float xs = p.sx[xi * groups + g];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[i][r] += dot16(xv, wv[r]) * (xs * ws[r]);
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    if (i >= rows_here) break;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[i][r];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      const int64_t row = row0 + r;
      if (lane == 0 && row < p.n) {
        OutT* out = static_cast<OutT*>(p.y) + (i0 + i) * p.ldy + row;
        float value = v;
        if (p.beta != 0.0f) value += p.beta * to_float(*out);
        *out = from_float<OutT>(value);
      }
    }
  }
}

}  // namespace

void fp8_quantize_rows(const Fp8QuantizeParams& p, cudaStream_t stream) {
  // Check shapes
  MLA_REQUIRE(p.m >= 0 && p.k > 0 && p.k % kFp8Group == 0 && p.ldx >= p.k,
              "fp8_quantize_rows: m {}, k {} (a multiple of 128), ldx {} >= k", p.m, p.k, p.ldx);
  MLA_REQUIRE(p.x_dtype == DType::kF32 || p.x_dtype == DType::kBF16,
              "fp8_quantize_rows: activations must be F32 or BF16, not {}", dtype_name(p.x_dtype));
  MLA_REQUIRE(p.m <= 65535, "fp8_quantize_rows: m {} > 65535", p.m);
  // Check layout
  MLA_REQUIRE(is_aligned(p.x, 16) && p.ldx % 4 == 0 && is_aligned(p.q, 4),
              "fp8_quantize_rows: x must be 16-byte aligned with ldx a multiple of 4, q 4-byte "
              "aligned");
  if (p.m == 0) return;
  const dim3 grid(static_cast<unsigned>(p.k / kFp8Group), static_cast<unsigned>(p.m));
  if (p.x_dtype == DType::kF32) {
    quantize_kernel<<<grid, 32, 0, stream>>>(static_cast<const float*>(p.x), p.ldx, p.k, p.q,
                                             p.scale);
  } else {
    quantize_kernel<<<grid, 32, 0, stream>>>(static_cast<const __nv_bfloat16*>(p.x), p.ldx, p.k,
                                             p.q, p.scale);
  }
  MLA_CUDA_CHECK(cudaGetLastError());
}

void fp8_gemm(const Fp8GemmParams& p, cudaStream_t stream) {
  // Check shapes
  MLA_REQUIRE(p.m >= 0 && p.n >= 0 && p.k > 0 && p.k % kFp8Group == 0 && p.ldy >= p.n,
              "fp8_gemm: m {}, n {}, k {} (a multiple of 128), ldy {} >= n", p.m, p.n, p.k, p.ldy);
  // Check layout
  MLA_REQUIRE(is_aligned(p.w, 16) && is_aligned(p.qx, 16),
              "fp8_gemm: weights and activations must be 16-byte aligned");
  MLA_REQUIRE(p.y_dtype == DType::kF32 || p.y_dtype == DType::kBF16,
              "fp8_gemm: output must be F32 or BF16, not {}", dtype_name(p.y_dtype));
  const int64_t tiles = (p.m + kFp8GemmRowTile - 1) / kFp8GemmRowTile;
  MLA_REQUIRE(tiles <= 65535, "fp8_gemm: m {} needs more than 65535 row tiles", p.m);
  if (p.m == 0 || p.n == 0) return;
  const int64_t rows_per_block = kWarps * kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((p.n + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>(tiles));
  if (p.y_dtype == DType::kF32) {
    gemm_kernel<float><<<grid, kThreads, 0, stream>>>(p);
  } else {
    gemm_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
  }
  MLA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mla::cuda
