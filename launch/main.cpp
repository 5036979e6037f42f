// The `mlaserve` command: subcommands for offline generation and tooling.
// Errors end the command with a one-line message and a non-zero exit code.
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>

#include <fmt/ranges.h>

#include "kernels/error.h"
#include "parallel/mpi_communicator.h"
#include "parallel/process_groups.h"
#include "runtime/deploy_config.h"
#include "runtime/engine.h"
#include "runtime/tiny_checkpoint.h"

namespace {

std::vector<int32_t> parse_ids(const std::string& s) {
  std::vector<int32_t> ids;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      ids.push_back(std::stoi(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      MLA_THROW(kInvalidArgument, "--prompt-ids: `{}` is not an integer", item);
    }
  }
  return ids;
}

struct GenerateArgs {
  std::string config_path;
  mla::DeployConfig deploy;  // defaults, then the config file, then flags
  std::string absorb = "auto";
  std::string prompt_ids;
  int32_t max_tokens = 16;
  int32_t batch = 1;
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool ignore_eos = false;
  int32_t tp = 1;
  std::string kv_shard = "sequence";
  int32_t comm_timeout_s = 300;
};

// Flags given on the command line override the config file.
mla::DeployConfig resolve_deploy(const GenerateArgs& a, const CLI::App& cmd) {
  mla::DeployConfig d = a.config_path.empty() ? mla::DeployConfig{} : mla::DeployConfig::load(a.config_path);
  auto given = [&](const char* flag) { return cmd.get_option(flag)->count() > 0; };
  if (given("--model")) d.model_dir = a.deploy.model_dir;
  if (given("--absorb")) d.model.absorb = mla::absorb_mode_from_string(a.absorb);
  if (given("--block-size")) d.engine.block_size = a.deploy.engine.block_size;
  if (given("--num-pages")) d.engine.num_pages = a.deploy.engine.num_pages;
  if (given("--max-batch-tokens")) {
    d.engine.scheduler.max_batch_tokens = a.deploy.engine.scheduler.max_batch_tokens;
  }
  if (d.model_dir.empty()) MLA_THROW(kInvalidArgument, "give --model or a --config that names one");
  return d;
}

int run_generate(const GenerateArgs& a, const CLI::App& cmd) {
  mla::DeployConfig d = resolve_deploy(a, cmd);
  const std::vector<int32_t> prompt = parse_ids(a.prompt_ids);
  MLA_REQUIRE(a.kv_shard == "sequence" || a.kv_shard == "replicate",
              "--kv-shard must be sequence or replicate, got `{}`", a.kv_shard);

  // Under mpirun (or with --tp > 1) the world splits into tensor-parallel groups of --tp
  // ranks; each group's leader runs the requests and its followers follow.
  std::optional<mla::MpiSession> mpi;
  mla::ProcessGroups groups;
  std::unique_ptr<mla::MpiCommunicator> comm;
  if (mla::MpiSession::launched_by_mpirun() || a.tp > 1) {
    mpi.emplace();
    groups = mla::split_tp_groups(a.tp);
    spdlog::info("{}", groups.describe());
    comm = std::make_unique<mla::MpiCommunicator>(
        groups.tp_comm.get(), std::chrono::seconds(a.comm_timeout_s), groups.tp_label());
  }
  d.model.tp_size = groups.tp_size;
  d.model.tp_rank = groups.tp_rank;
  d.model.kv_shard = a.kv_shard == "sequence" ? mla::KvShard::kSequence : mla::KvShard::kReplicate;
  d.model.show_progress = groups.world_rank == 0;
  auto model = mla::DeepseekModel::load(d.model_dir, d.model);
  mla::Engine engine(model, d.engine, comm.get());
  if (!engine.is_leader()) {
    engine.follow();
    return 0;
  }
  struct Shutdown {  // followers leave follow() however the leader leaves this scope
    mla::Engine& e;
    ~Shutdown() {
      try {
        e.shutdown();
      } catch (const std::exception& err) {
        spdlog::error("could not stop the followers: {}", err.what());
      }
    }
  } shutdown{engine};

  mla::Request req;
  req.prompt = prompt;
  req.max_tokens = a.max_tokens;
  req.sampling = {a.temperature, a.top_k, a.top_p, a.seed};
  req.ignore_eos = a.ignore_eos;
  std::vector<mla::RequestId> ids;
  for (int32_t i = 0; i < a.batch; ++i) ids.push_back(engine.add_request(req));

  std::map<mla::RequestId, std::vector<int32_t>> out;
  std::map<mla::RequestId, std::string> reason;
  const auto t0 = std::chrono::steady_clock::now();
  while (engine.has_work()) {
    for (const auto& o : engine.step()) {
      out[o.id].push_back(o.token);
      if (o.finished) reason[o.id] = mla::to_string(o.finish);
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int64_t generated = 0;
  for (auto id : ids) {
    std::cout << (groups.num_groups > 1 ? fmt::format("group {} ", groups.group_index) : "")
              << "request " << id << " (" << reason[id]
              << "): " << fmt::format("{}", fmt::join(out[id], ",")) << "\n";
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

int main(int argc, char** argv) {
  CLI::App app{"mlaserve: serving runtime for DeepSeek multi-head latent attention models"};
  app.require_subcommand(1);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")->capture_default_str();

  GenerateArgs g;
  auto* gen = app.add_subcommand("generate", "Generate tokens offline from a model directory");
  gen->add_option("--config", g.config_path, "Deployment config (YAML, see configs/)");
  gen->add_option("--model", g.deploy.model_dir, "Hugging Face model directory");
  gen->add_option("--prompt-ids", g.prompt_ids, "Prompt token ids, comma separated")->required();
  gen->add_option("--max-tokens", g.max_tokens, "Tokens to generate")->capture_default_str();
  gen->add_option("--batch", g.batch, "Run the prompt as this many concurrent requests")
      ->capture_default_str();
  gen->add_option("--absorb", g.absorb, "naive, factored, premerged or auto")->capture_default_str();
  gen->add_option("--block-size", g.deploy.engine.block_size, "Tokens per cache page")
      ->capture_default_str();
  gen->add_option("--num-pages", g.deploy.engine.num_pages, "Cache pages")->capture_default_str();
  gen->add_option("--max-batch-tokens", g.deploy.engine.scheduler.max_batch_tokens,
                  "Token budget per step")
      ->capture_default_str();
  gen->add_option("--temperature", g.temperature, "0 = greedy")->capture_default_str();
  gen->add_option("--top-k", g.top_k, "0 = off")->capture_default_str();
  gen->add_option("--top-p", g.top_p, "1 = off")->capture_default_str();
  gen->add_option("--seed", g.seed, "Sampling seed")->capture_default_str();
  gen->add_flag("--ignore-eos", g.ignore_eos, "Do not stop at the end-of-sequence token");
  gen->add_option("--tp", g.tp, "Tensor-parallel group size (under mpirun: N / tp groups)")
      ->capture_default_str();
  gen->add_option("--kv-shard", g.kv_shard,
                  "Latent cache under TP: sequence (each rank its pages) or replicate")
      ->capture_default_str();
  gen->add_option("--comm-timeout", g.comm_timeout_s, "Seconds before a collective fails")
      ->capture_default_str();

  std::string preset = "v3", out_dir, dtype = "F32";
  uint64_t seed = 0;
  auto* tiny = app.add_subcommand("make-tiny", "Write a random checkpoint in Hugging Face format");
  tiny->add_option("--preset", preset, "v3, v2-lite or v2-lite-full")->capture_default_str();
  tiny->add_option("--out", out_dir, "Output directory")->required();
  tiny->add_option("--dtype", dtype, "F32, BF16 or F8_E4M3")->capture_default_str();
  tiny->add_option("--seed", seed, "Random seed")->capture_default_str();

  CLI11_PARSE(app, argc, argv);
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
  try {
    if (*gen) return run_generate(g, *gen);
    if (*tiny) {
      auto t = mla::dtype_from_name(dtype);
      if (!t) MLA_THROW(kInvalidArgument, "--dtype `{}` is not F32, BF16 or F8_E4M3", dtype);
      mla::write_random_checkpoint(mla::model_preset(preset), out_dir, seed, *t);
      return 0;
    }
  } catch (const mla::Error& e) {
    std::cerr << "mlaserve: error: " << e.what() << " [" << mla::error_code_name(e.code()) << "]\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "mlaserve: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
