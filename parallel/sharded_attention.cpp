#include "parallel/sharded_attention.h"

#include "kernels/error.h"

namespace mla {
namespace {

int64_t floats(int64_t bytes) {
  MLA_CHECK(bytes % static_cast<int64_t>(sizeof(float)) == 0,
            "a block of {} bytes is not a whole number of floats", bytes);
  return bytes / static_cast<int64_t>(sizeof(float));
}

}  // namespace

void gather_queries(Communicator& comm, ShardedAttentionBackend& backend,
                    const ShardedAttentionShape& shape, int64_t d_lat, const void* q_local,
                    void* gathered, void* q_all) {
  const int64_t P = comm.size(), T = shape.tokens, H_l = shape.local_heads;
  const int64_t block = H_l * d_lat * shape.elem;  // one token's local heads
  backend.collective(comm, [&] {
    comm.all_gather(static_cast<const float*>(q_local), floats(T * block),
                    static_cast<float*>(gathered));
  });
  // [P, T, H_l, d_lat] -> [T, P * H_l, d_lat]: rank r's heads are heads [r H_l, (r + 1) H_l).
  for (int64_t r = 0; r < P; ++r) {
    backend.copy_rows(static_cast<char*>(q_all) + r * block, P * block,
                      static_cast<const char*>(gathered) + r * T * block, block, block, T);
  }
}

void exchange_partials(Communicator& comm, ShardedAttentionBackend& backend,
                       const ShardedAttentionShape& shape, int64_t d_c, const void* o,
                       const float* lse, void* send, float* lse_send, void* recv, float* lse_recv) {
  const int64_t P = comm.size(), T = shape.tokens, H_l = shape.local_heads;
  const int64_t block = H_l * d_c * shape.elem, lse_block = H_l * sizeof(float);
  // [T, P * H_l, ..] -> [P, T, H_l, ..]: block r holds rank r's heads.
  for (int64_t r = 0; r < P; ++r) {
    backend.copy_rows(static_cast<char*>(send) + r * T * block, block,
                      static_cast<const char*>(o) + r * block, P * block, block, T);
    backend.copy_rows(reinterpret_cast<char*>(lse_send) + r * T * lse_block, lse_block,
                      reinterpret_cast<const char*>(lse) + r * lse_block, P * lse_block, lse_block,
                      T);
  }
  backend.collective(comm, [&] {
    comm.all_to_all(static_cast<const float*>(send), floats(T * block), static_cast<float*>(recv));
    comm.all_to_all(lse_send, T * H_l, lse_recv);
  });
}

}  // namespace mla
