// MoE routing, the CPU reference (the V2 softmax and V3 noaux_tc gates as transformers computes
// them): from a token's router logits, the experts it goes to and the weight of each. Defines the
// numerics the CUDA router (kernels/cuda/moe_gate.h) is tested against. Stateless; thread-safe.
#pragma once

#include <cstdint>

namespace mla::cpu {

// How the router picks experts; mirrors mla::GateKind (runtime/model_config.h).
enum class MoeGate {
  kSoftmaxGreedy,        // V2 `greedy`: top-k of softmax(logits)
  kSoftmaxGroupLimited,  // V2 `group_limited_greedy`: groups scored by their max
  kSigmoidNoauxTc,       // V3 `noaux_tc`: sigmoid + correction bias, groups by top-2 sum
};

struct MoeRouteParams {
  const float* logits;  // [tokens, experts] router logits
  const float* bias;    // [experts] e_score_correction_bias; kSigmoidNoauxTc only, else null
  int64_t tokens, experts;
  int64_t n_group, topk_group;  // group-limited gates: experts % n_group == 0; else unused
  int64_t top_k;                // in [1, experts]
  MoeGate gate;
  bool renormalize;  // divide the top-k weights by their sum (+1e-20): norm_topk_prob on V3
  float scaling;     // routed_scaling_factor
  int32_t* ids;      // [tokens, top_k] chosen experts by descending selection score
  float* weights;    // [tokens, top_k] the unbiased score of each, renormalised, then scaled
};

// Per token: scores = softmax(logits), or sigmoid(logits) for noaux_tc; selection scores are
// the scores plus the bias (noaux_tc) or the scores themselves. Group-limited gates keep the
// topk_group groups with the best group score (max of the group, or the sum of its two best
// selection scores for noaux_tc) and mask the other groups' selection scores (to 0 for
// softmax, -inf for noaux_tc); then the top_k selection scores win. All in fp32.
void moe_route(const MoeRouteParams& p);

}  // namespace mla::cpu
