#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "kernels/cpu/fp8_group.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_dots.cuh"
#include "kernels/cuda/fp8_gemm.h"
#include "kernels/cuda/vec_io.cuh"
#include "kernels/error.h"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Output rows (of the weight) per warp; a block covers kWarps * kRowsPerWarp of them.
constexpr int kRowsPerWarp = 4;

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

// Output rows of blockIdx.x's block for each of the (at most MT) activation rows of blockIdx.y's
// tile. kSplitK false: each warp takes kRowsPerWarp weight rows over all of k
// (fp8_warp_dots), a block kWarps * kRowsPerWarp rows. kSplitK true, for products too narrow to
// fill the device that way: the block's warps share kRowsPerWarp rows, splitting k (thread t
// takes chunks t, t + kThreads, ...), and add their sums in warp order.
static_assert(kFp8GemmRowTile * kRowsPerWarp <= kThreads);  // the split kernel's final sums

template <typename OutT, int MT, bool kSplitK>
__global__ void __launch_bounds__(kThreads) gemm_kernel(Fp8GemmParams p) {
  constexpr int R = kRowsPerWarp;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row0 =
      kSplitK ? int64_t{blockIdx.x} * R : (int64_t{blockIdx.x} * kWarps + warp) * R;
  const int64_t i0 = int64_t{blockIdx.y} * MT;
  const int rows_here = p.m - i0 < MT ? static_cast<int>(p.m - i0) : MT;
  if (row0 >= p.n) return;  // uniform over the warp (kSplitK: over the block)
  const int64_t groups = p.k / kFp8Group;
  const uint8_t* w[R];
  const float* ws[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = min(row0 + r, p.n - 1);  // rows past n re-read row n - 1, dropped
    w[r] = p.w + row * p.k;
    ws[r] = p.w_scale + row * groups;
  }
  const uint8_t* x[MT];
  const float* xs[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int64_t xi = i0 + min(i, rows_here - 1);
    x[i] = p.qx + xi * p.k;
    xs[i] = p.sx + xi * groups;
  }
  const auto store = [&](int i, int r, float value) {
    const int64_t row = row0 + r;
    if (row >= p.n) return;
    OutT* out = static_cast<OutT*>(p.y) + (i0 + i) * p.ldy + row;
    if (p.beta != 0.0f) value += p.beta * to_float(*out);
    *out = from_float<OutT>(value);
  };
  float acc[MT][R];
  if constexpr (!kSplitK) {
    fp8_warp_dots<MT, R>(w, ws, x, xs, rows_here, p.k, lane, acc);
    if (lane != 0) return;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (i >= rows_here) break;
#pragma unroll
      for (int r = 0; r < R; ++r) store(i, r, acc[i][r]);
    }
  } else {
    __shared__ float partial[kWarps][MT][R];
    fp8_thread_dots<MT, R>(w, ws, x, xs, rows_here, p.k, static_cast<int>(threadIdx.x), kThreads,
                           acc);
    fp8_warp_sum<MT, R>(rows_here, acc);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) partial[warp][i][r] = acc[i][r];
    }
    __syncthreads();
    const int i = static_cast<int>(threadIdx.x) / R, r = static_cast<int>(threadIdx.x) % R;
    if (i < rows_here) {
      float value = 0.0f;
#pragma unroll
      for (int v = 0; v < kWarps; ++v) value += partial[v][i][r];
      store(i, r, value);
    }
  }
}

template <typename OutT, int MT>
void launch_gemm(const Fp8GemmParams& p, cudaStream_t stream) {
  int device = 0, sms = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&device));
  MLA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const auto tiles = static_cast<unsigned>((p.m + MT - 1) / MT);
  // By n alone (never m), so a row's result does not depend on how many rows came with it.
  const int64_t row_blocks = (p.n + kWarps * kRowsPerWarp - 1) / (kWarps * kRowsPerWarp);
  if (row_blocks < sms) {
    const dim3 grid(static_cast<unsigned>((p.n + kRowsPerWarp - 1) / kRowsPerWarp), tiles);
    gemm_kernel<OutT, MT, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    const dim3 grid(static_cast<unsigned>(row_blocks), tiles);
    gemm_kernel<OutT, MT, false><<<grid, kThreads, 0, stream>>>(p);
  }
  MLA_CUDA_CHECK(cudaGetLastError());
}

// A tile of as many rows as the product has, up to kFp8GemmRowTile: the accumulators of rows a
// tile lacks cost registers, and so blocks per SM. Each output sums the same terms in the same
// order whatever the tile, so a row's result does not depend on m.
template <typename OutT>
void launch_gemm(const Fp8GemmParams& p, cudaStream_t stream) {
  if (p.m <= 1) return launch_gemm<OutT, 1>(p, stream);
  if (p.m <= 2) return launch_gemm<OutT, 2>(p, stream);
  if (p.m <= 4) return launch_gemm<OutT, 4>(p, stream);
  if (p.m <= 8) return launch_gemm<OutT, 8>(p, stream);
  launch_gemm<OutT, static_cast<int>(kFp8GemmRowTile)>(p, stream);
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
  if (p.y_dtype == DType::kF32) {
    launch_gemm<float>(p, stream);
  } else {
    launch_gemm<__nv_bfloat16>(p, stream);
  }
}

}  // namespace mla::cuda
