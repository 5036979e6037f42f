// Token embedding lookup on the GPU: out[t] = table[ids[t]] as fp32 (the residual stream), from
// the bf16 table. The CPU path copies rows of the embedding table
// (DeepseekModel::forward); launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct EmbeddingBf16Params {
  const __nv_bfloat16* table;  // [vocab, d]
  const int32_t* ids;          // [tokens]; each in [0, vocab)
  float* out;                  // [tokens, d]: the table rows widened exactly to fp32
  int64_t tokens, vocab, d;
};

// Out-of-range ids: the host validates ids before launch (the model rejects ids outside the
// vocabulary), so the kernel assumes them valid. It still never reads outside the table: a
// row whose id is out of range is written as NaN, so a validation bug shows up loudly in the
// outputs rather than as a fault or a silently wrong row.
void embedding_bf16(const EmbeddingBf16Params& p, cudaStream_t stream);

}  // namespace mla::cuda
