// `mlaserve bench-tokenizer`: a tokenizer's speed on a text file, line by line: encode MB/s
// (UTF-8 bytes in) and decode tokens/s (each line's ids back to text), best of --repeat
// passes after one warm-up pass. tests/bench/tokenizer_throughput.sh runs Hugging Face
// `tokenizers` on the same lines the same way, for the comparison.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "launch/commands.h"
#include "runtime/tokenizer.h"

namespace mla::launch {
namespace {

struct BenchTokenizerArgs {
  std::string model_dir;
  std::string text_file;
  int repeat = 5;
};

int run_bench_tokenizer(const BenchTokenizerArgs& a) {
  const Tokenizer tok = Tokenizer::load(a.model_dir);
  std::ifstream in(a.text_file);
  MLA_REQUIRE(in.good(), "--text: cannot read {}", a.text_file);
  std::vector<std::string> lines;
  size_t bytes = 0;
  for (std::string line; std::getline(in, line);) {
    bytes += line.size();
    lines.push_back(std::move(line));
  }
  MLA_REQUIRE(!lines.empty(), "--text: {} is empty", a.text_file);
  using Clock = std::chrono::steady_clock;
  std::vector<std::vector<int32_t>> ids(lines.size());
  double best_encode = 1e30, best_decode = 1e30;
  size_t tokens = 0, decoded = 0;
  for (int pass = 0; pass <= a.repeat; ++pass) {  // pass 0 warms up
    const auto t0 = Clock::now();
    for (size_t i = 0; i < lines.size(); ++i) ids[i] = tok.encode(lines[i], false);
    const auto t1 = Clock::now();
    decoded = 0;
    for (const auto& line_ids : ids) decoded += tok.decode(line_ids).size();
    const auto t2 = Clock::now();
    if (pass == 0) continue;
    best_encode = std::min(best_encode, std::chrono::duration<double>(t1 - t0).count());
    best_decode = std::min(best_decode, std::chrono::duration<double>(t2 - t1).count());
  }
  tokens = 0;
  for (const auto& line_ids : ids) tokens += line_ids.size();
  std::cout << fmt::format(
      "mlaserve: {} lines, {} bytes, {} tokens: encode {:.2f} MB/s, decode {:.0f} tokens/s "
      "(best of {}; {} bytes decoded)\n",
      lines.size(), bytes, tokens, bytes / best_encode / 1e6, tokens / best_decode, a.repeat,
      decoded);
  return 0;
}

}  // namespace

void add_bench_tokenizer_command(CLI::App& app, int& exit_code) {
  auto a = std::make_shared<BenchTokenizerArgs>();
  auto* cmd = app.add_subcommand(
      "bench-tokenizer", "A model's tokenizer on a text file: encode MB/s, decode tokens/s");
  cmd->add_option("--model", a->model_dir, "Model directory with tokenizer.json")->required();
  cmd->add_option("--text", a->text_file, "UTF-8 text, one string per line")->required();
  cmd->add_option("--repeat", a->repeat, "Timed passes (best taken)")->capture_default_str();
  cmd->callback([a, &exit_code] { exit_code = run_bench_tokenizer(*a); });
}

}  // namespace mla::launch
