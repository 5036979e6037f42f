#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/l2_prefetch.h"
#include "kernels/cuda/vec_io.cuh"
#include "kernels/error.h"

namespace mla::cuda {
namespace {

// One warp a block, one bulk prefetch of up to kPiece bytes a thread and pass: the bytes spread
// over as many SMs' copy units as there are blocks.
constexpr int kThreads = 32;
constexpr size_t kPiece = size_t{16} * 1024;
// A 40 MB prefetch in 16 KiB pieces takes 77 blocks: each SM's copy unit moves about 0.5 MB.
constexpr size_t kMaxBlocks = 128;

struct Ranges {
  const char* ptr[kL2PrefetchMaxRanges];
  size_t bytes[kL2PrefetchMaxRanges];
  size_t first_piece[kL2PrefetchMaxRanges + 1];  // prefix sums of each range's pieces
  int count;
};

__global__ void __launch_bounds__(kThreads) l2_prefetch_kernel(Ranges r) {
  const size_t pieces = r.first_piece[r.count];
  for (size_t p = size_t{blockIdx.x} * kThreads + threadIdx.x; p < pieces;
       p += size_t{gridDim.x} * kThreads) {
    int i = 0;
    while (p >= r.first_piece[i + 1]) ++i;
    const size_t at = (p - r.first_piece[i]) * kPiece;
    const size_t n = r.bytes[i] - at < kPiece ? r.bytes[i] - at : kPiece;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(
                     __cvta_generic_to_global(r.ptr[i] + at)),
                 "r"(static_cast<uint32_t>(n))
                 : "memory");
  }
}

}  // namespace

void l2_prefetch(const L2PrefetchRange* ranges, size_t count, size_t budget, cudaStream_t stream) {
  // Check shapes
  MLA_REQUIRE(count <= kL2PrefetchMaxRanges, "l2_prefetch takes at most {} ranges, got {}",
              kL2PrefetchMaxRanges, count);
  // Check layout
  for (size_t i = 0; i < count; ++i) {
    MLA_REQUIRE(is_aligned(ranges[i].ptr, 16),
                "l2_prefetch: range {} must start on a 16-byte boundary ({})", i, ranges[i].ptr);
  }
  size_t left = budget / 16 * 16;
  Ranges r{};
  for (size_t i = 0; i < count && left > 0; ++i) {
    const size_t bytes = std::min(ranges[i].bytes / 16 * 16, left);
    if (bytes == 0) continue;
    r.ptr[r.count] = static_cast<const char*>(ranges[i].ptr);
    r.bytes[r.count] = bytes;
    r.first_piece[r.count + 1] = r.first_piece[r.count] + (bytes + kPiece - 1) / kPiece;
    ++r.count;
    left -= bytes;
  }
  if (r.count == 0) return;
  const size_t pieces = r.first_piece[r.count];
  const auto blocks =
      static_cast<unsigned>(std::min((pieces + kThreads - 1) / kThreads, kMaxBlocks));
  l2_prefetch_kernel<<<blocks, kThreads, 0, stream>>>(r);
  MLA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mla::cuda
