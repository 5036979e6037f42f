#include <cstdint>

#include "kernels/cuda/argmax.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/pdl.cuh"

namespace mla::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct Best {
  float value;
  int32_t index;
};

// The order that makes the reduction agree with the CPU's first-maximum scan: larger value,
// then lower index.
__device__ __forceinline__ Best better(Best a, Best b) {
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ Best warp_best(Best b) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const Best other{__shfl_down_sync(0xffffffffu, b.value, offset),
                     __shfl_down_sync(0xffffffffu, b.index, offset)};
    b = better(b, other);
  }
  return b;
}

__global__ void argmax_kernel(ArgmaxParams p) {
  wait_for_prerequisite();  // launched as a dependent: the kernels before have finished
  allow_dependent_launch();
  const float* row = p.logits + blockIdx.x * p.vocab;
  // Threads without an element hold (-inf, INT32_MAX), which loses to any real element, so a
  // row of all -inf still yields index 0 as on the CPU.
  Best b{-INFINITY, INT32_MAX};
  // Each thread visits its indices in ascending order, so strict > keeps its lowest index.
  for (int64_t i = threadIdx.x; i < p.vocab; i += kThreads) {
    const float v = row[i];
    if (v > b.value || b.index == INT32_MAX) b = {v, static_cast<int32_t>(i)};
  }
  b = warp_best(b);

  __shared__ Best partial[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = b;
  __syncthreads();
  if (warp == 0) {
    b = lane < kWarps ? partial[lane] : Best{-INFINITY, INT32_MAX};
    b = warp_best(b);
    if (lane == 0) p.out[blockIdx.x] = b.index;
  }
}

}  // namespace

void argmax_f32(const ArgmaxParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  launch_dependent(argmax_kernel, static_cast<unsigned>(p.rows), kThreads, 0, stream, true, p);
}

}  // namespace mla::cuda
