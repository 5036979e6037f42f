// Paged latent (absorbed MLA) attention on the GPU for any latent widths and page size: the
// general path behind the tuned kernels (mla_decode / mla_prefill need d_c 512, d_r 64 and
// pages of 64). The CUDA model uses it for checkpoints with other dimensions (the small
// parity models); one block per (token, head), no tensor cores. CPU reference:
// mla::cpu::latent_attention. Launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/fp8_latent.h"

namespace mla::cuda {

struct LatentAttentionParams {
  const __nv_bfloat16* q;  // [tokens, heads, d_c + d_r]: absorbed query, then rotary part
  const void* pool;        // [num_pages, num_layers, block_size, row bytes]
  LatentElement element;   // of the pool's rows (fp8: d_c a multiple of 4, d_r even)
  int32_t layer, num_layers, block_size, d_c, d_r;  // d_c + d_r <= kMaxLatentWidth
  const int32_t* block_table;  // [num_seqs, table_stride]; entries past a sequence's keys unread
  int32_t table_stride;
  const int32_t* token_seq;  // [tokens]: each query token's row of block_table
  const int32_t* num_keys;   // [tokens]: keys attended (0 gives out = 0, lse = -inf)
  int32_t tokens, heads;
  float scale;
  __nv_bfloat16* out;  // [tokens, heads, d_c]
  float* lse;          // [tokens, heads]
};

inline constexpr int kMaxLatentWidth = 1024;

void latent_attention(const LatentAttentionParams& p, cudaStream_t stream);

}  // namespace mla::cuda
