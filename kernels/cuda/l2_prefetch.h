// Weights into L2 ahead of the kernels that read them, from a second stream. At decode's few
// tokens each MoE layer spends part of its time in a chain of small kernels around the attention
// (latent store, W_UK^T, RoPE, the attention at short context, W_UV) that read little from DRAM;
// prefetching the products read after that chain (o_proj, the shared experts) on a stream beside
// it lets those bytes stream in meanwhile. A first version issued the prefetches from one block
// inside the chain and made the step 1.5-1.85x slower (one SM's bulk-copy unit moved every byte
// while the chain waited for it): this one spreads them over many blocks and never sits in the
// chain.
//
// L2 is small (50 MB on an H100 or H200): ranges are taken in order up to a budget, the rest
// dropped, so list them in the order they are read. Prefetched lines carry the normal eviction
// priority, above that of the weights the products stream (loaded evict-first).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace mla::cuda {

struct L2PrefetchRange {
  const void* ptr;  // 16-byte aligned
  size_t bytes;     // rounded down to whole 16-byte units
};

inline constexpr size_t kL2PrefetchMaxRanges = 4;
// Bytes one bulk prefetch instruction covers (a multiple of 16).
inline constexpr size_t kL2PrefetchPiece = size_t{16} * 1024;

// What a launch prefetches: the ranges kept (in order, none empty) cut into pieces of
// kL2PrefetchPiece bytes (a range's last piece shorter), numbered across the ranges.
struct L2PrefetchPlan {
  const char* ptr[kL2PrefetchMaxRanges] = {};
  size_t bytes[kL2PrefetchMaxRanges] = {};            // multiples of 16
  size_t first_piece[kL2PrefetchMaxRanges + 1] = {};  // prefix sums of each range's pieces
  int count = 0;

  __host__ __device__ size_t pieces() const { return first_piece[count]; }
  // Piece p < pieces(): where it starts and how many bytes it covers.
  __host__ __device__ void piece(size_t p, const char** start, size_t* n) const {
    int i = 0;
    while (p >= first_piece[i + 1]) ++i;
    const size_t at = (p - first_piece[i]) * kL2PrefetchPiece;
    *start = ptr[i] + at;
    *n = bytes[i] - at < kL2PrefetchPiece ? bytes[i] - at : kL2PrefetchPiece;
  }
};

// The plan for ranges [0, count) up to `budget` bytes in all (each range and the budget rounded
// down to 16-byte units; ranges past the budget dropped, the one it ends in cut). Throws
// kInvalidArgument for more than kL2PrefetchMaxRanges ranges or a range not starting on 16
// bytes.
L2PrefetchPlan l2_prefetch_plan(const L2PrefetchRange* ranges, size_t count, size_t budget);

// Enqueues on `stream` (an ordinary launch, meant for a stream beside the step's) the prefetch
// of l2_prefetch_plan(ranges, count, budget): a grid of small blocks, each thread issuing bulk L2
// prefetches (cp.async.bulk.prefetch.L2, sm_90) of the plan's pieces. A hint: nothing is written,
// and a range a kernel in flight writes only changes where a later read is served from. Throws
// what l2_prefetch_plan throws; launches nothing for no bytes.
void l2_prefetch(const L2PrefetchRange* ranges, size_t count, size_t budget, cudaStream_t stream);

}  // namespace mla::cuda
