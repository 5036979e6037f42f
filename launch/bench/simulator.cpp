#include "launch/bench/simulator.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <tuple>
#include <utility>

#include "kernels/error.h"
#include "rpc/routing.h"
#include "runtime/latent_cache.h"

namespace mla::bench {

namespace {

constexpr int kTerms = 5;

std::array<double, kTerms> features(const StepSample& s) {
  return {1.0, static_cast<double>(s.prefill_tokens), static_cast<double>(s.decode_seqs),
          static_cast<double>(s.context_tokens), static_cast<double>(s.prefill_pairs)};
}

// Least squares over the columns in `use` (the others fixed at 0): the normal equations,
// solved by Gaussian elimination with partial pivoting. False when they are singular.
bool solve(const std::vector<StepSample>& samples, const std::array<bool, kTerms>& use,
           std::array<double, kTerms>& c) {
  std::vector<int> cols;
  for (int j = 0; j < kTerms; ++j)
    if (use[j]) cols.push_back(j);
  const size_t n = cols.size();
  std::vector<std::vector<double>> a(n, std::vector<double>(n + 1, 0.0));
  // Rows weighted by 1/t: relative errors matter, not absolute ones.
  for (const StepSample& s : samples) {
    const auto f = features(s);
    const double w = 1.0 / std::max(s.step_ms, 1e-6);
    for (size_t i = 0; i < n; ++i) {
      for (size_t k = 0; k < n; ++k) a[i][k] += w * w * f[cols[i]] * f[cols[k]];
      a[i][n] += w * w * f[cols[i]] * s.step_ms;
    }
  }
  for (size_t i = 0; i < n; ++i) {
    size_t pivot = i;
    for (size_t r = i + 1; r < n; ++r)
      if (std::fabs(a[r][i]) > std::fabs(a[pivot][i])) pivot = r;
    if (std::fabs(a[pivot][i]) < 1e-12) return false;
    std::swap(a[i], a[pivot]);
    for (size_t r = 0; r < n; ++r) {
      if (r == i) continue;
      const double f = a[r][i] / a[i][i];
      for (size_t k = i; k <= n; ++k) a[r][k] -= f * a[i][k];
    }
  }
  c.fill(0.0);
  for (size_t i = 0; i < n; ++i) c[cols[i]] = a[i][n] / a[i][i];
  return true;
}

}  // namespace

StepKind step_kind(const StepSample& step) {
  if (step.prefill_tokens == 0) return StepKind::kDecode;
  return step.decode_seqs == 0 ? StepKind::kPrefill : StepKind::kMixed;
}

const char* step_kind_name(StepKind kind) {
  switch (kind) {
    case StepKind::kDecode:
      return "decode";
    case StepKind::kPrefill:
      return "prefill";
    case StepKind::kMixed:
      return "mixed";
  }
  return "?";
}

double StepScale::of(const StepSample& step) const {
  switch (step_kind(step)) {
    case StepKind::kDecode:
      return decode;
    case StepKind::kPrefill:
      return prefill;
    case StepKind::kMixed:
      return mixed;
  }
  return 1.0;
}

StepScale StepScale::parse(const std::string& spec, const char* flag) {
  auto factor = [&](const std::string& value) {
    const std::vector<double> v = parse_positive_list(value, flag, false);
    MLA_REQUIRE(v.size() == 1, "{}: '{}' is not one factor", flag, value);
    return v[0];
  };
  StepScale s;
  if (spec.find('=') == std::string::npos) {
    s.decode = s.prefill = s.mixed = factor(spec);
    return s;
  }
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t comma = std::min(spec.find(',', start), spec.size());
    const std::string item = spec.substr(start, comma - start);
    start = comma + 1;
    const size_t eq = item.find('=');
    MLA_REQUIRE(eq != std::string::npos, "{}: '{}' is not KIND=FACTOR (in '{}')", flag, item, spec);
    const std::string kind = item.substr(0, eq);
    double* slot = kind == "decode"    ? &s.decode
                   : kind == "prefill" ? &s.prefill
                   : kind == "mixed"   ? &s.mixed
                                       : nullptr;
    MLA_REQUIRE(slot != nullptr, "{}: unknown kind '{}' (decode, prefill or mixed)", flag, kind);
    *slot = factor(item.substr(eq + 1));
  }
  return s;
}

