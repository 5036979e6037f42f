// MoE routing on the GPU: from the gate GEMM's fp32 logits, each token's top-k experts and
// their weights. Same semantics, same numerics (fp32, same operation order) and same output
// order as the CPU reference mla::cpu::moe_route; where selection scores tie, the lower expert
// (or group) id wins. Launchers take a stream and never synchronise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cpu/moe.h"

namespace mla::cuda {

inline constexpr int64_t kMoeGateMaxExperts = 256;
inline constexpr int64_t kMoeGateMaxGroups = 32;

struct MoeGateParams {
  const float* logits;      // [tokens, experts] router logits
  const float* bias;        // [experts] e_score_correction_bias; kSigmoidNoauxTc only, else null
  int64_t tokens, experts;  // experts in [1, kMoeGateMaxExperts]
  int64_t n_group, topk_group;  // group-limited gates: n_group <= kMoeGateMaxGroups
  int64_t top_k;                // in [1, experts]; group-limited: <= topk_group * group size
  cpu::MoeGate gate;
  bool renormalize;  // divide the top-k weights by their sum (+1e-20): norm_topk_prob on V3
  float scaling;     // routed_scaling_factor
  int32_t* ids;      // [tokens, top_k] chosen experts by descending selection score
  float* weights;    // [tokens, top_k]
};

// One warp per token.
void moe_gate(const MoeGateParams& p, cudaStream_t stream);

}  // namespace mla::cuda
