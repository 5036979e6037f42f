// `mlaserve bench`'s workloads and results (launch/bench/): arrival schedules with the rate and
// burstiness asked for, length distributions, the three workloads (random, shared-prefix,
// trace) deterministic in their seed, and the result object: vLLM's keys, numbers that add up,
// linear-interpolation percentiles, goodput, failures by code.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <numeric>
#include <set>

#include "kernels/error.h"
#include "launch/bench/report.h"
#include "launch/bench/workload.h"

namespace mla::bench {
namespace {

using testing::HasSubstr;

TEST(BenchSchedule, PoissonArrivalsHaveTheRequestedRate) {
  const std::vector<double> at = arrival_times(20000, 50.0, 1.0, 7);
  ASSERT_EQ(at.size(), 20000u);
  EXPECT_EQ(at[0], 0.0);
  std::vector<double> gaps;
  for (size_t i = 1; i < at.size(); ++i) gaps.push_back(at[i] - at[i - 1]);
  const double mean = std::accumulate(gaps.begin(), gaps.end(), 0.0) / gaps.size();
  double var = 0;
  for (const double g : gaps) var += (g - mean) * (g - mean);
  const double cv = std::sqrt(var / gaps.size()) / mean;
  EXPECT_NEAR(mean, 1.0 / 50, 0.02 / 50);  // 2 %
  EXPECT_NEAR(cv, 1.0, 0.05);              // exponential gaps: std = mean
  EXPECT_EQ(arrival_times(20000, 50.0, 1.0, 7), at) << "a seed replays its schedule";
  EXPECT_NE(arrival_times(20000, 50.0, 1.0, 8), at);
}

TEST(BenchSchedule, BurstinessShapesTheGaps) {
  for (const double shape : {0.25, 4.0}) {
    const std::vector<double> at = arrival_times(20000, 10.0, shape, 3);
    std::vector<double> gaps;
    for (size_t i = 1; i < at.size(); ++i) gaps.push_back(at[i] - at[i - 1]);
    const double mean = std::accumulate(gaps.begin(), gaps.end(), 0.0) / gaps.size();
    double var = 0;
    for (const double g : gaps) var += (g - mean) * (g - mean);
    EXPECT_NEAR(mean, 0.1, 0.1 * 0.04) << "shape " << shape;
    // A gamma of shape k has a coefficient of variation of 1 / sqrt(k).
    EXPECT_NEAR(std::sqrt(var / gaps.size()) / mean, 1 / std::sqrt(shape), 0.08 / std::sqrt(shape))
        << "shape " << shape;
  }
  EXPECT_EQ(arrival_times(5, 0.0, 1.0, 1), std::vector<double>(5, 0.0)) << "inf: all at once";
  EXPECT_EQ(arrival_times(5, INFINITY, 1.0, 1), std::vector<double>(5, 0.0));
  EXPECT_THROW(arrival_times(5, 1.0, 0.0, 1), Error);
}

TEST(BenchLengths, DistributionsParseAndSample) {
  std::mt19937_64 rng(1);
  EXPECT_EQ(LengthDist::parse("128", "--x").sample(rng), 128);
  EXPECT_EQ(LengthDist::parse("fixed:5", "--x").sample(rng), 5);
  const LengthDist u = LengthDist::parse("uniform:2-4", "--x");
  std::set<int32_t> seen;
  for (int i = 0; i < 200; ++i) seen.insert(u.sample(rng));
  EXPECT_EQ(seen, (std::set<int32_t>{2, 3, 4}));
  const LengthDist ln = LengthDist::parse("lognormal:100,0.5", "--x");
  double sum = 0;
  for (int i = 0; i < 20000; ++i) sum += ln.sample(rng);
  EXPECT_NEAR(sum / 20000, 100, 3);
  for (const char* bad : {"uniform:5", "uniform:9-3", "lognormal:100", "gauss:3", "0", "x"}) {
    try {
      LengthDist::parse(bad, "--output-len");
      ADD_FAILURE() << bad;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("--output-len")) << bad;
    }
  }
}

TEST(BenchWorkloads, RandomAndSharedPrefixAreDeterministic) {
  const auto in = LengthDist::parse("uniform:4-8", "i"), out = LengthDist::parse("3", "o");
  const auto a = random_workload(50, in, out, 100, 9);
  const auto b = random_workload(60, in, out, 100, 9);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].prompt_ids, b[i].prompt_ids) << "request i depends on (seed, i) only";
    EXPECT_GE(a[i].prompt_ids.size(), 4u);
    EXPECT_LE(a[i].prompt_ids.size(), 8u);
    for (const int32_t id : a[i].prompt_ids) EXPECT_TRUE(id >= 1 && id < 100);
    EXPECT_EQ(a[i].output_len, 3);
  }
  const auto sp = shared_prefix_workload(12, 3, 16, LengthDist::parse("4", "q"), out, 100, 9);
  for (size_t i = 0; i < sp.size(); ++i) {
    EXPECT_EQ(sp[i].prefix_group, static_cast<int32_t>(i % 3));
    ASSERT_EQ(sp[i].prompt_ids.size(), 20u);
    const std::vector<int32_t> prefix(sp[i].prompt_ids.begin(), sp[i].prompt_ids.begin() + 16);
    const std::vector<int32_t> first(sp[i % 3].prompt_ids.begin(),
                                     sp[i % 3].prompt_ids.begin() + 16);
    EXPECT_EQ(prefix, first) << "a group shares its prefix";
  }
  EXPECT_NE(std::vector<int32_t>(sp[0].prompt_ids.begin(), sp[0].prompt_ids.begin() + 16),
            std::vector<int32_t>(sp[1].prompt_ids.begin(), sp[1].prompt_ids.begin() + 16));
}

