#include "launch/bench/report.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <map>
#include <numeric>

#include "kernels/error.h"

namespace mla::bench {

using json = nlohmann::ordered_json;

Slo Slo::parse(const std::string& spec) {
  Slo slo;
  size_t start = 0;
  while (start < spec.size()) {
    size_t end = spec.find_first_of(", ", start);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(start, end - start);
    start = end + 1;
    if (item.empty()) continue;
    const size_t colon = item.find(':');
    MLA_REQUIRE(colon != std::string::npos, "--goodput: '{}' is not NAME:MS", item);
    const std::string name = item.substr(0, colon);
    double ms = 0;
    try {
      ms = std::stod(item.substr(colon + 1));
    } catch (const std::exception&) {
      MLA_THROW(kInvalidArgument, "--goodput: '{}' has no number of milliseconds", item);
    }
    MLA_REQUIRE(ms > 0, "--goodput: '{}' must be > 0 ms", item);
    if (name == "ttft")
      slo.ttft_ms = ms;
    else if (name == "tpot")
      slo.tpot_ms = ms;
    else if (name == "e2el")
      slo.e2el_ms = ms;
    else
      MLA_THROW(kInvalidArgument, "--goodput: unknown metric '{}' (ttft, tpot, e2el)", name);
  }
  return slo;
}

namespace {

double tpot_of(const RequestRecord& r) {
  return r.output_tokens > 1 ? (r.e2el_ms - r.ttft_ms) / (r.output_tokens - 1) : 0.0;
}

struct Stats {
  double mean = 0, median = 0, std = 0;
  std::vector<double> sorted;
};

Stats stats_of(std::vector<double> v) {
  Stats s;
  std::sort(v.begin(), v.end());
  s.sorted = std::move(v);
  if (s.sorted.empty()) return s;
  const double n = static_cast<double>(s.sorted.size());
  s.mean = std::accumulate(s.sorted.begin(), s.sorted.end(), 0.0) / n;
  s.median = percentile(s.sorted, 50);
  double var = 0;
  for (const double x : s.sorted) var += (x - s.mean) * (x - s.mean);
  s.std = std::sqrt(var / n);
  return s;
}

std::string percentile_key(double p) {
  // 99 -> "p99", 99.9 -> "p99.9"
  return p == std::floor(p) ? fmt::format("p{}", static_cast<int64_t>(p)) : fmt::format("p{}", p);
}

}  // namespace

bool Slo::met(const RequestRecord& r) const {
  if (ttft_ms && r.ttft_ms > *ttft_ms) return false;
  if (tpot_ms && tpot_of(r) > *tpot_ms) return false;
  if (e2el_ms && r.e2el_ms > *e2el_ms) return false;
  return true;
}

double percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  const double rank = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(sorted.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - static_cast<double>(lo));
}

