// Stores new tokens' latent rows into the paged latent cache on the GPU: the device side of
// writing through mla::LatentCache::row(). Pool addressing matches LatentCache::page_block():
// storage [num_pages, num_layers, block_size, width]. Launchers take a stream and never
// synchronise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct LatentCacheWriteParams {
  const float* rows;            // [T, width]: token t's latent (c, then k_r)
  const int32_t* slot_pages;    // [T]: the page holding token t's row
  const int32_t* slot_offsets;  // [T]: the row within that page, in [0, block_size)
  float* pool;                  // [num_pages, num_layers, block_size, width]; must not alias rows
  int32_t layer, num_layers, block_size;
  int64_t width, T;
};

// Writes row t to pool + ((slot_pages[t] * num_layers + layer) * block_size +
// slot_offsets[t]) * width and touches nothing else. The T slots must be distinct (two
// tokens on one slot race). Takes the 16-byte path when width is a multiple of 4 and both
// pointers are 16-byte aligned.
void latent_cache_write_f32(const LatentCacheWriteParams& p, cudaStream_t stream);

}  // namespace mla::cuda