TEST(BenchWorkloads, ATraceReplaysAsRecorded) {
  const std::string path = testing::TempDir() + "/trace.jsonl";
  std::ofstream(path) << R"({"timestamp": 100.5, "input_len": 7, "output_len": 4})"
                      << "\n\n"
                      << R"({"timestamp": 100.0, "prompt": "Hello there", "output_len": 2})"
                      << "\n"
                      << R"({"arrival_s": 103.0, "input_len": 3, "output_len": 9})"
                      << "\n";
  const auto items = trace_workload(path, 50, 1, 0.5);
  ASSERT_EQ(items.size(), 3u);
  EXPECT_EQ(items[0].arrival_s, 0.0);
  EXPECT_EQ(items[0].prompt_text, "Hello there");
  EXPECT_DOUBLE_EQ(items[1].arrival_s, 0.25);  // 0.5 s later, replayed twice as fast
  EXPECT_EQ(items[1].prompt_ids.size(), 7u);
  EXPECT_DOUBLE_EQ(items[2].arrival_s, 1.5);
  EXPECT_EQ(items[2].output_len, 9);
  std::ofstream(path) << R"({"timestamp": 1, "input_len": 7})"
                      << "\n";
  try {
    trace_workload(path, 50, 1, 1.0);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("line 1: output_len"));
  }
}

RequestRecord record(double start, double ttft, double e2el, int32_t out, std::string worker) {
  RequestRecord r;
  r.sent = true;
  r.complete = true;
  r.input_tokens = 10;
  r.output_tokens = out;
  r.start_s = start;
  r.ttft_ms = ttft;
  r.e2el_ms = e2el;
  for (int32_t i = 0; i < out; ++i) {
    r.token_s.push_back(start + (ttft + i * (e2el - ttft) / std::max(1, out - 1)) / 1000);
    r.token_n.push_back(1);
    if (i > 0) r.itl_ms.push_back((e2el - ttft) / (out - 1));
  }
  r.workers = {std::move(worker)};
  return r;
}

