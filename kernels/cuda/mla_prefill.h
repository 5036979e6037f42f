// Latent-form (absorbed) MLA attention for prefill chunks on the GPU: any number of query
// tokens per sequence, attending the paged latent cache directly. The CPU reference is
// mla::cpu::latent_attention (d_c = 512, d_r = 64, block size 64). The pool rows are bf16 or
// packed fp8 (kernels/cuda/fp8_latent.h; a page is staged as it is and dequantised in shared
// memory). Launchers take a stream, never synchronise and never allocate; everything is
// CUDA-graph capturable.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/fp8_latent.h"

namespace mla::cuda {

struct MlaPrefillParams {
  const __nv_bfloat16* q;  // [tokens, heads, 576]: absorbed query (512) then rotary (64)
  // [num_pages, num_layers, 64, row bytes]: latent c (512) then k_r (64), as bf16 or fp8 rows
  const void* pool;
  LatentElement element;
  int32_t layer, num_layers;
  // [num_seqs, table_stride]: page ids in key order; entries past a sequence's pages may be
  // garbage (they are never read).
  const int32_t* block_table;
  int32_t table_stride;
  const int32_t* token_seq;  // [tokens]: the row of block_table each query token reads
  // [tokens]: token t attends the first num_keys[t] keys of its sequence (0 gives out = 0 and
  // lse = -inf); keys below a sequence's largest num_keys must be finite.
  const int32_t* num_keys;
  int32_t tokens, heads;  // heads >= 1
  float scale;
  __nv_bfloat16* out;  // [tokens, heads, 512]
  float* lse;          // [tokens, heads]: natural log of sum_j exp(scale * q . row_j)
  // Never split a row's keys among CTAs (the model's deterministic option): a row then sums its
  // keys from the first in one pass whatever else the batch holds; a short batch leaves SMs idle.
  bool single_split = false;
};

// Bytes of workspace mla_prefill needs for `tokens` x `heads` on the current device: 0 when
// the batch fills the GPU, else room for split-KV partials (fp32). Never more than
// 2 * SMs * 64 * 2052 bytes (35 MB on an H100), and not monotonic in tokens: size it per call.
size_t mla_prefill_workspace_size(int32_t tokens, int32_t heads);

// out[t, h] = sum_j softmax(s)_j row_j[0:512], s_j = scale * q[t, h] . row_j (all 576 values),
// over the first num_keys[t] keys of sequence token_seq[t]. Tokens of one sequence must be
// contiguous in the batch (nothing else is assumed about their order or num_keys).
// `workspace` holds mla_prefill_workspace_size(tokens, heads) bytes, 16-byte aligned (may be
// null when that is 0). q, pool and out must be 16-byte aligned. Deterministic: the same
// inputs give bit-identical outputs on GPUs with the same SM count (which sets the split); with
// single_split a row's output depends on its own query and keys alone.
void mla_prefill(const MlaPrefillParams& p, void* workspace, cudaStream_t stream);

}  // namespace mla::cuda
