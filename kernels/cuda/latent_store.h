// Builds this step's latent rows and stores them into the paged latent cache on the GPU:
// for token t, row = [rms_norm(c) * w ; rope(k_r)] with (c, k_r) = kv[t] (the kv_a GEMM
// output), as DeepseekModel::attention() builds it on the CPU (cpu::rms_norm, then
// cpu::rope_table + cpu::rope_rotate), computed in fp32 and then rounded once to bf16, or
// quantised into the packed fp8 row as cpu::quantize_latent_fp8 does (kernels/cuda/fp8_latent.h).
// Pool addressing matches LatentCache's: [num_pages, num_layers, block_size, row bytes].
// Launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/fp8_latent.h"

namespace mla::cuda {

struct LatentStoreParams {
  const float* kv;              // [T, kv_stride]: c (d_c values), then k_r (d_r values)
  int64_t kv_stride;            // floats between tokens of kv, >= d_c + d_r
  const float* norm_w;          // [d_c]: kv_a_layernorm
  float eps;                    // kv_a_layernorm's epsilon (1e-6 in transformers)
  const int32_t* positions;     // [T]: absolute positions, for the rotation
  const float* inv_freq;        // [d_r / 2]
  float attention_factor;       // scales cos and sin (YaRN's mscale)
  bool interleave;              // rope_interleave, as in RopeBf16Params
  const int32_t* slot_pages;    // [T]: the page holding token t's row, or -1: another rank
                                // stores it (sharded cache), skip
  const int32_t* slot_offsets;  // [T]: the row within that page, in [0, block_size)
  void* pool;                   // [num_pages, num_layers, block_size, row bytes]
  LatentElement element;        // of the pool's rows
  int32_t layer, num_layers, block_size;
  int32_t d_c, d_r;  // d_r even, d_r <= cpu::kMaxRopeDim; fp8: d_c a multiple of 4
  int64_t T;
};

// One block per token. Writes only the d_c + d_r values of each stored token's slot; the
// stored slots must be distinct (two tokens on one slot race).
void latent_store(const LatentStoreParams& p, cudaStream_t stream);

}  // namespace mla::cuda