StepTimeModel StepTimeModel::fit(const std::vector<StepSample>& samples) {
  MLA_REQUIRE(samples.size() >= kTerms, "profile: {} step samples; at least {} are needed",
              samples.size(), kTerms);
  std::array<bool, kTerms> use;
  use.fill(true);
  // A term the samples never exercise cannot be estimated: leave it out.
  for (int j = 1; j < kTerms; ++j) {
    use[j] = std::any_of(samples.begin(), samples.end(),
                         [j](const StepSample& s) { return features(s)[j] != 0; });
  }
  StepTimeModel m;
  for (int round = 0; round < kTerms; ++round) {
    MLA_REQUIRE(solve(samples, use, m.c_),
                "profile: the samples do not separate prefill, decode and context costs (vary "
                "all three)");
    bool changed = false;
    for (int j = 0; j < kTerms; ++j) {
      if (use[j] && m.c_[j] < 0) {
        use[j] = false;  // a cost cannot be negative: drop the term and refit
        changed = true;
      }
    }
    if (!changed) break;
  }
  for (double& c : m.c_) c = std::max(c, 0.0);
  for (const StepSample& s : samples) {
    const double t = m.fitted_ms(s);
    m.max_rel_error_ = std::max(m.max_rel_error_, std::fabs(t - s.step_ms) / s.step_ms);
  }
  // The interpolation's points: pure prefill steps, and pure decode steps on a grid.
  for (const StepSample& s : samples) {
    if (s.decode_seqs == 0 && s.prefill_tokens > 0)
      m.prefill_.emplace_back(s.prefill_tokens, s.step_ms);
    if (s.prefill_tokens == 0 && s.decode_seqs > 0) {
      m.batches_.push_back(s.decode_seqs);
      m.contexts_.push_back(static_cast<double>(s.context_tokens) / s.decode_seqs);
    }
  }
  std::sort(m.prefill_.begin(), m.prefill_.end());
  for (auto* axis : {&m.batches_, &m.contexts_}) {
    std::sort(axis->begin(), axis->end());
    axis->erase(std::unique(axis->begin(), axis->end()), axis->end());
  }
  m.decode_.assign(m.batches_.size(), std::vector<double>(m.contexts_.size(), -1.0));
  for (const StepSample& s : samples) {
    if (s.prefill_tokens != 0 || s.decode_seqs == 0) continue;
    const auto b =
        std::lower_bound(m.batches_.begin(), m.batches_.end(), s.decode_seqs) - m.batches_.begin();
    const auto c = std::lower_bound(m.contexts_.begin(), m.contexts_.end(),
                                    static_cast<double>(s.context_tokens) / s.decode_seqs) -
                   m.contexts_.begin();
    m.decode_[static_cast<size_t>(b)][static_cast<size_t>(c)] = s.step_ms;
  }
  // The mixed steps' prefill share: least squares of (t - decode part) on the prefill part,
  // over all of them and per prefill size.
  std::map<int32_t, std::pair<double, double>> by_size;  // tokens -> (num, den)
  double num = 0, den = 0;
  for (const StepSample& s : samples) {
    if (s.prefill_tokens == 0 || s.decode_seqs == 0) continue;
    const double d =
        m.decode_ms(s.decode_seqs, static_cast<double>(s.context_tokens) / s.decode_seqs);
    const double p = m.prefill_ms(s.prefill_tokens);
    num += (s.step_ms - d) * p;
    den += p * p;
    by_size[s.prefill_tokens].first += (s.step_ms - d) * p;
    by_size[s.prefill_tokens].second += p * p;
  }
  if (den > 0) m.mixed_weight_ = std::clamp(num / den, 0.0, 2.0);
  for (const auto& [tokens, nd] : by_size) {
    if (nd.second > 0) m.mixed_.emplace_back(tokens, std::clamp(nd.first / nd.second, 0.0, 2.0));
  }
  return m;
}