TEST(BenchReport, KeysFollowVllmAndTheNumbersAddUp) {
  std::vector<RequestRecord> records = {
      record(0.0, 10, 110, 11, "a"), record(0.05, 20, 220, 21, "b"), record(0.1, 30, 330, 31, "a"),
      record(0.2, 40, 140, 1, "b")};
  RequestRecord failed;
  failed.sent = true;
  failed.code = "UNAVAILABLE";
  records.push_back(failed);
  records.push_back(RequestRecord{});  // not sent
  RunInfo info;
  info.backend = "mlaserve-grpc";
  info.num_prompts = 6;
  info.request_rate = 8;
  info.duration_s = 2.0;
  info.max_concurrency = 4;
  info.percentiles = {50, 90, 99};
  info.goodput = Slo::parse("ttft:25,tpot:12");
  info.save_detailed = true;
  const auto r = result_json(info, records);
  for (const char* key : {"date",
                          "backend",
                          "model_id",
                          "tokenizer_id",
                          "num_prompts",
                          "request_rate",
                          "burstiness",
                          "max_concurrency",
                          "duration",
                          "completed",
                          "total_input_tokens",
                          "total_output_tokens",
                          "request_throughput",
                          "request_goodput",
                          "output_throughput",
                          "total_token_throughput",
                          "max_output_tokens_per_s",
                          "max_concurrent_requests",
                          "mean_ttft_ms",
                          "median_ttft_ms",
                          "std_ttft_ms",
                          "p99_ttft_ms",
                          "mean_tpot_ms",
                          "median_tpot_ms",
                          "p99_tpot_ms",
                          "mean_itl_ms",
                          "p99_itl_ms",
                          "mean_e2el_ms",
                          "p90_e2el_ms",
                          "input_lens",
                          "output_lens",
                          "ttfts",
                          "itls",
                          "errors"}) {
    EXPECT_TRUE(r.contains(key)) << key;
  }
  EXPECT_EQ(r["completed"], 4);
  EXPECT_EQ(r["failed"], 1);
  EXPECT_EQ(r["not_sent"], 1);
  EXPECT_EQ(r["errors_by_code"]["UNAVAILABLE"], 1);
  EXPECT_EQ(r["total_output_tokens"], 11 + 21 + 31 + 1);
  int64_t sum = 0;
  for (const auto& n : r["output_lens"]) sum += n.get<int64_t>();
  EXPECT_EQ(sum, 64) << "output_lens include the failed request's 0";
  EXPECT_DOUBLE_EQ(r["output_throughput"].get<double>(), 64 / 2.0);
  EXPECT_DOUBLE_EQ(r["request_throughput"].get<double>(), 4 / 2.0);
  EXPECT_DOUBLE_EQ(r["mean_ttft_ms"].get<double>(), 25.0);
  EXPECT_DOUBLE_EQ(r["median_ttft_ms"].get<double>(), 25.0);        // between 20 and 30
  EXPECT_DOUBLE_EQ(r["p90_ttft_ms"].get<double>(), 30 + 0.7 * 10);  // numpy's linear rule
  EXPECT_DOUBLE_EQ(r["std_ttft_ms"].get<double>(), std::sqrt(125.0));
  // TPOT: 100/10, 200/20, 300/30 = 10 ms each (the 1-token request has none).
  EXPECT_DOUBLE_EQ(r["mean_tpot_ms"].get<double>(), 10.0);
  // Goodput: TTFT <= 25 and TPOT <= 12: the first two requests.
  EXPECT_EQ(r["good_requests"], 2);
  EXPECT_DOUBLE_EQ(r["request_goodput"].get<double>(), 1.0);
  // In flight at 0.2 s: the second (to 0.27), the third (to 0.43) and the fourth.
  EXPECT_EQ(r["max_concurrent_requests"], 3);
  EXPECT_EQ(r["per_worker"]["a"], 2);
  EXPECT_THAT(result_table(r), HasSubstr("Mean TTFT (ms):"));
  EXPECT_THROW(Slo::parse("ttft:0"), Error);
  EXPECT_THROW(Slo::parse("latency:5"), Error);
}

}  // namespace
}  // namespace mla::bench
