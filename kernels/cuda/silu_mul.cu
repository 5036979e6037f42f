#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/silu_mul.h"
#include "kernels/cuda/vec_io.cuh"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // the grid-stride loop covers the rest

__device__ __forceinline__ float silu_times(float g, float u) {
  return g / (1.0f + expf(-g)) * u;  // same expression as the CPU reference
}

// Vec elements per thread per step.
template <int Vec, typename Params>
__global__ void silu_mul_kernel(Params p) {
  wait_for_prerequisite();  // launched as a dependent: the kernels before have finished
  allow_dependent_launch();
  const int64_t vecs_per_row = p.width / Vec;
  const int64_t total = p.rows * vecs_per_row;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < total;
       k += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = k / vecs_per_row;
    const int64_t i = (k - r * vecs_per_row) * Vec;
    const auto* g = p.gate_up + r * 2 * p.width + i;
    float gv[Vec], uv[Vec];
    load_floats<Vec>(g, gv);
    load_floats<Vec>(g + p.width, uv);
#pragma unroll
    for (int v = 0; v < Vec; ++v) gv[v] = silu_times(gv[v], uv[v]);
    store_floats<Vec>(p.out + r * p.width + i, gv);
  }
}

template <typename Params>
void launch(const Params& p, cudaStream_t stream) {
  if (p.rows == 0 || p.width == 0) return;
  constexpr int kVec = 16 / sizeof(*p.gate_up);
  const bool vec =
      p.width % kVec == 0 && is_aligned(p.gate_up, 16) && is_aligned(p.out, kVec * sizeof(*p.out));
  const int64_t work = p.rows * (vec ? p.width / kVec : p.width);
  const auto blocks = static_cast<unsigned>(std::min((work + kThreads - 1) / kThreads, kMaxBlocks));
  if (vec) {
    launch_dependent(silu_mul_kernel<kVec, Params>, blocks, kThreads, 0, stream, true, p);
  } else {
    launch_dependent(silu_mul_kernel<1, Params>, blocks, kThreads, 0, stream, true, p);
  }
}

}  // namespace

void silu_mul_bf16(const SiluMulBf16Params& p, cudaStream_t stream) { launch(p, stream); }

}  // namespace mla::cuda