StepTimeModel StepTimeModel::from_profile(const nlohmann::json& profile) {
  MLA_REQUIRE(profile.contains("samples") && profile["samples"].is_array(),
              "profile: no \"samples\" list");
  std::vector<StepSample> samples;
  for (const auto& s : profile["samples"]) {
    samples.push_back({s.value("prefill_tokens", 0), s.value("decode_seqs", 0),
                       s.value("context_tokens", int64_t{0}), s.value("prefill_pairs", int64_t{0}),
                       s.value("step_ms", 0.0)});
    MLA_REQUIRE(samples.back().step_ms > 0, "profile: a sample with step_ms <= 0");
  }
  return fit(samples);
}

double StepTimeModel::fitted_ms(const StepSample& step) const {
  const auto f = features(step);
  double t = 0;
  for (int j = 0; j < kTerms; ++j) t += c_[j] * f[j];
  return t;
}

namespace {

// The bracketing indices of x on a sorted axis and its weight on the upper one (beyond the
// ends, the edge segment extended: weights below 0 or above 1).
std::tuple<size_t, size_t, double> bracket(const std::vector<double>& axis, double x) {
  if (axis.size() == 1) return {0, 0, 0.0};
  size_t hi = static_cast<size_t>(std::lower_bound(axis.begin(), axis.end(), x) - axis.begin());
  hi = std::clamp<size_t>(hi, 1, axis.size() - 1);
  const size_t lo = hi - 1;
  return {lo, hi, (x - axis[lo]) / (axis[hi] - axis[lo])};
}

}  // namespace

double StepTimeModel::prefill_ms(int32_t tokens) const {
  if (prefill_.empty()) return fitted_ms({tokens, 0, 0, int64_t{tokens} * (tokens / 2), 0});
  std::vector<double> axis;
  for (const auto& [x, _] : prefill_) axis.push_back(x);
  const auto [lo, hi, w] = bracket(axis, tokens);
  return std::max(0.0, prefill_[lo].second + w * (prefill_[hi].second - prefill_[lo].second));
}

double StepTimeModel::decode_ms(int32_t seqs, double context_per_seq) const {
  auto at = [&](size_t b, size_t c) {
    const double v = decode_[b][c];
    if (v >= 0) return v;
    const auto n = static_cast<int32_t>(batches_[b]);
    return fitted_ms({0, n, static_cast<int64_t>(n * contexts_[c]), 0, 0});
  };
  if (batches_.empty()) {
    return fitted_ms({0, seqs, static_cast<int64_t>(seqs * context_per_seq), 0, 0});
  }
  const auto [b0, b1, wb] = bracket(batches_, seqs);
  const auto [c0, c1, wc] = bracket(contexts_, context_per_seq);
  const double low = at(b0, c0) + wc * (at(b0, c1) - at(b0, c0));
  const double high = at(b1, c0) + wc * (at(b1, c1) - at(b1, c0));
  return std::max(0.0, low + wb * (high - low));
}

double StepTimeModel::mixed_weight(int32_t tokens) const {
  if (mixed_.empty()) return mixed_weight_;
  std::vector<double> axis;
  for (const auto& [x, _] : mixed_) axis.push_back(x);
  // Outside the sizes measured, the nearest one's share (a share is no cost to extrapolate).
  const auto [lo, hi, w] = bracket(axis, tokens);
  const double t = std::clamp(w, 0.0, 1.0);
  return mixed_[lo].second + t * (mixed_[hi].second - mixed_[lo].second);
}

double StepTimeModel::step_ms(const StepSample& step) const {
  double t = 0;
  if (step.decode_seqs > 0) {
    t += decode_ms(step.decode_seqs, static_cast<double>(step.context_tokens) / step.decode_seqs);
  }
  if (step.prefill_tokens > 0) {
    t += (step.decode_seqs > 0 ? mixed_weight(step.prefill_tokens) : 1.0) *
         prefill_ms(step.prefill_tokens);
  }
  return t;
}

nlohmann::json StepTimeModel::to_json() const {
  return {{"base_ms", c_[0]},
          {"per_prefill_token_ms", c_[1]},
          {"per_decode_seq_ms", c_[2]},
          {"per_context_token_ms", c_[3]},
          {"per_prefill_pair_ms", c_[4]},
          {"mixed_prefill_weight", mixed_weight_},
          {"mixed_prefill_weights", mixed_},
          {"max_relative_error", max_rel_error_}};
}

}  // namespace mla::bench