json result_json(const RunInfo& info, const std::vector<RequestRecord>& records) {
  int64_t completed = 0, failed = 0, not_sent = 0, incomplete = 0, good = 0, moved = 0;
  int64_t input_tokens = 0, output_tokens = 0;
  std::vector<double> ttfts, tpots, itls, e2els;
  std::map<std::string, int64_t> errors_by_code, per_worker;
  json input_lens = json::array(), output_lens = json::array(), ttft_list = json::array(),
       itl_list = json::array(), error_list = json::array(), start_list = json::array(),
       e2el_list = json::array(), worker_list = json::array();
  // Requests in flight over time: +1 at each start, -1 at each end.
  std::vector<std::pair<double, int>> events;
  // Output tokens per second, per second of the run, per worker.
  std::map<std::string, std::vector<int64_t>> tokens_per_second;
  for (const RequestRecord& r : records) {
    if (!r.sent) {
      ++not_sent;
      continue;
    }
    events.emplace_back(r.start_s, 1);
    events.emplace_back(r.start_s + r.e2el_ms / 1000.0, -1);
    for (size_t i = 0; i < r.token_s.size(); ++i) {
      const auto second = static_cast<size_t>(std::max(0.0, r.token_s[i]));
      auto& per = tokens_per_second[r.workers.empty() ? "?" : r.workers.back()];
      if (per.size() <= second) per.resize(second + 1, 0);
      per[second] += i < r.token_n.size() ? r.token_n[i] : 0;
    }
    if (info.save_detailed) {
      input_lens.push_back(r.input_tokens);
      output_lens.push_back(r.output_tokens);
      ttft_list.push_back(r.ttft_ms / 1000.0);
      itl_list.push_back(json::array());
      for (const double g : r.itl_ms) itl_list.back().push_back(g / 1000.0);
      error_list.push_back(r.code == "OK" ? "" : r.code);
      start_list.push_back(r.start_s);
      e2el_list.push_back(r.e2el_ms / 1000.0);
      worker_list.push_back(r.workers.empty() ? "" : r.workers.back());
    }
    if (r.code != "OK") {
      ++failed;
      ++errors_by_code[r.code];
      continue;
    }
    ++completed;
    if (!r.complete) ++incomplete;
    if (r.workers.size() > 1) ++moved;
    ++per_worker[r.workers.empty() ? "?" : r.workers.front()];
    input_tokens += r.input_tokens;
    output_tokens += r.output_tokens;
    if (r.output_tokens > 0) ttfts.push_back(r.ttft_ms);
    if (r.output_tokens > 1) tpots.push_back(tpot_of(r));
    itls.insert(itls.end(), r.itl_ms.begin(), r.itl_ms.end());
    e2els.push_back(r.e2el_ms);
    if (!info.goodput.empty() && info.goodput.met(r)) ++good;
  }
  std::sort(events.begin(), events.end());
  int in_flight = 0, max_in_flight = 0;
  for (const auto& [t, d] : events) max_in_flight = std::max(max_in_flight, in_flight += d);
  int64_t max_tokens_per_s = 0;
  size_t seconds = 0;
  for (const auto& [w, per] : tokens_per_second) seconds = std::max(seconds, per.size());
  for (size_t s = 0; s < seconds; ++s) {
    int64_t sum = 0;
    for (const auto& [w, per] : tokens_per_second) sum += s < per.size() ? per[s] : 0;
    max_tokens_per_s = std::max(max_tokens_per_s, sum);
  }

  const double d = info.duration_s > 0 ? info.duration_s : 1e-9;
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y%m%d-%H%M%S", std::gmtime(&now));
  json out;
  out["date"] = date;
  out["backend"] = info.backend;
  out["model_id"] = info.model_id;
  out["tokenizer_id"] = info.model_id;
  out["target"] = info.target;
  out["workload"] = info.workload;
  out["num_prompts"] = info.num_prompts;
  out["request_rate"] = info.request_rate > 0 ? json(info.request_rate) : json("inf");
  out["burstiness"] = info.burstiness;
  out["max_concurrency"] = info.max_concurrency;
  out["duration"] = info.duration_s;
  out["completed"] = completed;
  out["failed"] = failed;
  out["not_sent"] = not_sent;
  out["incomplete"] = incomplete;
  out["total_input_tokens"] = input_tokens;
  out["total_output_tokens"] = output_tokens;
  out["request_throughput"] = static_cast<double>(completed) / d;
  out["request_goodput"] =
      info.goodput.empty() ? json(nullptr) : json(static_cast<double>(good) / d);
  out["output_throughput"] = static_cast<double>(output_tokens) / d;
  out["total_token_throughput"] = static_cast<double>(input_tokens + output_tokens) / d;
  out["input_throughput"] = static_cast<double>(input_tokens) / d;
  out["max_output_tokens_per_s"] = max_tokens_per_s;
  out["max_concurrent_requests"] = max_in_flight;
  for (const auto& [name, values] : {std::pair<const char*, std::vector<double>*>{"ttft", &ttfts},
                                     {"tpot", &tpots},
                                     {"itl", &itls},
                                     {"e2el", &e2els}}) {
    const Stats s = stats_of(*values);
    out[fmt::format("mean_{}_ms", name)] = s.mean;
    out[fmt::format("median_{}_ms", name)] = s.median;
    out[fmt::format("std_{}_ms", name)] = s.std;
    for (const double p : info.percentiles)
      out[fmt::format("{}_{}_ms", percentile_key(p), name)] = percentile(s.sorted, p);
  }
  out["errors_by_code"] = errors_by_code;
  out["per_worker"] = per_worker;
  out["moved_requests"] = moved;
  if (!info.goodput.empty()) {
    json slo = json::object();
    if (info.goodput.ttft_ms) slo["ttft_ms"] = *info.goodput.ttft_ms;
    if (info.goodput.tpot_ms) slo["tpot_ms"] = *info.goodput.tpot_ms;
    if (info.goodput.e2el_ms) slo["e2el_ms"] = *info.goodput.e2el_ms;
    out["goodput_slo"] = slo;
    out["good_requests"] = good;
  }
  if (info.save_detailed) {
    out["input_lens"] = input_lens;
    out["output_lens"] = output_lens;
    out["ttfts"] = ttft_list;
    out["itls"] = itl_list;
    out["errors"] = error_list;
    out["start_times"] = start_list;
    out["e2els"] = e2el_list;
    out["workers"] = worker_list;
    // Output tokens/s per worker in bins of about a hundredth of the run (at least 10 ms).
    const double bin = std::max(0.01, info.duration_s / 100.0);
    json by_worker = json::object();
    for (const RequestRecord& r : records) {
      for (size_t i = 0; r.sent && i < r.token_s.size(); ++i) {
        const std::string w = r.workers.empty() ? "?" : r.workers.back();
        if (!by_worker.contains(w)) by_worker[w] = json::array();
        json& series = by_worker[w];
        const auto at = static_cast<size_t>(std::max(0.0, r.token_s[i]) / bin);
        while (series.size() <= at) series.push_back(0.0);
        series[at] = series[at].get<double>() + (i < r.token_n.size() ? r.token_n[i] : 0) / bin;
      }
    }
    out["output_tokens_timeline"] = {{"bin_s", bin}, {"tokens_per_s_by_worker", by_worker}};
  }
  return out;
}

