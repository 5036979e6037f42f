#include "kernels/cpu/moe.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/error.h"

namespace mla::cpu {

void moe_route(const MoeRouteParams& p) {
  const int64_t E = p.experts, K = p.top_k;
  const bool grouped = p.gate != MoeGate::kSoftmaxGreedy;
  MLA_REQUIRE(E >= 1 && 1 <= K && K <= E, "top_k must be in [1, {}], got {}", E, K);
  if (grouped) {
    MLA_REQUIRE(p.n_group >= 1 && E % p.n_group == 0, "{} experts do not split into {} groups", E,
                p.n_group);
    MLA_REQUIRE(1 <= p.topk_group && p.topk_group <= p.n_group,
                "topk_group must be in [1, {}], got {}", p.n_group, p.topk_group);
  }
  if (p.gate == MoeGate::kSigmoidNoauxTc) {
    MLA_REQUIRE(p.bias != nullptr, "noaux_tc routing needs the correction bias");
    MLA_REQUIRE(E / p.n_group >= 2, "noaux_tc groups need two experts or more, got {}",
                E / p.n_group);
  }
  const int64_t group_size = grouped ? E / p.n_group : E;
  std::vector<float> scores(E), choice(E), group_score(grouped ? p.n_group : 0);
  std::vector<int64_t> order(E), group_order(group_score.size());
  const float kMasked =
      p.gate == MoeGate::kSigmoidNoauxTc ? -std::numeric_limits<float>::infinity() : 0.0f;
  for (int64_t t = 0; t < p.tokens; ++t) {
    const float* lg = p.logits + t * E;
    if (p.gate == MoeGate::kSigmoidNoauxTc) {
      for (int64_t e = 0; e < E; ++e) {
        scores[e] = 1.0f / (1.0f + std::exp(-lg[e]));
        choice[e] = scores[e] + p.bias[e];
      }
    } else {
      std::copy(lg, lg + E, scores.begin());
      softmax_inplace(scores.data(), E);
      choice = scores;
    }
    if (grouped) {
      for (int64_t g = 0; g < p.n_group; ++g) {
        const float* gs = &choice[g * group_size];
        if (p.gate == MoeGate::kSigmoidNoauxTc) {
          std::vector<float> top(gs, gs + group_size);
          std::partial_sort(top.begin(), top.begin() + 2, top.end(), std::greater<>());
          group_score[g] = top[0] + top[1];
        } else {
          group_score[g] = *std::max_element(gs, gs + group_size);
        }
      }
      std::iota(group_order.begin(), group_order.end(), 0);
      std::partial_sort(group_order.begin(), group_order.begin() + p.topk_group, group_order.end(),
                        [&](int64_t a, int64_t b) { return group_score[a] > group_score[b]; });
      std::vector<bool> keep(p.n_group, false);
      for (int64_t g = 0; g < p.topk_group; ++g) keep[group_order[g]] = true;
      for (int64_t e = 0; e < E; ++e) {
        if (!keep[e / group_size]) choice[e] = kMasked;
      }
    }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [&](int64_t a, int64_t b) { return choice[a] > choice[b]; });
    float denom = 0.0f;
    for (int64_t k = 0; k < K; ++k) denom += scores[order[k]];
    for (int64_t k = 0; k < K; ++k) {
      float weight = scores[order[k]];
      if (p.renormalize) weight /= denom + 1e-20f;
      p.ids[t * K + k] = static_cast<int32_t>(order[k]);
      p.weights[t * K + k] = weight * p.scaling;
    }
  }
}

}  // namespace mla::cpu
