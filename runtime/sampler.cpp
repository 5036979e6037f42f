#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/error.h"
#include "runtime/splitmix.h"

namespace mla {
namespace {

int32_t argmax(const float* logits, int64_t vocab_size) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab_size; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

struct Candidate {
  float logit;
  int32_t id;
};

// Candidates by descending logit, then ascending id: a total order, so the result does not
// depend on the standard library's sort.
bool before(const Candidate& a, const Candidate& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

// The `limit` largest-logit tokens in sorted order, sorted lazily: a draw usually reads only
// the head of a 129k vocabulary, and selecting a head costs O(V) where a full sort costs
// O(V log V) (a 129280-token sort took ~15 ms, 5x a typical lazy draw).
class SortedCandidates {
 public:
  SortedCandidates(const float* logits, int64_t vocab_size, int64_t limit)
      : candidates_(vocab_size), limit_(limit) {
    for (int64_t i = 0; i < vocab_size; ++i) candidates_[i] = {logits[i], static_cast<int32_t>(i)};
    sort_head(std::min<int64_t>(limit, 1024));
  }

  int64_t size() const { return limit_; }

  const Candidate& operator[](int64_t i) {
    MLA_CHECK(0 <= i && i < limit_, "candidate {} outside [0, {})", i, limit_);
    if (i >= head_) sort_head(std::min(limit_, std::max(i + 1, head_ * 8)));
    return candidates_[i];
  }

 private:
  // Extends the sorted head to `count`. Everything past the head already follows it in the
  // order, so only the tail needs selecting.
  void sort_head(int64_t count) {
    const auto first = candidates_.begin() + head_;
    const auto last = candidates_.begin() + count;
    if (last != candidates_.end()) std::nth_element(first, last, candidates_.end(), before);
    std::sort(first, last, before);
    head_ = count;
  }

  std::vector<Candidate> candidates_;  // [vocab_size]; [0, head_) sorted
  int64_t limit_;
  int64_t head_ = 0;
};

}  // namespace

void SamplingParams::validate() const {
  MLA_REQUIRE(std::isfinite(temperature) && temperature >= 0,
              "sampling.temperature: must be finite and >= 0, got {}", temperature);
  MLA_REQUIRE(top_k >= 0, "sampling.top_k: must be >= 0 (0: off), got {}", top_k);
  MLA_REQUIRE(top_p > 0 && top_p <= 1, "sampling.top_p: must be in (0, 1], got {}", top_p);
}

void SamplingParams::validate(int64_t vocab_size) const {
  validate();
  MLA_REQUIRE(top_k <= vocab_size, "sampling.top_k: must be at most the vocabulary size {}, got {}",
              vocab_size, top_k);
}

double uniform_for(uint64_t seed, int64_t position) {
  const uint64_t bits = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(position)));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;  // top 53 bits: exact in a double
}

int32_t sample_token(const float* logits, int64_t vocab_size, const SamplingParams& params,
                     int64_t position) {
  MLA_REQUIRE(vocab_size >= 1, "vocab_size must be >= 1, got {}", vocab_size);
  params.validate(vocab_size);
  if (params.temperature == 0) return argmax(logits, vocab_size);

  SortedCandidates sorted(logits, vocab_size, params.top_k > 0 ? params.top_k : vocab_size);
  // Unnormalised probabilities in double: the softmax denominator cancels in every ratio.
  const double max_logit = sorted[0].logit;
  const auto weight = [&](float logit) {
    return std::exp((logit - max_logit) / params.temperature);
  };
  double total = 0;
  if (params.top_k > 0) {
    for (int64_t i = 0; i < sorted.size(); ++i) total += weight(sorted[i].logit);
  } else {
    for (int64_t i = 0; i < vocab_size; ++i) total += weight(logits[i]);
  }

  // With top_p == 1 every candidate is kept, with mass `total` (summing again in sorted
  // order could round below it and cut the tail).
  int64_t kept = sorted.size();
  double kept_total = total;
  if (params.top_p < 1) {
    const double mass = params.top_p * total;
    kept = 0;
    kept_total = 0;
    while (kept < sorted.size() && kept_total < mass) kept_total += weight(sorted[kept++].logit);
  }

  const double target = uniform_for(params.seed, position) * kept_total;
  double cumulative = 0;
  for (int64_t i = 0; i + 1 < kept; ++i) {
    cumulative += weight(sorted[i].logit);
    if (target < cumulative) return sorted[i].id;
  }
  return sorted[kept - 1].id;
}

namespace {

// max(logits) + log(sum(exp(logits - max))): what log softmax subtracts.
double log_sum_exp(const float* logits, int64_t vocab_size) {
  const double max_logit = *std::max_element(logits, logits + vocab_size);
  double sum = 0;
  for (int64_t i = 0; i < vocab_size; ++i) sum += std::exp(logits[i] - max_logit);
  return max_logit + std::log(sum);
}

}  // namespace

float token_logprob(const float* logits, int64_t vocab_size, int32_t token) {
  MLA_REQUIRE(0 <= token && token < vocab_size, "token {} outside vocab of {}", token, vocab_size);
  return static_cast<float>(logits[token] - log_sum_exp(logits, vocab_size));
}

std::vector<std::pair<int32_t, float>> top_logprobs(const float* logits, int64_t vocab_size,
                                                    int32_t n) {
  const auto k = static_cast<int64_t>(std::clamp<int64_t>(n, 0, vocab_size));
  std::vector<int32_t> ids(static_cast<size_t>(vocab_size));
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  const double lse = log_sum_exp(logits, vocab_size);
  std::vector<std::pair<int32_t, float>> out;
  for (int64_t i = 0; i < k; ++i)
    out.emplace_back(ids[i], static_cast<float>(logits[ids[i]] - lse));
  return out;
}

}  // namespace mla