std::string result_path_for_rate(const std::string& path, double rate, bool sweep) {
  if (!sweep) return path;
  const std::string tag = rate > 0 ? fmt::format("rate{}", rate) : "rateinf";
  const size_t slash = path.rfind('/');
  const size_t dot = path.rfind('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) {
    return path + "." + tag;
  }
  return path.substr(0, dot) + "." + tag + path.substr(dot);
}

std::string result_table(const json& r) {
  auto num = [&](const char* key) {
    return r.contains(key) && r[key].is_number() ? r[key].get<double>() : 0.0;
  };
  std::string out = "============ Serving Benchmark Result ============\n";
  auto line = [&](const std::string& label, const std::string& value) {
    out += fmt::format("{:<40} {:<10}\n", label, value);
  };
  line("Backend:", r.value("backend", ""));
  line("Traffic request rate:",
       r["request_rate"].is_string() ? "inf" : fmt::format("{:.2f}", num("request_rate")));
  line("Max request concurrency:", fmt::format("{}", r.value("max_concurrency", 0)));
  line("Successful requests:", fmt::format("{}", r.value("completed", 0)));
  line("Failed requests:", fmt::format("{}", r.value("failed", 0)));
  line("Benchmark duration (s):", fmt::format("{:.2f}", num("duration")));
  line("Total input tokens:", fmt::format("{}", r.value("total_input_tokens", 0)));
  line("Total generated tokens:", fmt::format("{}", r.value("total_output_tokens", 0)));
  line("Request throughput (req/s):", fmt::format("{:.2f}", num("request_throughput")));
  if (r.contains("request_goodput") && r["request_goodput"].is_number())
    line("Request goodput (req/s):", fmt::format("{:.2f}", num("request_goodput")));
  line("Output token throughput (tok/s):", fmt::format("{:.2f}", num("output_throughput")));
  line("Total token throughput (tok/s):", fmt::format("{:.2f}", num("total_token_throughput")));
  line("Max concurrent requests:", fmt::format("{}", r.value("max_concurrent_requests", 0)));
  for (const auto& [name, title] :
       {std::pair<const char*, const char*>{"ttft", "Time to First Token"},
        {"tpot", "Time per Output Token (excl. 1st token)"},
        {"itl", "Inter-token Latency"},
        {"e2el", "End-to-end Latency"}}) {
    out += fmt::format("{:-^50}\n", title);
    std::string label = name;
    for (char& c : label) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    const std::string suffix = fmt::format("_{}_ms", name);
    for (const auto& [key, value] : r.items()) {
      if (!key.ends_with(suffix) || !value.is_number()) continue;
      const std::string stat = key.substr(0, key.size() - suffix.size());
      const std::string shown = stat == "mean"     ? "Mean"
                                : stat == "median" ? "Median"
                                : stat == "std"    ? "Std"
                                                   : "P" + stat.substr(1);
      line(fmt::format("{} {} (ms):", shown, label), fmt::format("{:.2f}", value.get<double>()));
    }
  }
  out += std::string(50, '=') + "\n";
  return out;
}

}  // namespace mla::bench
