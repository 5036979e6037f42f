// The CPU MoE router (kernels/cpu/moe.h) on hand-checkable cases, and its invariants on random
// DeepSeek-V3-shaped logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

#include "kernels/cpu/moe.h"
#include "kernels/error.h"

namespace mla {
namespace {

using cpu::MoeGate;

struct Routed {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routed route(const std::vector<float>& logits, const std::vector<float>& bias, int64_t experts,
             int64_t n_group, int64_t topk_group, int64_t top_k, MoeGate gate, bool renormalize,
             float scaling) {
  const int64_t tokens = static_cast<int64_t>(logits.size()) / experts;
  Routed r{std::vector<int32_t>(tokens * top_k, -1),
           std::vector<float>(tokens * top_k, std::nanf(""))};
  cpu::moe_route({logits.data(), bias.empty() ? nullptr : bias.data(), tokens, experts, n_group,
                  topk_group, top_k, gate, renormalize, scaling, r.ids.data(), r.weights.data()});
  return r;
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// Logits whose softmax is `probs` (to fp32 rounding).
std::vector<float> log_of(const std::vector<float>& probs) {
  std::vector<float> logits;
  for (float p : probs) logits.push_back(std::log(p));
  return logits;
}

TEST(CpuMoeRoute, SoftmaxGreedyTakesTheLargestProbabilities) {
  const std::vector<float> logits = log_of({0.1f, 0.2f, 0.3f, 0.4f});
  Routed r = route(logits, {}, 4, 1, 1, 2, MoeGate::kSoftmaxGreedy, false, 1.5f);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{3, 2}));
  EXPECT_NEAR(r.weights[0], 0.4f * 1.5f, 1e-6);
  EXPECT_NEAR(r.weights[1], 0.3f * 1.5f, 1e-6);

  r = route(logits, {}, 4, 1, 1, 2, MoeGate::kSoftmaxGreedy, true, 1.5f);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{3, 2}));
  EXPECT_NEAR(r.weights[0], 0.4f / 0.7f * 1.5f, 1e-6);
  EXPECT_NEAR(r.weights[1], 0.3f / 0.7f * 1.5f, 1e-6);
}

TEST(CpuMoeRoute, SoftmaxGroupLimitedMasksTheLosingGroups) {
  // Four groups of two. Group maxima: 0.30, 0.25, 0.05, 0.06.
  const std::vector<float> logits =
      log_of({0.30f, 0.01f, 0.25f, 0.24f, 0.05f, 0.05f, 0.06f, 0.04f});
  // Greedy takes experts 0 and 2.
  Routed r = route(logits, {}, 8, 4, 1, 2, MoeGate::kSoftmaxGreedy, false, 1.0f);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 2}));
  // Keeping only the best group forces its weak expert 1 in ahead of expert 2.
  r = route(logits, {}, 8, 4, 1, 2, MoeGate::kSoftmaxGroupLimited, false, 1.0f);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1}));
  EXPECT_NEAR(r.weights[0], 0.30f, 1e-6);
  EXPECT_NEAR(r.weights[1], 0.01f, 1e-6);  // unrenormalised softmax mass, as in transformers
  // Two groups kept: the best three come from groups 0 and 1; group 3's 0.06 is out.
  r = route(logits, {}, 8, 4, 2, 4, MoeGate::kSoftmaxGroupLimited, false, 2.0f);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 2, 3, 1}));
  EXPECT_NEAR(r.weights[3], 0.02f, 1e-6);
}

