// Block-wide reductions for kernels that give one block to one row. Include from .cu files only.
#pragma once

#include <cuda_runtime.h>

namespace mla::cuda {

// Sum of `v` over the block's Threads threads, returned to every thread. Every thread of the
// block must call it, and at most once per kernel: the shared partials are not re-armed.
template <int Threads>
__device__ __forceinline__ float block_sum(float v) {
  static_assert(Threads % 32 == 0 && Threads <= 1024, "whole warps, one block");
  __shared__ float warp_sums[Threads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < Threads / 32; ++w) total += warp_sums[w];
  return total;
}

}  // namespace mla::cuda
