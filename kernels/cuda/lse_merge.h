// Merges partial attention outputs by their log-sum-exp on the GPU: the combine step of the
// sharded-cache attention, where every rank attends all heads against its own pages and each
// head's owner merges the P partials (DeepseekModel::latent_attention's merge loop):
//   out = sum_r exp(lse_r - L) parts_r,  L = log sum_r exp(lse_r)
// in fp32, rounded once to bf16. Launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mla::cuda {

struct LseMergeParams {
  const __nv_bfloat16* parts;  // [P, rows, d]: part r of row i at parts + (r * rows + i) * d
  const float* lse;            // [P, rows]: -inf for a part with no visible keys
  int32_t P;                   // >= 1
  int64_t rows, d;
  __nv_bfloat16* out;  // [rows, d]; must not overlap parts
  float* out_lse;      // [rows] or null: L
};

// A part whose weight exp(lse_r - max_r lse_r) is 0 (lse_r = -inf) is never read, so a rank
// without keys may leave garbage there. Rows where every lse is -inf give out = 0 and
// out_lse = -inf. Takes the 16-byte path when d is a multiple of 8 and parts and out are
// 16-byte aligned.
void lse_merge(const LseMergeParams& p, cudaStream_t stream);

}  // namespace mla::cuda