TEST(CpuMoeRoute, NoauxTcBiasSteersSelectionButNotWeights) {
  const std::vector<float> logits = {0.4f, -0.2f, 0.1f, -0.3f};
  std::vector<float> s;
  for (float x : logits) s.push_back(sigmoid(x));
  // Unbiased, group 0 (experts 0, 1) has the larger top-2 sum (1.049 against 0.951). The bias
  // moves the selection scores to 0.9, 0.1 | 0.65, 0.55: group 0 still holds the single best
  // expert, but group 1's top-2 sum (1.2 against 1.0) wins.
  const std::vector<float> choice = {0.9f, 0.1f, 0.65f, 0.55f};
  std::vector<float> bias;
  for (size_t e = 0; e < s.size(); ++e) bias.push_back(choice[e] - s[e]);

  Routed r = route(logits, bias, 4, 2, 1, 2, MoeGate::kSigmoidNoauxTc, true, 2.5f);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{2, 3}));
  EXPECT_NEAR(r.weights[0], s[2] / (s[2] + s[3]) * 2.5f, 1e-6);
  EXPECT_NEAR(r.weights[1], s[3] / (s[2] + s[3]) * 2.5f, 1e-6);

  // Without renormalisation the weights are the raw sigmoid scores, scaled.
  r = route(logits, bias, 4, 2, 1, 2, MoeGate::kSigmoidNoauxTc, false, 2.5f);
  EXPECT_NEAR(r.weights[0], s[2] * 2.5f, 1e-6);
  EXPECT_NEAR(r.weights[1], s[3] * 2.5f, 1e-6);

  // A zero bias restores group 0.
  r = route(logits, std::vector<float>(4, 0.0f), 4, 2, 1, 2, MoeGate::kSigmoidNoauxTc, true, 1.0f);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1}));
}

TEST(CpuMoeRoute, RandomV3LogitsKeepTheInvariants) {
  const int64_t E = 256, n_group = 8, topk_group = 4, K = 8, tokens = 64, group_size = E / n_group;
  const float scaling = 2.5f;
  std::mt19937 rng(97531);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> logits(tokens * E), bias(E);
  for (auto& v : logits) v = normal(rng);
  for (auto& v : bias) v = 0.1f * normal(rng);
  const Routed r =
      route(logits, bias, E, n_group, topk_group, K, MoeGate::kSigmoidNoauxTc, true, scaling);

  for (int64_t t = 0; t < tokens; ++t) {
    const float* lg = &logits[t * E];
    std::vector<float> choice(E);
    for (int64_t e = 0; e < E; ++e) choice[e] = sigmoid(lg[e]) + bias[e];
    // Groups by the sum of their two best selection scores.
    std::vector<std::pair<float, int64_t>> groups;
    for (int64_t g = 0; g < n_group; ++g) {
      std::vector<float> v(choice.begin() + g * group_size, choice.begin() + (g + 1) * group_size);
      std::sort(v.rbegin(), v.rend());
      groups.push_back({v[0] + v[1], g});
    }
    std::sort(groups.rbegin(), groups.rend());
    std::set<int64_t> kept;
    for (int64_t g = 0; g < topk_group; ++g) kept.insert(groups[g].second);
    // The top K of the kept groups' experts, best first.
    std::vector<std::pair<float, int64_t>> candidates;
    for (int64_t e = 0; e < E; ++e) {
      if (kept.count(e / group_size)) candidates.push_back({choice[e], e});
    }
    std::sort(candidates.rbegin(), candidates.rend());
    double weight_sum = 0, score_sum = 0;
    for (int64_t k = 0; k < K; ++k) score_sum += sigmoid(lg[candidates[k].second]);
    for (int64_t k = 0; k < K; ++k) {
      const int32_t id = r.ids[t * K + k];
      ASSERT_EQ(id, candidates[k].second) << "token " << t << " slot " << k;
      EXPECT_NEAR(r.weights[t * K + k], sigmoid(lg[id]) / score_sum * scaling, 1e-6);
      weight_sum += r.weights[t * K + k];
    }
    EXPECT_NEAR(weight_sum, scaling, 1e-5);
  }
}

TEST(CpuMoeRoute, RejectsBadShapes) {
  const std::vector<float> logits(12, 0.0f), bias(12, 0.0f);
  EXPECT_THROW(route(logits, {}, 12, 1, 1, 13, MoeGate::kSoftmaxGreedy, false, 1.0f), Error);
  EXPECT_THROW(route(logits, {}, 12, 5, 1, 2, MoeGate::kSoftmaxGroupLimited, false, 1.0f), Error);
  EXPECT_THROW(route(logits, {}, 12, 4, 5, 2, MoeGate::kSoftmaxGroupLimited, false, 1.0f), Error);
  EXPECT_THROW(route(logits, {}, 12, 4, 2, 2, MoeGate::kSigmoidNoauxTc, true, 1.0f), Error);
  EXPECT_THROW(route(logits, bias, 12, 12, 2, 2, MoeGate::kSigmoidNoauxTc, true, 1.0f), Error);
}

}  // namespace
}  // namespace mla
