// Weights into L2 ahead of the kernels that read them. A decode step at batch 1 spends part of
// each layer in a chain of small kernels (norms, latent store, RoPE, the attention at short
// context, the router) that read little from DRAM; prefetching a later product's weights at the
// layer's start lets those bytes stream in meanwhile. L2 is small (50 MB on an H100): ranges are
// taken in order up to a budget (a share of l2_cache_bytes(), device_memory.h), the rest
// dropped, so list them in the order they are read.
// Prefetched lines carry the normal eviction priority, above that of the weights the products
// stream (loaded evict-first), and below nothing that is read again.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace mla::cuda {

struct L2PrefetchRange {
  const void* ptr;  // 16-byte aligned
  size_t bytes;     // rounded down to whole 16-byte units
};

inline constexpr size_t kL2PrefetchMaxRanges = 4;

// Enqueues the prefetch of ranges [0, count), in order, up to `budget` bytes in all, as a
// programmatic dependent of the previous kernel: one small kernel that issues bulk L2
// prefetches (cp.async.bulk.prefetch.L2, sm_90) first thing, lets the next kernel launch, and
// ends once the kernel before it has (so the step's chain of dependencies stays whole). A hint:
// nothing is written, and a range a kernel in flight writes only changes where a later read is
// served from. Throws kInvalidArgument for more than kL2PrefetchMaxRanges ranges or a range
// not starting on 16 bytes; launches nothing for no bytes.
void l2_prefetch(const L2PrefetchRange* ranges, size_t count, size_t budget, cudaStream_t stream);

}  // namespace mla::cuda
