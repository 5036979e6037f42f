// Command-line flags shared by the subcommands that run a model (generate, worker): they
// start from the deployment file (--config) and each flag given overrides its field.
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

#include "runtime/deploy_config.h"

namespace mla::launch {

// "1,2,3" -> {1, 2, 3}; throws kInvalidArgument naming `flag` and the bad item.
std::vector<int32_t> parse_ids(const std::string& text, const char* flag = "--prompt-ids");

class DeployFlags {
 public:
  // Adds --config, --model, --absorb, --block-size, --num-pages, --device,
  // --cache-memory-fraction, --no-cuda-graphs, --no-small-gemm, --fused-attention,
  // --prefetch-weights,
  // --max-batch-tokens, --max-running, --tp, --kv-shard and --comm-timeout to `cmd`.
  void add_to(CLI::App& cmd);
  // The config file's settings with the given flags applied. Throws kInvalidArgument when
  // no model directory is named, and what require_directory throws for the one named,
  // prefixed with where it came from (--model, or `model` in the config file).
  DeployConfig resolve() const;

 private:
  CLI::App* cmd_ = nullptr;
  std::string config_path_;
  std::string absorb_ = "auto";
  std::string device_ = "cpu";
  std::string kv_shard_ = "sequence";
  std::string cache_dtype_ = "auto";
  std::string fp8_weights_ = "widen";
  bool no_graphs_ = false;
  bool deterministic_ = false;
  bool prefix_caching_ = false;
  bool no_small_gemm_ = false;
  bool prefetch_weights_ = false;
  bool fused_attention_ = false;
  DeployConfig flags_;  // holds the flag values; only the given ones are applied
};

}  // namespace mla::launch
