#include <cstdint>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/rope.h"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;

// Block (d/2, vectors per block): thread (j, v) rotates pair j of vector v. With interleave
// a thread writes slots other threads read, so every thread reads its pair before the block
// barrier and writes after it; a vector never spans two blocks.
__global__ void rope_kernel(RopeParams p) {
  const int64_t half = p.d / 2;
  const int64_t j = threadIdx.x;
  const int64_t v = int64_t{blockIdx.x} * blockDim.y + threadIdx.y;
  const bool active = v < p.tokens * p.heads;
  float a = 0.0f, b = 0.0f, c = 0.0f, s = 0.0f;
  float* x = nullptr;
  if (active) {
    const int64_t t = v / p.heads, h = v - t * p.heads;
    x = p.x + t * p.token_stride + h * p.head_stride;
    a = p.interleave ? x[2 * j] : x[j];
    b = p.interleave ? x[2 * j + 1] : x[j + half];
    // As rope_table: the angle is rounded to fp32 before cos and sin.
    const float angle = static_cast<float>(p.positions[t]) * p.inv_freq[j];
    sincosf(angle, &s, &c);
    c *= p.attention_factor;
    s *= p.attention_factor;
  }
  __syncthreads();
  if (active) {
    x[j] = a * c - b * s;
    x[j + half] = b * c + a * s;
  }
}

}  // namespace

void rope_f32(const RopeParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.heads == 0) return;
  MLA_CHECK(p.d > 0 && p.d % 2 == 0 && p.d <= cpu::kMaxRopeDim, "rope dim {} not even in (0, {}]",
            p.d, cpu::kMaxRopeDim);
  const int half = static_cast<int>(p.d / 2);
  const int per_block = kThreads / half > 0 ? kThreads / half : 1;
  const int64_t blocks = (p.tokens * p.heads + per_block - 1) / per_block;
  MLA_CHECK(blocks < (int64_t{1} << 31), "{} rope vectors exceed one grid", p.tokens * p.heads);
  rope_kernel<<<static_cast<unsigned>(blocks), dim3(half, per_block), 0, stream>>>(p);
  MLA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mla::cuda
