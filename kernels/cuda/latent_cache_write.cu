#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/latent_cache_write.h"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // the grid-stride loop covers the rest

// Vec floats per thread per step; Vec = 4 moves 16 bytes per load and store.
template <int Vec>
__global__ void latent_cache_write_kernel(LatentCacheWriteParams p) {
  const int64_t vecs_per_row = p.width / Vec;
  const int64_t total = p.T * vecs_per_row;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < total;
       k += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = k / vecs_per_row;
    const int64_t i = (k - t * vecs_per_row) * Vec;
    const int64_t slot =
        (int64_t{p.slot_pages[t]} * p.num_layers + p.layer) * p.block_size + p.slot_offsets[t];
    const float* src = p.rows + t * p.width + i;
    float* dst = p.pool + slot * p.width + i;
    if constexpr (Vec == 4) {
      *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(src);
    } else {
      dst[0] = src[0];
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void latent_cache_write_f32(const LatentCacheWriteParams& p, cudaStream_t stream) {
  if (p.T == 0 || p.width == 0) return;
  const bool vec4 = p.width % 4 == 0 && aligned16(p.rows) && aligned16(p.pool);
  const int64_t work = p.T * (vec4 ? p.width / 4 : p.width);
  const auto blocks = static_cast<unsigned>(std::min((work + kThreads - 1) / kThreads, kMaxBlocks));
  if (vec4) {
    latent_cache_write_kernel<4><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    latent_cache_write_kernel<1><<<blocks, kThreads, 0, stream>>>(p);
  }
  MLA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mla::cuda
