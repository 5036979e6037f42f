// Workloads for `mlaserve bench`: what each request asks for (its prompt and output length)
// and when it arrives. Everything is a pure function of the arguments and the seed, so a
// schedule replays exactly against another server.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace mla::bench {

// A distribution of token counts, written "128" or "fixed:128", "uniform:64-256",
// "lognormal:128,0.5" (mean 128 tokens, sigma 0.5 of the log). Samples are at least 1.
struct LengthDist {
  enum class Kind { kFixed, kUniform, kLognormal };
  Kind kind = Kind::kFixed;
  double a = 1;  // fixed: the count; uniform: the low end; lognormal: the mean
  double b = 1;  // uniform: the high end; lognormal: sigma of the log

  // Throws kInvalidArgument naming `flag` for what it cannot read.
  static LengthDist parse(const std::string& spec, const std::string& flag);
  int32_t sample(std::mt19937_64& rng) const;
  double mean() const;
  std::string describe() const;
};

// When n requests arrive, in seconds from the start: all at 0 when rate is 0 or infinite
// (everything at once), else gaps drawn from a gamma distribution of mean 1 / rate and shape
// `burstiness` (1: a Poisson process; below 1 burstier, above 1 more regular), as vLLM's
// `bench serve` draws them.
std::vector<double> arrival_times(int64_t n, double rate, double burstiness, uint64_t seed);

// A comma-separated list of positive numbers, and with allow_inf "inf" (read as 0). Throws
// kInvalidArgument naming `flag` for anything else.
std::vector<double> parse_positive_list(const std::string& list, const char* flag, bool allow_inf);

// A --request-rate list, "1,2.5,inf": requests per second, 0 standing for inf.
inline std::vector<double> parse_rates(const std::string& list) {
  return parse_positive_list(list, "--request-rate", true);
}

struct WorkItem {
  double arrival_s = 0;             // from the start of the run
  std::vector<int32_t> prompt_ids;  // the prompt as ids, or
  std::string prompt_text;          // as text (a trace's prompts)
  int32_t output_len = 1;           // tokens to generate
  int32_t prefix_group = -1;        // shared-prefix workloads: which prefix
};

// n requests with random prompts (ids uniform in [1, vocab)) of `input` tokens and `output`
// tokens to generate. Arrival times are left at 0.
std::vector<WorkItem> random_workload(int64_t n, const LengthDist& input, const LengthDist& output,
                                      int32_t vocab, uint64_t seed);

// `groups` prefixes of `prefix_len` random ids (system prompts, few-shot examples), each
// request one of them followed by a random question of `question` tokens; the prefixes are
// taken in turn, so every group gets n / groups questions.
std::vector<WorkItem> shared_prefix_workload(int64_t n, int32_t groups, int32_t prefix_len,
                                             const LengthDist& question, const LengthDist& output,
                                             int32_t vocab, uint64_t seed);

// A trace replayed as recorded: a JSONL file, one request per line, with its arrival time
// (`arrival_s` or `timestamp`, in seconds; made relative to the earliest request, and the
// requests sorted by it), its prompt (`prompt` as text, or `input_len` tokens of random ids) and
// its `output_len`. Azure's LLM inference traces and BurstGPT convert to it line by line. Times are
// multiplied by `time_scale` (0.5 replays twice as fast). Throws kInvalidArgument naming the line
// and field.
std::vector<WorkItem> trace_workload(const std::string& path, int32_t vocab, uint64_t seed,
                                     double time_scale);

// A workload as the command line names it (`mlaserve bench` and `mlaserve simulate` take the
// same flags: launch/bench_options.h).
struct WorkloadSpec {
  std::string dataset = "random";  // random | shared-prefix | trace
  std::string input_len = "32";    // a LengthDist; shared-prefix: the question after the prefix
  std::string output_len = "16";   // a LengthDist
  int32_t prefix_groups = 8;
  int32_t prefix_len = 256;
  std::string trace;  // a JSONL file (trace_workload)
  double trace_time_scale = 1.0;
};

// n requests of the workload (a trace: its first n); `description` gets one line saying what
// they are. Throws kInvalidArgument naming the flag for what it cannot use.
std::vector<WorkItem> make_workload(const WorkloadSpec& spec, int32_t vocab, int64_t n,
                                    uint64_t seed, std::string* description);

}  // namespace mla::bench
