// Weights into L2 ahead of the kernels that read them. A decode step at batch 1 spends part of
// each layer in a chain of small kernels (norms, latent store, RoPE, the attention, the router)
// that leave DRAM idle; the products after them then stream their weights from DRAM. Prefetching
// a later product's weights at the layer's start moves those bytes into the idle stretch.
// On an H100 L2 is 50 MB: only what is read soon after (and fits beside what streams in
// between) is worth prefetching. The lines come in with the evict-last L2 policy, so that the
// weights the kernels stream meanwhile (loaded evict-first) do not push them out.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace mla::cuda {

struct L2PrefetchRange {
  const void* ptr;  // 16-byte aligned
  size_t bytes;     // a multiple of 16
};

inline constexpr size_t kL2PrefetchMaxRanges = 4;

// Enqueues the prefetch of ranges [0, count) as a programmatic dependent of the previous kernel:
// one small kernel that issues bulk L2 prefetches (cp.async.bulk.prefetch.L2, sm_90) first
// thing, lets the next kernel launch, and ends once the kernel before it has (so the step's
// chain of dependencies stays whole). A hint: nothing is written, and a range that is not
// constant (written by a kernel in flight) gets whatever bytes L2 holds at the time, which
// only changes where a later read is served from. Throws kInvalidArgument for more than
// kL2PrefetchMaxRanges ranges or a misaligned one; launches nothing for no bytes.
void l2_prefetch(const L2PrefetchRange* ranges, size_t count, cudaStream_t stream);

}  // namespace mla::cuda
