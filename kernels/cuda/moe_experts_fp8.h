// Routed MoE experts with fp8 weights kept as the checkpoint stores them (fp8_weights keep):
// the sum of moe_experts.h, with every expert product block-scaled as kernels/cuda/fp8_gemm.h
// multiplies (its inputs quantised per row and 128 columns to e4m3 first):
//   out[t] += sum over k with ids[t, k] local of
//             weights[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = ids[t, k]
// The CPU reference is DeepseekModel's MoE on fp8 LinearWeights (kernels/cpu/fp8_gemm.h per
// expert on its gathered tokens).
//
// Kernels, sized from (tokens, top_k, local_experts, d, inter) only (CUDA-graph capturable):
//   quantise x; dispatch (the slots grouped by expert, in row tiles of kFp8GemmRowTile);
//   gate/up: each row tile's quantised x rows against its expert's gate and up rows, SiLU(gate)
//   * up rounded to bf16 (as the bf16 path stores it); quantise those activations; down; the
//   combine of moe_experts.h. An expert's weights are read once per row tile, by weight-
//   streaming warps (fp8 e4m3 has no tensor-core path here yet), so one kernel serves decode
//   and prefill, and a row's result depends on no other row: batch-invariant at any batch.
// Launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mla::cuda {

struct MoeExpertsFp8Params {
  const __nv_bfloat16* x;      // [tokens, d] the FFN input (post-attention RMSNorm)
  const int32_t* ids;          // [tokens, top_k] global expert ids, a token's distinct (moe_gate)
  const float* weights;        // [tokens, top_k] routing weights
  const uint8_t* gate_up;      // [local_experts, 2 * inter, d] e4m3: gate rows, then up rows
  const float* gate_up_scale;  // [local_experts, 2 * inter, d / 128]
  const uint8_t* down;         // [local_experts, d, inter] e4m3
  const float* down_scale;     // [local_experts, d, inter / 128]
  float* out;                  // [tokens, d]: the routed experts' sum is added to it
  int64_t tokens, top_k;       // top_k in [1, kMoeMaxTopK]
  int64_t d, inter;            // multiples of 128
  int64_t experts;             // routed experts of the whole model
  // This rank holds experts [first_expert, first_expert + local_experts) (as moe_experts.h).
  int64_t first_expert, local_experts;
};

// Workspace for up to max_tokens tokens: moe_experts_workspace_bytes plus the quantised
// input (d + 4 d / 128 bytes a token) and activations (inter + 4 inter / 128 bytes a slot).
size_t moe_experts_fp8_workspace_bytes(int64_t max_tokens, int64_t top_k, int64_t local_experts,
                                       int64_t d, int64_t inter);

// x, gate_up, down and out must be 16-byte aligned; `workspace` 256-byte aligned, of at least
// moe_experts_fp8_workspace_bytes(tokens, ...) bytes. Throws kInvalidArgument naming the bad
// shape or pointer.
void moe_experts_fp8(const MoeExpertsFp8Params& p, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream);

}  // namespace mla::cuda
