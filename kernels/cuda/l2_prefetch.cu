#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/l2_prefetch.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/vec_io.cuh"
#include "kernels/error.h"

namespace mla::cuda {
namespace {

constexpr int kThreads = 128;
// One bulk prefetch instruction covers this many bytes (a multiple of 16).
constexpr size_t kPiece = size_t{64} * 1024;

struct Ranges {
  const char* ptr[kL2PrefetchMaxRanges];
  size_t bytes[kL2PrefetchMaxRanges];
  int count;
};

__global__ void __launch_bounds__(kThreads) l2_prefetch_kernel(Ranges r) {
  allow_dependent_launch();  // nothing here is anyone's input
#pragma unroll
  for (int i = 0; i < static_cast<int>(kL2PrefetchMaxRanges); ++i) {
    if (i >= r.count) break;
    for (size_t at = size_t{threadIdx.x} * kPiece; at < r.bytes[i]; at += kThreads * kPiece) {
      const size_t n = r.bytes[i] - at < kPiece ? r.bytes[i] - at : kPiece;
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(
                       __cvta_generic_to_global(r.ptr[i] + at)),
                   "r"(static_cast<uint32_t>(n))
                   : "memory");
    }
  }
  wait_for_prerequisite();  // the chain: the kernel after this one waits on the one before
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
  size_t left = budget;
  Ranges r{};
  for (size_t i = 0; i < count && left >= 16; ++i) {
    const size_t bytes = std::min(ranges[i].bytes / 16 * 16, left / 16 * 16);
    if (bytes == 0) continue;
    r.ptr[r.count] = static_cast<const char*>(ranges[i].ptr);
    r.bytes[r.count] = bytes;
    ++r.count;
    left -= bytes;
  }
  if (r.count == 0) return;
  launch_dependent(l2_prefetch_kernel, 1, kThreads, 0, stream, true, r);
}

}  // namespace mla::cuda
