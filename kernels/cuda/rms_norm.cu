#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/rms_norm.h"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;

// One block per row: block-wide sum of squares, then scale.
__global__ void rms_norm_kernel(RmsNormParams p) {
  const int64_t row = blockIdx.x;
  const float* x = p.x + row * p.d;
  float* y = p.y + row * p.d;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < p.d; i += blockDim.x) sum += x[i] * x[i];
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
  __shared__ float warp_sums[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    sum = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
    if (threadIdx.x == 0) warp_sums[0] = sum;
  }
  __syncthreads();
  const float inv = rsqrtf(warp_sums[0] / static_cast<float>(p.d) + p.eps);
  for (int64_t i = threadIdx.x; i < p.d; i += blockDim.x) y[i] = p.w[i] * (x[i] * inv);
}

}  // namespace

void rms_norm_f32(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  rms_norm_kernel<<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  MLA_CUDA_CHECK(cudaGetLastError());
}

int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // namespace mla::cuda
