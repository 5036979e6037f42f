// What `mlaserve bench` measured, as numbers: per-request records in, a result object out
// whose keys follow `vllm bench serve`'s result JSON (`request_throughput`,
// `output_throughput`, `mean_ttft_ms`, `median_ttft_ms`, `std_ttft_ms`, `p99_ttft_ms`, ... for
// ttft, tpot, itl and e2el; with `save_detailed`, the per-request arrays `input_lens`,
// `output_lens`, `ttfts`, `itls`, `errors`), so dashboards that read vLLM's read ours, plus
// mlaserve's own keys (failures by code, per-worker share, requests that moved between
// workers, the timeline the plots draw).
//
// Definitions (as vLLM's): TTFT from the request's start to its first token; TPOT per request
// (e2el - ttft) / (output tokens - 1), for requests with more than one token; ITL every gap
// between consecutive messages with tokens; E2EL start to the last message. Percentiles
// interpolate linearly between ranks (numpy's default); std is the population's.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace mla::bench {

struct RequestRecord {
  bool sent = false;        // false: the run ended before its turn
  std::string code = "OK";  // how the call ended (gRPC status name, or HTTP_<status>)
  bool complete = false;    // OK, ended with a finish reason, all the tokens asked for
  int32_t input_tokens = 0;
  int32_t output_tokens = 0;
  double start_s = 0;  // from the start of the run
  double ttft_ms = 0;  // 0 when no token came
  double e2el_ms = 0;
  std::vector<double> itl_ms;        // gaps between messages with tokens
  std::vector<double> token_s;       // when each message with tokens came (from the run's start)
  std::vector<int32_t> token_n;      // how many tokens each of those messages had
  std::vector<std::string> workers;  // distinct workers that produced its tokens, in order
  double start_lag_ms = 0;           // how late it started against its arrival time
};

// Service-level objectives for goodput: a request counts when it meets every one given.
// Written "ttft:500,tpot:50,e2el:3000" (milliseconds).
struct Slo {
  std::optional<double> ttft_ms, tpot_ms, e2el_ms;
  static Slo parse(const std::string& spec);  // throws kInvalidArgument naming --goodput
  bool empty() const { return !ttft_ms && !tpot_ms && !e2el_ms; }
  bool met(const RequestRecord& r) const;
};

struct RunInfo {
  std::string backend;  // "mlaserve-grpc", "mlaserve-worker" or "openai-http"
  std::string target;   // the address or URL
  std::string model_id;
  std::string workload;  // e.g. "random: input 32, output 16"
  int64_t num_prompts = 0;
  double request_rate = 0;  // 0: all at once (vLLM writes "inf")
  double burstiness = 1;
  int32_t max_concurrency = 0;
  double duration_s = 0;
  std::vector<double> percentiles = {50, 90, 99};
  Slo goodput;
  bool save_detailed = false;
};

// Linear-interpolation percentile of sorted values (0 for none).
double percentile(const std::vector<double>& sorted, double p);

// The result object (see the top of this file).
nlohmann::ordered_json result_json(const RunInfo& info, const std::vector<RequestRecord>& records);

// Where a run's result goes: `path` itself, or in a sweep `path` with ".rateR" (".rateinf")
// before its extension.
std::string result_path_for_rate(const std::string& path, double rate, bool sweep);

// The result as the table `vllm bench serve` prints.
std::string result_table(const nlohmann::ordered_json& result);

}  // namespace mla::bench
