// `mlaserve generate`: offline generation, one process or a TP group per mpirun slice.
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>

#include "kernels/error.h"
#include "launch/commands.h"
#include "launch/deploy_flags.h"
#include "launch/group_runtime.h"
#include "runtime/tiny_checkpoint.h"

namespace mla::launch {
namespace {


struct GenerateArgs {
  DeployFlags deploy;
  std::string prompt_ids;
  int32_t max_tokens = 16;
  int32_t batch = 1;
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool ignore_eos = false;
};

int run_generate(const GenerateArgs& a) {
  const DeployConfig d = a.deploy.resolve();
  Request req;
  req.prompt = parse_ids(a.prompt_ids);
  req.max_tokens = a.max_tokens;
  req.sampling = {a.temperature, a.top_k, a.top_p, a.seed};
  req.ignore_eos = a.ignore_eos;

  auto rt = GroupRuntime::start(d);
  Engine& engine = *rt->engine;
  if (!engine.is_leader()) {
    engine.follow();
    return 0;
  }
  FollowerRelease release(engine);
  std::vector<RequestId> ids;
  for (int32_t i = 0; i < a.batch; ++i) ids.push_back(engine.add_request(req));

  std::map<RequestId, std::vector<int32_t>> out;
  std::map<RequestId, std::string> reason;
  const auto t0 = std::chrono::steady_clock::now();
  while (engine.has_work()) {
    for (const auto& o : engine.step()) {
      out[o.id].push_back(o.token);
      if (o.finished) reason[o.id] = to_string(o.finish);
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int64_t generated = 0;
  const std::string group =
      rt->groups.num_groups > 1 ? fmt::format("group {} ", rt->groups.group_index) : "";
  for (auto id : ids) {
    std::cout << fmt::format("{}request {} ({}): {}\n", group, id, reason[id],
                             fmt::join(out[id], ","));
    generated += static_cast<int64_t>(out[id].size());
  }
  const auto& st = engine.stats();
  std::cout << fmt::format(
      "{} tokens generated in {:.3f} s: {:.1f} tokens/s ({} steps, {} tokens computed, "
      "{} preemptions; attention forms: decompressed {}, factored {}, premerged {})\n",
      generated, secs, generated / secs, st.steps, st.computed_tokens, st.preemptions,
      st.work.form_chunks[0], st.work.form_chunks[1], st.work.form_chunks[2]);
  return 0;
}

}  // namespace

void add_generate_command(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<GenerateArgs>();
  auto* cmd = app.add_subcommand("generate", "Generate tokens offline from a model directory");
  args->deploy.add_to(*cmd);
  cmd->add_option("--prompt-ids", args->prompt_ids, "Prompt token ids, comma separated")
      ->required();
  cmd->add_option("--max-tokens", args->max_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--batch", args->batch, "Run the prompt as this many concurrent requests")
      ->capture_default_str();
  cmd->add_option("--temperature", args->temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", args->top_k, "0 = off")->capture_default_str();
  cmd->add_option("--top-p", args->top_p, "1 = off")->capture_default_str();
  cmd->add_option("--seed", args->seed, "Sampling seed")->capture_default_str();
  cmd->add_flag("--ignore-eos", args->ignore_eos, "Do not stop at the end-of-sequence token");
  cmd->callback([args, &exit_code] { exit_code = run_generate(*args); });
}

void add_make_tiny_command(CLI::App& app, int& exit_code) {
  struct Args {
    std::string preset = "v3", out_dir, dtype = "F32";
    uint64_t seed = 0;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("make-tiny", "Write a random checkpoint in Hugging Face format");
  cmd->add_option("--preset", args->preset, "v3, v2-lite or v2-lite-full")->capture_default_str();
  cmd->add_option("--out", args->out_dir, "Output directory")->required();
  cmd->add_option("--dtype", args->dtype, "F32, BF16 or F8_E4M3")->capture_default_str();
  cmd->add_option("--seed", args->seed, "Random seed")->capture_default_str();
  cmd->callback([args, &exit_code] {
    const auto t = dtype_from_name(args->dtype);
    if (!t) MLA_THROW(kInvalidArgument, "--dtype `{}` is not F32, BF16 or F8_E4M3", args->dtype);
    write_random_checkpoint(model_preset(args->preset), args->out_dir, args->seed, *t);
    exit_code = 0;
  });
}

}  // namespace mla::launch
