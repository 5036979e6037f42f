// Copies sequences' cached latent rows of one layer into one contiguous buffer on the GPU, for
// the decompressed (MHA) attention form, which up-projects every cached latent with a GEMM.
// Pool addressing matches LatentCache::page_block(): [num_pages, num_layers, block_size,
// width]. Launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct GatherLatentParams {
  const __nv_bfloat16* pool;  // [num_pages, num_layers, block_size, width]
  int32_t layer, num_layers, block_size, width;
  const int32_t* block_table;  // [num_seqs, table_stride]: sequence s's pages, in key order
  int32_t table_stride;
  // [num_seqs + 1], non-decreasing, cu_keys[0] = 0: sequence s's first cu_keys[s + 1] -
  // cu_keys[s] keys go to rows [cu_keys[s], cu_keys[s + 1]) of out.
  const int32_t* cu_keys;
  int32_t num_seqs;
  int64_t total_keys;  // rows of out, >= cu_keys[num_seqs] (known on the host)
  __nv_bfloat16* out;  // [total_keys, width]; must not overlap pool
};

// Key j of sequence s is row j % block_size of page block_table[s * table_stride + j /
// block_size]. Rows of out from cu_keys[num_seqs] on are left untouched, so total_keys may be
// a host-side bound on the device-side count. Takes the 16-byte path when width is a multiple
// of 8 and pool and out are 16-byte aligned.
void gather_latent(const GatherLatentParams& p, cudaStream_t stream);

}  // namespace mla::cuda
