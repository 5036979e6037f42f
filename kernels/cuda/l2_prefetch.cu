#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/l2_prefetch.h"
#include "kernels/cuda/vec_io.cuh"
#include "kernels/error.h"

namespace mla::cuda {
namespace {

// One warp a block, one bulk prefetch of a piece a thread and pass: the bytes spread over as
// many SMs' copy units as there are blocks.
constexpr int kThreads = 32;
// A 40 MB prefetch in 16 KiB pieces takes 77 blocks: each SM's copy unit moves about 0.5 MB.
constexpr size_t kMaxBlocks = 128;

__global__ void __launch_bounds__(kThreads) l2_prefetch_kernel(L2PrefetchPlan plan) {
  for (size_t p = size_t{blockIdx.x} * kThreads + threadIdx.x; p < plan.pieces();
       p += size_t{gridDim.x} * kThreads) {
    const char* start;
    size_t n;
    plan.piece(p, &start, &n);
    asm volatile(
        "cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(__cvta_generic_to_global(start)),
        "r"(static_cast<uint32_t>(n))
        : "memory");
  }
}

}  // namespace

L2PrefetchPlan l2_prefetch_plan(const L2PrefetchRange* ranges, size_t count, size_t budget) {
  // Check shapes
  MLA_REQUIRE(count <= kL2PrefetchMaxRanges, "l2_prefetch takes at most {} ranges, got {}",
              kL2PrefetchMaxRanges, count);
  // Check layout
  for (size_t i = 0; i < count; ++i) {
    MLA_REQUIRE(is_aligned(ranges[i].ptr, 16),
                "l2_prefetch: range {} must start on a 16-byte boundary ({})", i, ranges[i].ptr);
  }
  size_t left = budget / 16 * 16;
  L2PrefetchPlan plan;
  for (size_t i = 0; i < count && left > 0; ++i) {
    const size_t bytes = std::min(ranges[i].bytes / 16 * 16, left);
    if (bytes == 0) continue;
    plan.ptr[plan.count] = static_cast<const char*>(ranges[i].ptr);
    plan.bytes[plan.count] = bytes;
    plan.first_piece[plan.count + 1] =
        plan.first_piece[plan.count] + (bytes + kL2PrefetchPiece - 1) / kL2PrefetchPiece;
    ++plan.count;
    left -= bytes;
  }
  return plan;
}

void l2_prefetch(const L2PrefetchRange* ranges, size_t count, size_t budget, cudaStream_t stream) {
  const L2PrefetchPlan plan = l2_prefetch_plan(ranges, count, budget);
  if (plan.count == 0) return;
  const auto blocks =
      static_cast<unsigned>(std::min((plan.pieces() + kThreads - 1) / kThreads, kMaxBlocks));
  l2_prefetch_kernel<<<blocks, kThreads, 0, stream>>>(plan);
  MLA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mla::cuda
