#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/lse_merge.h"
#include "kernels/cuda/vec_io.cuh"

namespace mla::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // the grid-stride loop covers the rest

// Each thread merges Vec consecutive values of one row; it recomputes the row's weights from
// the P lse values (a few cached loads) rather than sharing them, so rows need no block.
template <int Vec>
__global__ void lse_merge_kernel(LseMergeParams p) {
  const int64_t vecs_per_row = p.d / Vec;
  const int64_t total = p.rows * vecs_per_row;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < total;
       k += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = k / vecs_per_row;
    const int64_t i = (k - row * vecs_per_row) * Vec;
    float mx = -INFINITY;
    for (int r = 0; r < p.P; ++r) mx = fmaxf(mx, p.lse[r * p.rows + row]);
    float acc[Vec] = {};
    float denom = 0.0f;
    if (mx != -INFINITY) {
      for (int r = 0; r < p.P; ++r) {
        const float weight = expf(p.lse[r * p.rows + row] - mx);
        if (weight == 0.0f) continue;
        denom += weight;
        float part[Vec];
        load_floats<Vec>(p.parts + (r * p.rows + row) * p.d + i, part);
#pragma unroll
        for (int v = 0; v < Vec; ++v) acc[v] += weight * part[v];
      }
#pragma unroll
      for (int v = 0; v < Vec; ++v) acc[v] /= denom;
    }
    store_floats<Vec>(p.out + row * p.d + i, acc);
    if (i == 0 && p.out_lse != nullptr) p.out_lse[row] = mx == -INFINITY ? mx : mx + logf(denom);
  }
}

}  // namespace

void lse_merge(const LseMergeParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.d == 0) return;
  // Check shapes
  MLA_CHECK(p.P >= 1, "lse_merge: {} parts", p.P);
  // Check layout
  const bool vec8 = p.d % 8 == 0 && is_aligned(p.parts, 16) && is_aligned(p.out, 16);
  const int64_t work = p.rows * (vec8 ? p.d / 8 : p.d);
  const auto blocks = static_cast<unsigned>(std::min((work + kThreads - 1) / kThreads, kMaxBlocks));
  if (vec8) {
    lse_merge_kernel<8><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    lse_merge_kernel<1><<<blocks, kThreads, 0, stream>>>(p);
  }
  MLA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mla::cuda
