#include "launch/bench/workload.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "kernels/error.h"

namespace mla::bench {

LengthDist LengthDist::parse(const std::string& spec, const std::string& flag) {
  LengthDist d;
  const size_t colon = spec.find(':');
  const std::string kind = colon == std::string::npos ? "fixed" : spec.substr(0, colon);
  const std::string args = colon == std::string::npos ? spec : spec.substr(colon + 1);
  auto number = [&](const std::string& s) {
    try {
      size_t used = 0;
      const double v = std::stod(s, &used);
      if (used == s.size()) return v;
    } catch (const std::exception&) {
    }
    MLA_THROW(kInvalidArgument, "{}: '{}' is not a number (in '{}')", flag, s, spec);
  };
  if (kind == "fixed") {
    d.kind = Kind::kFixed;
    d.a = number(args);
  } else if (kind == "uniform") {
    const size_t dash = args.find('-');
    MLA_REQUIRE(dash != std::string::npos, "{}: uniform needs LOW-HIGH, got '{}'", flag, spec);
    d.kind = Kind::kUniform;
    d.a = number(args.substr(0, dash));
    d.b = number(args.substr(dash + 1));
    MLA_REQUIRE(d.a <= d.b, "{}: uniform needs LOW <= HIGH, got '{}'", flag, spec);
  } else if (kind == "lognormal") {
    const size_t comma = args.find(',');
    MLA_REQUIRE(comma != std::string::npos, "{}: lognormal needs MEAN,SIGMA, got '{}'", flag, spec);
    d.kind = Kind::kLognormal;
    d.a = number(args.substr(0, comma));
    d.b = number(args.substr(comma + 1));
    MLA_REQUIRE(d.b >= 0, "{}: lognormal sigma must be >= 0, got '{}'", flag, spec);
  } else {
    MLA_THROW(kInvalidArgument,
              "{}: unknown distribution '{}' (N, fixed:N, uniform:LOW-HIGH, lognormal:MEAN,SIGMA)",
              flag, kind);
  }
  MLA_REQUIRE(d.a >= 1, "{}: token counts must be >= 1, got '{}'", flag, spec);
  return d;
}

int32_t LengthDist::sample(std::mt19937_64& rng) const {
  double v = a;
  switch (kind) {
    case Kind::kFixed:
      break;
    case Kind::kUniform:
      v = static_cast<double>(std::uniform_int_distribution<int64_t>(static_cast<int64_t>(a),
                                                                     static_cast<int64_t>(b))(rng));
      break;
    case Kind::kLognormal: {
      // The mean of a lognormal is exp(mu + sigma^2 / 2).
      const double mu = std::log(a) - b * b / 2;
      v = std::round(std::lognormal_distribution<double>(mu, b)(rng));
      break;
    }
  }
  return static_cast<int32_t>(std::clamp(v, 1.0, 1e9));
}

double LengthDist::mean() const { return kind == Kind::kUniform ? (a + b) / 2 : a; }

std::string LengthDist::describe() const {
  switch (kind) {
    case Kind::kFixed:
      return fmt::format("{}", a);
    case Kind::kUniform:
      return fmt::format("uniform {}-{}", a, b);
    case Kind::kLognormal:
      return fmt::format("lognormal mean {} sigma {}", a, b);
  }
  return "?";
}

std::vector<double> arrival_times(int64_t n, double rate, double burstiness, uint64_t seed) {
  MLA_REQUIRE(burstiness > 0, "--burstiness must be > 0, got {}", burstiness);
  std::vector<double> at(static_cast<size_t>(std::max<int64_t>(n, 0)), 0.0);
  if (rate <= 0 || std::isinf(rate)) return at;
  std::mt19937_64 rng(seed ^ 0xA5A5A5A5ull);
  std::gamma_distribution<double> gap(burstiness, 1.0 / (rate * burstiness));
  double t = 0;
  for (auto& x : at) {
    x = t;
    t += gap(rng);
  }
  return at;
}

std::vector<double> parse_positive_list(const std::string& list, const char* flag, bool allow_inf) {
  std::vector<double> out;
  size_t start = 0;
  while (start <= list.size()) {
    size_t comma = list.find(',', start);
    if (comma == std::string::npos) comma = list.size();
    const std::string item = list.substr(start, comma - start);
    start = comma + 1;
    if (item.empty()) continue;
    if (allow_inf && item == "inf") {
      out.push_back(0.0);
      continue;
    }
    double v = 0;
    size_t used = 0;
    try {
      v = std::stod(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    MLA_REQUIRE(used == item.size() && v > 0, "{}: '{}' must be a positive number{}", flag, item,
                allow_inf ? " or inf" : "");
    out.push_back(v);
  }
  MLA_REQUIRE(!out.empty(), "{}: no values in '{}'", flag, list);
  return out;
}

namespace {

std::vector<int32_t> random_ids(std::mt19937_64& rng, int32_t n, int32_t vocab) {
  std::uniform_int_distribution<int32_t> id(1, vocab - 1);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& x : ids) x = id(rng);
  return ids;
}

}  // namespace

std::vector<WorkItem> random_workload(int64_t n, const LengthDist& input, const LengthDist& output,
                                      int32_t vocab, uint64_t seed) {
  MLA_REQUIRE(vocab >= 2, "vocab must be >= 2, got {}", vocab);
  std::vector<WorkItem> items(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    // Request i depends only on (seed, i).
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i));
    WorkItem& w = items[static_cast<size_t>(i)];
    w.prompt_ids = random_ids(rng, input.sample(rng), vocab);
    w.output_len = output.sample(rng);
  }
  return items;
}

