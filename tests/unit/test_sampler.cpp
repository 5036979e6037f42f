#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/sampler.h"

namespace mla {
namespace {

constexpr int64_t kDeepSeekVocab = 129280;

std::vector<float> random_logits(int64_t vocab_size, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> logits(vocab_size);
  for (float& x : logits) x = dist(gen);
  return logits;
}

// Relative frequency of each token over `draws` consecutive positions.
std::vector<double> frequencies(const std::vector<float>& logits, const SamplingParams& params,
                                int64_t draws) {
  std::vector<double> freq(logits.size(), 0.0);
  for (int64_t pos = 0; pos < draws; ++pos) {
    freq[sample_token(logits.data(), logits.size(), params, pos)] += 1.0 / draws;
  }
  return freq;
}

std::set<int32_t> support(const std::vector<float>& logits, const SamplingParams& params) {
  std::set<int32_t> tokens;
  for (int64_t pos = 0; pos < 4000; ++pos) {
    tokens.insert(sample_token(logits.data(), logits.size(), params, pos));
  }
  return tokens;
}

TEST(Sampler, GreedyPicksArgmax) {
  const std::vector<float> logits = random_logits(kDeepSeekVocab, 1);
  const auto expected =
      static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  EXPECT_EQ(sample_token(logits.data(), logits.size(), SamplingParams{}, 0), expected);
}

TEST(Sampler, GreedyTiesPickLowestIndex) {
  const std::vector<float> logits = {1, 3, -2, 3, 3};
  EXPECT_EQ(sample_token(logits.data(), logits.size(), SamplingParams{}, 0), 1);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const std::vector<float> masked = {neg_inf, neg_inf, 0};
  EXPECT_EQ(sample_token(masked.data(), masked.size(), SamplingParams{}, 0), 2);
}

TEST(Sampler, ValidateNamesTheBadField) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<std::pair<SamplingParams, std::string>> cases = {
      {{.temperature = -0.5f}, "temperature"},
      {{.temperature = nan}, "temperature"},
      {{.temperature = inf}, "temperature"},
      {{.top_k = -1}, "top_k"},
      {{.top_k = 11}, "top_k"},
      {{.top_p = 0}, "top_p"},
      {{.top_p = 1.01f}, "top_p"},
      {{.top_p = nan}, "top_p"},
  };
  for (const auto& [params, field] : cases) {
    try {
      params.validate(10);
      ADD_FAILURE() << "no error for bad " << field;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  }
  EXPECT_NO_THROW((SamplingParams{.temperature = 0.7f, .top_k = 10, .top_p = 1}.validate(10)));
  const std::vector<float> logits(10, 0.0f);
  EXPECT_THROW(sample_token(logits.data(), 10, {.temperature = 1, .top_p = 0}, 0), Error);
}

TEST(Sampler, UniformDrawIsAPureFunctionOfSeedAndPosition) {
  std::set<double> draws;
  double sum = 0;
  for (int64_t pos = 0; pos < 10000; ++pos) {
    const double u = uniform_for(7, pos);
    EXPECT_EQ(u, uniform_for(7, pos));
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
    EXPECT_NE(u, uniform_for(8, pos));
    draws.insert(u);
    sum += u;
  }
  EXPECT_EQ(draws.size(), 10000u);
  EXPECT_NEAR(sum / 10000, 0.5, 0.01);
}

TEST(Sampler, SameSeedAndPositionGiveSameToken) {
  const std::vector<float> logits = random_logits(kDeepSeekVocab, 2);
  const SamplingParams params{.temperature = 1.0f, .top_k = 50, .top_p = 0.9f, .seed = 1234};
  std::set<int32_t> tokens;
  for (int64_t pos = 100; pos < 200; ++pos) {
    const int32_t token = sample_token(logits.data(), logits.size(), params, pos);
    EXPECT_EQ(token, sample_token(logits.data(), logits.size(), params, pos));
    tokens.insert(token);
  }
  EXPECT_GT(tokens.size(), 5u);
}

// The documented algorithm, written plainly: sort the whole vocabulary, cut, draw.
int32_t reference_sample(const std::vector<float>& logits, const SamplingParams& params,
                         int64_t position) {
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  if (params.top_k > 0) ids.resize(params.top_k);
  std::vector<double> weights;
  double total = 0;
  for (int32_t id : ids) {
    total += weights.emplace_back(std::exp((logits[id] - logits[ids[0]]) / params.temperature));
  }
  size_t kept = 0;
  double kept_total = 0;
  while (kept < ids.size() && kept_total < params.top_p * total) kept_total += weights[kept++];
  const double target = uniform_for(params.seed, position) * kept_total;
  double cumulative = 0;
  for (size_t i = 0; i < kept; ++i) {
    cumulative += weights[i];
    if (target < cumulative) return ids[i];
  }
  return ids[kept - 1];
}

// The sampler sorts only as much of the vocabulary as a draw needs; the tokens must not change.
TEST(Sampler, MatchesFullSortReference) {
  const std::vector<float> logits = random_logits(kDeepSeekVocab, 4);
  const std::vector<SamplingParams> cases = {
      {.temperature = 1, .top_p = 0.9f, .seed = 1},
      {.temperature = 0.8f, .top_k = 2000, .top_p = 0.95f, .seed = 2},
      {.temperature = 1, .top_k = 50, .seed = 3},
      {.temperature = 1.3f, .seed = 4},
  };
  for (const SamplingParams& params : cases) {
    for (int64_t pos = 0; pos < 20; ++pos) {
      EXPECT_EQ(sample_token(logits.data(), logits.size(), params, pos),
                reference_sample(logits, params, pos))
          << "top_k " << params.top_k << " top_p " << params.top_p << " position " << pos;
    }
  }
}

TEST(Sampler, TopKOneAndTinyTopPAreGreedy) {
  const std::vector<float> logits = random_logits(kDeepSeekVocab, 3);
  const int32_t greedy = sample_token(logits.data(), logits.size(), SamplingParams{}, 0);
  for (int64_t pos = 0; pos < 50; ++pos) {
    EXPECT_EQ(sample_token(logits.data(), logits.size(), {.temperature = 2, .top_k = 1}, pos),
              greedy);
    EXPECT_EQ(sample_token(logits.data(), logits.size(), {.temperature = 2, .top_p = 1e-6f}, pos),
              greedy);
  }
}

TEST(Sampler, EmpiricalDistributionMatchesTemperedSoftmax) {
  const std::vector<float> logits = {1.0f, 0.2f, -0.5f, 1.5f, 0.0f};
  const float temperature = 0.7f;
  double total = 0;
  std::vector<double> expected;
  for (float x : logits) total += expected.emplace_back(std::exp(x / temperature));
  const std::vector<double> freq =
      frequencies(logits, {.temperature = temperature, .seed = 99}, 100000);
  for (size_t i = 0; i < logits.size(); ++i) {
    EXPECT_NEAR(freq[i], expected[i] / total, 0.01) << "token " << i;
  }
}

TEST(Sampler, TopKRestrictsSupportAndRenormalises) {
  const std::vector<float> logits = {0.0f, 2.0f, 1.0f, 1.5f, -1.0f};
  EXPECT_EQ(support(logits, {.temperature = 1, .top_k = 2}), (std::set<int32_t>{1, 3}));
  const std::vector<double> freq = frequencies(logits, {.temperature = 1, .top_k = 2}, 100000);
  EXPECT_NEAR(freq[1], 1 / (1 + std::exp(-0.5)), 0.01);
}

TEST(Sampler, TopPRestrictsSupportExactlyAtTheBoundary) {
  // Equal logits give exactly representable probabilities 1/4 each, so the boundary is
  // exact: mass 0.5 is reached by the two lowest ids, anything more needs a third.
  const std::vector<float> flat(4, 3.0f);
  EXPECT_EQ(support(flat, {.temperature = 1, .top_p = 0.5f}), (std::set<int32_t>{0, 1}));
  EXPECT_EQ(support(flat, {.temperature = 1, .top_p = std::nextafter(0.5f, 1.0f)}),
            (std::set<int32_t>{0, 1, 2}));
  EXPECT_EQ(support(flat, {.temperature = 1, .top_p = 1}), (std::set<int32_t>{0, 1, 2, 3}));

  // Probabilities 0.5, 0.3, 0.2 (token order shuffled): top_p is applied after sorting.
  const std::vector<float> logits = {std::log(0.2f), std::log(0.5f), std::log(0.3f)};
  EXPECT_EQ(support(logits, {.temperature = 1, .top_p = 0.49f}), (std::set<int32_t>{1}));
  EXPECT_EQ(support(logits, {.temperature = 1, .top_p = 0.79f}), (std::set<int32_t>{1, 2}));
  EXPECT_EQ(support(logits, {.temperature = 1, .top_p = 0.81f}), (std::set<int32_t>{0, 1, 2}));
}

TEST(Sampler, TokenLogprobIsLogSoftmax) {
  const std::vector<float> logits = {1.0f, 2.0f, 3.0f};
  const double lse = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  for (int32_t t = 0; t < 3; ++t) {
    EXPECT_NEAR(token_logprob(logits.data(), 3, t), logits[t] - lse, 1e-6);
  }
  EXPECT_THROW(token_logprob(logits.data(), 3, 3), Error);
}

TEST(Sampler, TopLogprobsAreTheMostLikelyTokensInOrder) {
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f, -1.0f};
  const auto top = top_logprobs(logits.data(), 5, 3);
  ASSERT_EQ(top.size(), 3u);
  EXPECT_EQ(top[0].first, 1);  // ties: the lower id first
  EXPECT_EQ(top[1].first, 3);
  EXPECT_EQ(top[2].first, 2);
  for (const auto& [id, lp] : top) EXPECT_NEAR(lp, token_logprob(logits.data(), 5, id), 1e-6);
  EXPECT_EQ(top_logprobs(logits.data(), 5, 9).size(), 5u);
  EXPECT_TRUE(top_logprobs(logits.data(), 5, 0).empty());
}

}  // namespace
}  // namespace mla
