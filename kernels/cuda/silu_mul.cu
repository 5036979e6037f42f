#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/silu_mul.h"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // the grid-stride loop covers the rest

__device__ __forceinline__ float silu_times(float g, float u) {
  return g / (1.0f + expf(-g)) * u;  // same expression as the CPU reference
}

// Vec floats per thread per step; Vec = 4 moves 16 bytes per load and store.
template <int Vec>
__global__ void silu_mul_kernel(SiluMulParams p) {
  const int64_t vecs_per_row = p.width / Vec;
  const int64_t total = p.rows * vecs_per_row;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < total;
       k += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = k / vecs_per_row;
    const int64_t i = (k - r * vecs_per_row) * Vec;
    const float* g = p.gate_up + r * 2 * p.width + i;
    float* o = p.out + r * p.width + i;
    if constexpr (Vec == 4) {
      const float4 gv = *reinterpret_cast<const float4*>(g);
      const float4 uv = *reinterpret_cast<const float4*>(g + p.width);
      *reinterpret_cast<float4*>(o) = make_float4(silu_times(gv.x, uv.x), silu_times(gv.y, uv.y),
                                                  silu_times(gv.z, uv.z), silu_times(gv.w, uv.w));
    } else {
      o[0] = silu_times(g[0], g[p.width]);
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void silu_mul_f32(const SiluMulParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.width == 0) return;
  const bool vec4 = p.width % 4 == 0 && aligned16(p.gate_up) && aligned16(p.out);
  const int64_t work = p.rows * (vec4 ? p.width / 4 : p.width);
  const auto blocks = static_cast<unsigned>(std::min((work + kThreads - 1) / kThreads, kMaxBlocks));
  if (vec4) {
    silu_mul_kernel<4><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    silu_mul_kernel<1><<<blocks, kThreads, 0, stream>>>(p);
  }
  MLA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mla::cuda