std::vector<WorkItem> shared_prefix_workload(int64_t n, int32_t groups, int32_t prefix_len,
                                             const LengthDist& question, const LengthDist& output,
                                             int32_t vocab, uint64_t seed) {
  MLA_REQUIRE(groups >= 1, "--prefix-groups must be >= 1, got {}", groups);
  MLA_REQUIRE(prefix_len >= 1, "--prefix-len must be >= 1, got {}", prefix_len);
  MLA_REQUIRE(vocab >= 2, "vocab must be >= 2, got {}", vocab);
  std::vector<std::vector<int32_t>> prefixes;
  for (int32_t g = 0; g < groups; ++g) {
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 0x51ED270B7ull * (g + 1));
    prefixes.push_back(random_ids(rng, prefix_len, vocab));
  }
  std::vector<WorkItem> items(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i));
    WorkItem& w = items[static_cast<size_t>(i)];
    w.prefix_group = static_cast<int32_t>(i % groups);
    w.prompt_ids = prefixes[static_cast<size_t>(w.prefix_group)];
    const std::vector<int32_t> q = random_ids(rng, question.sample(rng), vocab);
    w.prompt_ids.insert(w.prompt_ids.end(), q.begin(), q.end());
    w.output_len = output.sample(rng);
  }
  return items;
}

std::vector<WorkItem> trace_workload(const std::string& path, int32_t vocab, uint64_t seed,
                                     double time_scale) {
  MLA_REQUIRE(time_scale > 0, "--trace-time-scale must be > 0, got {}", time_scale);
  std::ifstream in(path);
  if (!in) MLA_THROW(kNotFound, "--trace: cannot read {}", path);
  std::vector<WorkItem> items;
  std::string line;
  int64_t number = 0;
  double first = std::numeric_limits<double>::quiet_NaN();
  while (std::getline(in, line)) {
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto j = nlohmann::json::parse(line, nullptr, false);
    auto where = [&](const char* field) {
      return fmt::format("{} line {}: {}", path, number, field);
    };
    if (j.is_discarded() || !j.is_object()) {
      MLA_THROW(kInvalidArgument, "{} line {}: not a JSON object", path, number);
    }
    WorkItem w;
    const char* time_key = j.contains("arrival_s") ? "arrival_s" : "timestamp";
    if (!j.contains(time_key) || !j[time_key].is_number()) {
      MLA_THROW(kInvalidArgument, "{}: needs a number (arrival_s or timestamp)", where("time"));
    }
    w.arrival_s = j[time_key].get<double>();  // made relative below
    first = std::isnan(first) ? w.arrival_s : std::min(first, w.arrival_s);
    if (j.contains("prompt")) {
      if (!j["prompt"].is_string())
        MLA_THROW(kInvalidArgument, "{}: expected text", where("prompt"));
      w.prompt_text = j["prompt"].get<std::string>();
    } else if (j.contains("input_len") && j["input_len"].is_number_integer() &&
               j["input_len"].get<int64_t>() >= 1) {
      std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(number));
      w.prompt_ids = random_ids(rng, static_cast<int32_t>(j["input_len"].get<int64_t>()), vocab);
    } else {
      MLA_THROW(kInvalidArgument, "{}: needs prompt (text) or input_len (>= 1)", where("prompt"));
    }
    if (!j.contains("output_len") || !j["output_len"].is_number_integer() ||
        j["output_len"].get<int64_t>() < 1) {
      MLA_THROW(kInvalidArgument, "{}: needs an integer >= 1", where("output_len"));
    }
    w.output_len = static_cast<int32_t>(j["output_len"].get<int64_t>());
    items.push_back(std::move(w));
  }
  MLA_REQUIRE(!items.empty(), "--trace: {} has no requests", path);
  for (WorkItem& w : items) w.arrival_s = (w.arrival_s - first) * time_scale;
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.arrival_s < b.arrival_s; });
  return items;
}

std::vector<WorkItem> make_workload(const WorkloadSpec& spec, int32_t vocab, int64_t n,
                                    uint64_t seed, std::string* description) {
  const auto output = LengthDist::parse(spec.output_len, "--output-len");
  if (spec.dataset == "random") {
    const auto input = LengthDist::parse(spec.input_len, "--input-len");
    *description = fmt::format("random: input {}, output {}", input.describe(), output.describe());
    return random_workload(n, input, output, vocab, seed);
  }
  if (spec.dataset == "shared-prefix") {
    const auto question = LengthDist::parse(spec.input_len, "--input-len");
    *description =
        fmt::format("shared-prefix: {} prefixes of {} + questions of {}, output {}",
                    spec.prefix_groups, spec.prefix_len, question.describe(), output.describe());
    return shared_prefix_workload(n, spec.prefix_groups, spec.prefix_len, question, output, vocab,
                                  seed);
  }
  if (spec.dataset == "trace") {
    MLA_REQUIRE(!spec.trace.empty(), "--dataset trace needs --trace FILE");
    *description = fmt::format("trace {} (time x {})", spec.trace, spec.trace_time_scale);
    auto items = trace_workload(spec.trace, vocab, seed, spec.trace_time_scale);
    if (static_cast<int64_t>(items.size()) > n) items.resize(static_cast<size_t>(n));
    return items;
  }
  MLA_THROW(kInvalidArgument, "--dataset: '{}' (random, shared-prefix, trace)", spec.dataset);
}

}  // namespace mla::bench
