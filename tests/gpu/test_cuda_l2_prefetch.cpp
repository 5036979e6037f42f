// cuda::l2_prefetch: a hint that writes nothing; its plan tiles the ranges exactly. Ranges of a
// partial piece, several pieces and a tail of 16-byte units, and one of more pieces than the grid
// has threads; on a stream, and in a graph on a stream forked from one whose kernel writes the
// memory prefetched (as a decode step uses it): the bytes read afterwards are the written ones; bad
// ranges are refused.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/l2_prefetch.h"
#include "kernels/cuda/silu_mul.h"
#include "kernels/error.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

TEST(CudaL2Prefetch, ChangesNoByteOnAStreamOrForkedInAGraph) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(77);
  // Budget far above the ranges: the largest one (72 MiB + 32 bytes) has more 16 KiB pieces
  // than the grid's threads, so threads loop.
  const size_t budget = size_t{1} << 30;
  cudaStream_t stream, side;
  cudaEvent_t fork, join;
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  MLA_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  MLA_CUDA_CHECK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
  // In floats: 64 bytes, 3 pieces and 16 bytes more, 9 MiB + 32 bytes, 72 MiB + 32 bytes.
  for (size_t floats :
       {size_t{16}, size_t{3 * 4096 + 4}, size_t{9 * 262144 + 8}, size_t{72 * 262144 + 8}}) {
    const std::vector<float> host = test::random_normal(floats, rng);
    DeviceArray<float> a(host), b(host);
    const cuda::L2PrefetchRange ranges[] = {{a.get(), floats * 4}, {b.get(), floats * 4}};
    cuda::l2_prefetch(ranges, 2, budget, stream);
    MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
    EXPECT_EQ(a.download(), host) << floats << " floats";
    EXPECT_EQ(b.download(), host) << floats << " floats";
    // In a graph: silu_mul writes `with` on the captured stream, which forks to `side` to
    // prefetch it and joins it back; read afterwards, the same bits as without a prefetch.
    const int64_t width = static_cast<int64_t>(floats) / 2 / 8 * 8;
    DeviceArray<float> gate_up(test::random_normal(2 * width, rng));
    DeviceArray<__nv_bfloat16> with(width), without(width);
    const cuda::L2PrefetchRange written{with.get(), static_cast<size_t>(width) * 2};
    test::run_in_graph_on(stream, [&] {
      cuda::silu_mul_bf16({gate_up.get(), with.get(), 1, width}, stream);
      MLA_CUDA_CHECK(cudaEventRecord(fork, stream));
      MLA_CUDA_CHECK(cudaStreamWaitEvent(side, fork));
      cuda::l2_prefetch(&written, 1, budget, side);
      MLA_CUDA_CHECK(cudaEventRecord(join, side));
      MLA_CUDA_CHECK(cudaStreamWaitEvent(stream, join));
    });
    cuda::silu_mul_bf16({gate_up.get(), without.get(), 1, width}, stream);
    MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<__nv_bfloat16> got = with.download(), want = without.download();
    ASSERT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * 2)) << floats << " floats";
  }
  MLA_CUDA_CHECK(cudaEventDestroy(fork));
  MLA_CUDA_CHECK(cudaEventDestroy(join));
  MLA_CUDA_CHECK(cudaStreamDestroy(side));
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));
}

// The plan alone (no device needed): its pieces tile each kept range, rounded down to 16-byte
// units, in order and without overlap, at most kL2PrefetchPiece each; empty ranges are dropped;
// the budget (rounded down likewise) cuts the range it ends in and drops the rest.
TEST(CudaL2Prefetch, PlanTilesTheRangesUpToTheBudget) {
  auto at = [](uintptr_t address) { return reinterpret_cast<const void*>(address); };
  constexpr size_t kPiece = cuda::kL2PrefetchPiece;
  // A partial piece, a ragged tail (rounded down to 3 * kPiece + 16), an empty range, many
  // pieces.
  const std::vector<cuda::L2PrefetchRange> ranges = {{at(0x10000), 48},
                                                     {at(0x800000), 3 * kPiece + 20},
                                                     {at(0x900000), 8},
                                                     {at(0x1000000), 40 * kPiece}};
  const size_t whole = 48 + 3 * kPiece + 16 + 40 * kPiece;
  for (size_t budget : {whole + 100, whole, size_t{40}, 48 + kPiece + 7, size_t{0}}) {
    const cuda::L2PrefetchPlan plan = cuda::l2_prefetch_plan(ranges.data(), ranges.size(), budget);
    // Expected: each range's bytes in order, cut by the budget.
    std::vector<std::pair<uintptr_t, size_t>> want;
    size_t left = budget / 16 * 16;
    for (const auto& r : ranges) {
      const size_t bytes = std::min(r.bytes / 16 * 16, left);
      if (bytes > 0) want.emplace_back(reinterpret_cast<uintptr_t>(r.ptr), bytes);
      left -= bytes;
    }
    ASSERT_EQ(plan.count, static_cast<int>(want.size())) << "budget " << budget;
    size_t p = 0;
    for (const auto& [start, bytes] : want) {
      uintptr_t next = start;
      for (; next < start + bytes; ++p) {
        ASSERT_LT(p, plan.pieces()) << "budget " << budget;
        const char* piece = nullptr;
        size_t n = 0;
        plan.piece(p, &piece, &n);
        EXPECT_EQ(reinterpret_cast<uintptr_t>(piece), next)
            << "budget " << budget << " piece " << p;
        EXPECT_TRUE(n > 0 && n <= kPiece && n % 16 == 0) << n;
        next += n;
      }
      EXPECT_EQ(next, start + bytes) << "budget " << budget;
    }
    EXPECT_EQ(p, plan.pieces()) << "budget " << budget;
  }
}

TEST(CudaL2Prefetch, RefusesMisalignedOrTooManyRanges) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto budget = static_cast<size_t>(cuda::l2_cache_bytes());
  EXPECT_GE(budget, size_t{1} << 20);
  DeviceArray<float> a(64);
  const cuda::L2PrefetchRange odd_start{reinterpret_cast<const char*>(a.get()) + 4, 16};
  EXPECT_THROW(cuda::l2_prefetch(&odd_start, 1, budget, nullptr), Error);
  const std::vector<cuda::L2PrefetchRange> five(cuda::kL2PrefetchMaxRanges + 1, {a.get(), 16});
  EXPECT_THROW(cuda::l2_prefetch(five.data(), five.size(), budget, nullptr), Error);
  const cuda::L2PrefetchRange empty{a.get(), 0}, ragged{a.get(), 20};
  cuda::l2_prefetch(&empty, 1, budget, nullptr);   // nothing to do
  cuda::l2_prefetch(&ragged, 1, budget, nullptr);  // the first 16 bytes
  MLA_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace mla
