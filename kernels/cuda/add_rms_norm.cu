#include <cstdint>

#include "kernels/cuda/add_rms_norm.h"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/vec_io.cuh"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;

// One block per row; Vec = 4 moves 16 bytes of fp32 per access. Thread k handles the same
// elements in both passes, so it reads back its own writes to x and needs no barrier for them.
template <int Vec>
__global__ void add_rms_norm_kernel(AddRmsNormParams p) {
  wait_for_prerequisite();  // launched as a dependent: the kernels before have finished
  allow_dependent_launch();
  const int64_t row = blockIdx.x;
  float* x = p.x + row * p.x_stride;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x * Vec; i < p.d; i += kThreads * Vec) {
    float v[Vec];
    load_floats<Vec>(x + i, v);
    if (p.delta != nullptr) {
      float dv[Vec];
      load_floats<Vec>(p.delta + row * p.x_stride + i, dv);
#pragma unroll
      for (int k = 0; k < Vec; ++k) v[k] += dv[k];
      store_floats<Vec>(x + i, v);
    }
#pragma unroll
    for (int k = 0; k < Vec; ++k) sum += v[k] * v[k];
  }
  const float inv = rsqrtf(block_sum<kThreads>(sum) / static_cast<float>(p.d) + p.eps);
  for (int64_t i = threadIdx.x * Vec; i < p.d; i += kThreads * Vec) {
    float v[Vec], w[Vec];
    load_floats<Vec>(x + i, v);
    load_floats<Vec>(p.w + i, w);
#pragma unroll
    for (int k = 0; k < Vec; ++k) v[k] = w[k] * (v[k] * inv);  // same expression as the CPU
    store_floats<Vec>(p.y + row * p.y_stride + i, v);
    if (p.y32 != nullptr) store_floats<Vec>(p.y32 + row * p.y_stride + i, v);
  }
}

}  // namespace

void add_rms_norm(const AddRmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  // Check shapes
  MLA_CHECK(p.d > 0 && p.x_stride >= p.d && p.y_stride >= p.d,
            "add_rms_norm: d {} with strides x {} y {}", p.d, p.x_stride, p.y_stride);
  MLA_CHECK(p.rows < (int64_t{1} << 31), "{} rows exceed one grid", p.rows);
  // Check layout
  const bool vec4 = p.d % 4 == 0 && p.x_stride % 4 == 0 && p.y_stride % 4 == 0 &&
                    is_aligned(p.x, 16) && is_aligned(p.delta, 16) && is_aligned(p.w, 16) &&
                    is_aligned(p.y, 8) && is_aligned(p.y32, 16);
  const auto blocks = static_cast<unsigned>(p.rows);
  if (vec4) {
    launch_dependent(add_rms_norm_kernel<4>, blocks, kThreads, 0, stream, true, p);
  } else {
    launch_dependent(add_rms_norm_kernel<1>, blocks, kThreads, 0, stream, true, p);
  }
}

}  // namespace mla::cuda
