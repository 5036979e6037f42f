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
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  for (int i = 0; i < r.count; ++i) {
    for (size_t at = size_t{threadIdx.x} * kPiece; at < r.bytes[i]; at += kThreads * kPiece) {
      const size_t n = r.bytes[i] - at < kPiece ? r.bytes[i] - at : kPiece;
      asm volatile(
          "cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;\n" ::"l"(r.ptr[i] + at),
          "r"(static_cast<uint32_t>(n)), "l"(policy)
          : "memory");
    }
  }
  wait_for_prerequisite();  // the chain: the kernel after this one waits on the one before
}

}  // namespace

void l2_prefetch(const L2PrefetchRange* ranges, size_t count, cudaStream_t stream) {
  // Check shapes
  MLA_REQUIRE(count <= kL2PrefetchMaxRanges, "l2_prefetch takes at most {} ranges, got {}",
              kL2PrefetchMaxRanges, count);
  Ranges r{};
  size_t total = 0;
  for (size_t i = 0; i < count; ++i) {
    const L2PrefetchRange& range = ranges[i];
    // Check layout
    MLA_REQUIRE(is_aligned(range.ptr, 16) && range.bytes % 16 == 0,
                "l2_prefetch: ranges must start on and span whole 16-byte units ({} bytes at {})",
                range.bytes, range.ptr);
    if (range.bytes == 0) continue;
    r.ptr[r.count] = static_cast<const char*>(range.ptr);
    r.bytes[r.count] = range.bytes;
    ++r.count;
    total += range.bytes;
  }
  if (total == 0) return;
  launch_dependent(l2_prefetch_kernel, 1, kThreads, 0, stream, true, r);
}

}  // namespace mla::cuda
