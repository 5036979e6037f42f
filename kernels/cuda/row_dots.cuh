// The inner loop of the weight-streaming products (skinny_gemm, the MoE experts at a few
// tokens): dot products of up to MT input rows with R weight rows, each weight row's 16-byte
// chunks spread over a group of G threads with kRowDotsUnroll loads per row in flight, then the
// group's partial sums added up. Include from .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/vec_io.cuh"

namespace mla::cuda {

inline constexpr int kRowDotsUnroll = 4;

// The width G (32 .. block_threads, a power of two) of the thread groups for `groups` groups of
// rows with `chunks` 16-byte chunks each: widened while the grid is short of the threads that
// keep the GPU's memory system busy (128 Ki) and every thread keeps at least one chunk.
inline int row_dots_group_width(int64_t groups, int64_t chunks, int block_threads) {
  constexpr int64_t kTargetThreads = int64_t{128} * 1024;
  int g = 32;
  while (g < block_threads && groups * g < kTargetThreads && 2 * g <= chunks) g *= 2;
  return g;
}

// 16 bytes of a weight, read once: streamed past L1.
__device__ __forceinline__ uint4 load_streaming(const void* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}

// The 16 / sizeof(T) values of a 16-byte chunk as floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float* out);
template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& raw, float* out) {
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void unpack16<float>(const uint4& raw, float* out) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}

// One thread's share of acc[i][r] += sum_c A[i, c] . B_r[c] over the 16-byte chunks lane,
// lane + G, ... of rows of `chunks` chunks. load() may run before the kernel waits for the
// writer of A (it reads only B); dot() then reads A (m <= MT rows, row stride lda elements).
template <typename T, int MT, int R, int G>
struct RowDots {
  static constexpr int V = 16 / sizeof(T);
  const T* b[R];
  int64_t chunks;
  int64_t c0;
  uint4 w[kRowDotsUnroll][R];

  __device__ __forceinline__ void load() {
#pragma unroll
    for (int u = 0; u < kRowDotsUnroll; ++u) {
      const int64_t c = c0 + int64_t{u} * G;
#pragma unroll
      for (int r = 0; r < R; ++r) w[u][r] = c < chunks ? load_streaming(b[r] + c * V) : uint4{};
    }
  }

  __device__ __forceinline__ void dot(const T* a, int64_t lda, int64_t m, float (&acc)[MT][R]) {
    while (c0 < chunks) {
#pragma unroll
      for (int u = 0; u < kRowDotsUnroll; ++u) {
        const int64_t c = c0 + int64_t{u} * G;
        if (c >= chunks) break;
        float wf[R][V];
#pragma unroll
        for (int r = 0; r < R; ++r) unpack16<T>(w[u][r], wf[r]);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          if (i >= m) break;
          float av[V];
          load_floats<V>(a + i * lda + c * V, av);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int v = 0; v < V; ++v) acc[i][r] = fmaf(av[v], wf[r][v], acc[i][r]);
          }
        }
      }
      c0 += int64_t{kRowDotsUnroll} * G;
      if (c0 < chunks) load();
    }
  }
};

// Adds up acc over each group of G consecutive threads of a Threads-thread block: afterwards
// sums[g][i * R + r] holds group g's total of acc[i][r]. Every thread of the block must call it.
template <int Threads, int G, int MT, int R>
__device__ __forceinline__ void group_sums(const float (&acc)[MT][R],
                                           float (&partial)[Threads / 32][MT * R],
                                           float (&sums)[Threads / G][MT * R]) {
  static_assert(G % 32 == 0 && Threads % G == 0 && MT * R <= G, "groups of whole warps");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % G, group = threadIdx.x / G;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[i][r];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (threadIdx.x % 32 == 0) partial[warp][i * R + r] = v;
    }
  }
  __syncthreads();
  if (lane < MT * R) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < G / 32; ++w) total += partial[group * (G / 32) + w][lane];
    sums[group][lane] = total;
  }
  __syncthreads();
}

}  // namespace mla::cuda
