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

// One warp per token. Throws kInvalidArgument naming a bad field.
void moe_gate(const MoeGateParams& p, cudaStream_t stream);

// The router's product and the gate in one launch, for decode's few tokens: the fp32 logits
// x . weight^T, then moe_gate's selection on them (same ids and weights as moe_gate given these
// logits). The logits are summed as the small-row products sum (kernels/cuda/row_dots.cuh), so
// they may round unlike cuBLAS's; the decode step spends one launch on the router instead of
// two. Launched as a programmatic dependent: the weight streams in before x is ready.
inline constexpr int64_t kMoeRouteMaxTokens = 8;

struct MoeRouteParams {
  const float* x;       // [tokens, d] the FFN input in fp32
  const float* weight;  // [experts, d] the router's weight (constant)
  int64_t d;            // a multiple of 4
  float* logits;        // [tokens, experts] written (gate.logits is ignored)
  int32_t* counter;     // [1] zero before the launch, zero again after it (graph replays too)
  MoeGateParams gate;   // tokens <= kMoeRouteMaxTokens
};

// x and weight 16-byte aligned. Throws kInvalidArgument naming a bad field; launches nothing
// for 0 tokens. Launches that may run at the same time (other streams, graphs replayed
// concurrently) must not share a counter; on one stream each waits for the one before.
void moe_route(const MoeRouteParams& p, cudaStream_t stream);

}  // namespace mla::cuda
