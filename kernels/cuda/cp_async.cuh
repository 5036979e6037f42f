// Asynchronous 16-byte copies from global to shared memory (cp.async, sm_80 and later), as the
// tiled kernels stage their operands, and (sm_90) shared-memory barriers that complete when the
// copies of a set of threads have landed, so one warpgroup can wait for another's copies.
// Include from .cu files only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

// The shared-memory address cp.async and ldmatrix take.
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared at dst (a smem_addr). When !valid nothing is read (src only has to
// be a valid address) and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

// Closes the group of this thread's cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// mbarrier (sm_90) at `bar` (a smem_addr, 8-byte aligned) expecting `count` arrivals a phase.
// Make it visible to the other threads (__syncthreads) before any of them uses it.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Arrives on `bar` once every cp.async this thread issued so far has landed (counted as one of
// the `count` arrivals the barrier was made with).
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Waits until phase `parity` (0 or 1: the barrier's phases alternate) of `bar` has completed;
// the copies it counted are then visible to this thread.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

}  // namespace mla::cuda
