// The exchange around latent attention over a sequence-sharded cache (docs/ARCHITECTURE.md
// section 6), written once for the CPU and CUDA backends. Each rank holds every head's keys for
// its own pages only, so:
//   1. gather_queries: all-gather the absorbed queries of the H_l local heads, giving every rank
//      all H = P * H_l heads' queries;
//   2. the backend attends all H heads over its pages: partial outputs o [T, H, d_c] and their
//      log-sum-exps lse [T, H] (-inf where the rank holds no visible key);
//   3. exchange_partials: all-to-all head block r (rank r's heads) of o and lse to rank r;
//   4. the backend merges the P partials of each local head by LSE (cpu::lse_merge /
//      cuda::lse_merge): recv [P, T, H_l, d_c] and lse_recv [P, T, H_l] are exactly that op's
//      parts and lse.
// Buffers are wherever the backend computes (host or device memory) and hold elements of
// `elem` bytes (fp32 on the CPU, bf16 on the GPU; LSEs are always fp32); the collectives move
// them as floats, so every block must be a whole number of floats.
#pragma once

#include <cstdint>
#include <functional>

#include "parallel/communicator.h"

namespace mla {

// What the protocol needs from a backend: strided copies in its memory, and a collective run in
// its order (a backend whose communicator is not stream-ordered first waits for its own work;
// a profiling backend times it).
class ShardedAttentionBackend {
 public:
  virtual ~ShardedAttentionBackend() = default;
  // `rows` rows of `row_bytes` from src (rows `src_pitch` bytes apart) to dst (`dst_pitch`).
  virtual void copy_rows(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch,
                         int64_t row_bytes, int64_t rows) = 0;
  // Calls `collective` (one or more communicator calls) in the backend's order.
  virtual void collective(Communicator& comm, const std::function<void()>& collective) = 0;
};

// The shapes of one step's exchange.
struct ShardedAttentionShape {
  int64_t tokens;       // T
  int64_t local_heads;  // H_l
  int64_t elem;         // bytes of a query or output element
};

// q_local [T, H_l, d_lat] -> q_all [T, P * H_l, d_lat], through `gathered` [P, T, H_l, d_lat].
void gather_queries(Communicator& comm, ShardedAttentionBackend& backend,
                    const ShardedAttentionShape& shape, int64_t d_lat, const void* q_local,
                    void* gathered, void* q_all);

// o [T, P * H_l, d_c] and lse [T, P * H_l] -> recv [P, T, H_l, d_c] and lse_recv [P, T, H_l]
// (block r from rank r), through send [P, T, H_l, d_c] and lse_send [P, T, H_l].
void exchange_partials(Communicator& comm, ShardedAttentionBackend& backend,
                       const ShardedAttentionShape& shape, int64_t d_c, const void* o,
                       const float* lse, void* send, float* lse_send, void* recv, float* lse_recv);

}  // namespace mla
