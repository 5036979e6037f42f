#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gather_latent.h"
#include "kernels/cuda/vec_io.cuh"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 65536;  // the grid-stride loop covers the rest

// One warp per output row: the warp finds the row's sequence by binary search over cu_keys
// (every lane the same addresses, so one broadcast load per step), then copies Vec elements
// per lane per step.
template <int Vec>
__global__ void gather_latent_kernel(GatherLatentParams p) {
  using Chunk = Packed<__nv_bfloat16, Vec>;
  const int64_t keys = p.cu_keys[p.num_seqs];
  const int64_t rows = keys < p.total_keys ? keys : p.total_keys;
  const int lane = threadIdx.x % 32;
  for (int64_t k = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32; k < rows;
       k += int64_t{gridDim.x} * kWarps) {
    int lo = 0, hi = p.num_seqs;  // cu_keys[lo] <= k < cu_keys[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (p.cu_keys[mid] <= k) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const int64_t j = k - p.cu_keys[lo];
    const int64_t page = p.block_table[int64_t{lo} * p.table_stride + j / p.block_size];
    const int64_t slot = (page * p.num_layers + p.layer) * p.block_size + j % p.block_size;
    const auto* src = reinterpret_cast<const Chunk*>(p.pool + slot * p.width);
    auto* dst = reinterpret_cast<Chunk*>(p.out + k * p.width);
    for (int v = lane; v < p.width / Vec; v += 32) dst[v] = src[v];
  }
}

}  // namespace

void gather_latent(const GatherLatentParams& p, cudaStream_t stream) {
  if (p.total_keys == 0 || p.num_seqs == 0) return;
  // Check cache geometry
  MLA_CHECK(p.layer >= 0 && p.layer < p.num_layers && p.block_size > 0,
            "gather_latent: layer {} of {}, block size {}", p.layer, p.num_layers, p.block_size);
  MLA_CHECK(p.width > 0 && p.table_stride >= 0, "gather_latent: width {}, table stride {}", p.width,
            p.table_stride);
  // Check layout
  const bool vec8 = p.width % 8 == 0 && is_aligned(p.pool, 16) && is_aligned(p.out, 16);
  const auto blocks =
      static_cast<unsigned>(std::min((p.total_keys + kWarps - 1) / kWarps, kMaxBlocks));
  if (vec8) {
    gather_latent_kernel<8><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    gather_latent_kernel<1><<<blocks, kThreads, 0, stream>>>(p);
  }
  MLA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mla::cuda
