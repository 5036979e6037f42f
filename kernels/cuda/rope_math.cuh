// Rotary embedding math shared by the CUDA kernels that rotate (rope_bf16.cu, latent_store.cu):
// the same numerics as cpu::rope_table followed by cpu::rope_rotate, in fp32 whatever the
// storage type. Include from .cu files only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/vec_io.cuh"

namespace mla::cuda::rope {

// (cos, sin) of pair j's angle at `pos`, both scaled by attention_factor. As rope_table, the
// angle is rounded to fp32 before cos and sin.
__device__ __forceinline__ float2 cos_sin(int32_t pos, float inv_freq, float attention_factor) {
  float s, c;
  sincosf(static_cast<float>(pos) * inv_freq, &s, &c);
  return make_float2(c * attention_factor, s * attention_factor);
}

// Pair j of the d = 2 * half values at x, rotated: .x is out[j], .y is out[j + half].
// interleave: the pair is (x[2j], x[2j+1]); otherwise (x[j], x[j + half]).
template <typename T>
__device__ __forceinline__ float2 rotate_pair(const T* x, int64_t j, int64_t half, bool interleave,
                                              float2 cs) {
  const float a = to_float(interleave ? x[2 * j] : x[j]);
  const float b = to_float(interleave ? x[2 * j + 1] : x[j + half]);
  return make_float2(a * cs.x - b * cs.y, b * cs.x + a * cs.y);
}

// Vectors (t, h) of d values at src + t * src_token_stride + h * src_head_stride, rotated into
// dst with its own strides. dst may be src with the same strides (in place); vectors must not
// otherwise overlap.
template <typename In, typename Out>
struct Vectors {
  const In* src;
  Out* dst;
  const int32_t* positions;  // [tokens]
  const float* inv_freq;     // [d / 2]
  int64_t tokens, heads, d;
  int64_t src_token_stride, src_head_stride, dst_token_stride, dst_head_stride;
  float attention_factor;
  bool interleave;
};

constexpr int kThreads = 256;

// Block (d/2, vectors per block): thread (j, v) rotates pair j of vector v. In place with
// interleave a thread writes slots other threads read, so every thread reads its pair before
// the block barrier and writes after it; a vector never spans two blocks.
template <typename In, typename Out>
__global__ void rotate_kernel(Vectors<In, Out> p) {
  wait_for_prerequisite();  // launched as a dependent: the kernels before have finished
  allow_dependent_launch();
  const int64_t half = p.d / 2;
  const int64_t j = threadIdx.x;
  const int64_t v = int64_t{blockIdx.x} * blockDim.y + threadIdx.y;
  const bool active = v < p.tokens * p.heads;
  float2 r = make_float2(0.0f, 0.0f);
  Out* dst = nullptr;
  if (active) {
    const int64_t t = v / p.heads, h = v - t * p.heads;
    const In* src = p.src + t * p.src_token_stride + h * p.src_head_stride;
    dst = p.dst + t * p.dst_token_stride + h * p.dst_head_stride;
    r = rotate_pair(src, j, half, p.interleave,
                    cos_sin(p.positions[t], p.inv_freq[j], p.attention_factor));
  }
  __syncthreads();
  if (active) {
    dst[j] = from_float<Out>(r.x);
    dst[j + half] = from_float<Out>(r.y);
  }
}

template <typename In, typename Out>
void launch(const Vectors<In, Out>& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.heads == 0) return;
  MLA_CHECK(p.d > 0 && p.d % 2 == 0 && p.d <= cpu::kMaxRopeDim, "rope dim {} not even in (0, {}]",
            p.d, cpu::kMaxRopeDim);
  const int half = static_cast<int>(p.d / 2);
  const int per_block = kThreads / half > 0 ? kThreads / half : 1;
  const int64_t blocks = (p.tokens * p.heads + per_block - 1) / per_block;
  MLA_CHECK(blocks < (int64_t{1} << 31), "{} rope vectors exceed one grid", p.tokens * p.heads);
  launch_dependent(rotate_kernel<In, Out>, static_cast<unsigned>(blocks), dim3(half, per_block), 0,
                   stream, true, p);
}

}  // namespace mla::cuda::rope
