// `mlaserve generate`: offline generation, one process or a TP group per mpirun slice.
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>

#include "kernels/error.h"
#include "launch/commands.h"
#include "launch/deploy_flags.h"
#include "launch/group_runtime.h"
#include "runtime/tensor_dump.h"
#include "runtime/text_stream.h"
#include "runtime/tiny_checkpoint.h"
#include "runtime/tokenizer.h"
#if MLA_HAVE_CUDA
#include "kernels/cuda/fp8_latent.h"
#include "runtime/cuda/cuda_model.h"
#include "runtime/cuda/cuda_step.h"
#endif

namespace mla::launch {
namespace {

// Token ids in [1, min(vocab_size, 30000)) from a fixed generator: a benchmark prompt. The
// cap keeps real vocabularies' special tokens, which sit at the top, out of the prompt.
std::vector<int32_t> random_prompt(int32_t len, uint64_t seed, int64_t vocab_size) {
  MLA_REQUIRE(vocab_size >= 2, "--prompt-len needs a vocabulary of 2 or more ids, not {}",
              vocab_size);
  const uint64_t ids_above_0 = static_cast<uint64_t>(std::min<int64_t>(vocab_size, 30000) - 1);
  std::mt19937_64 rng(seed ^ 0x5eed);
  std::vector<int32_t> ids(len);
  for (auto& id : ids) id = 1 + static_cast<int32_t>(rng() % ids_above_0);
  return ids;
}

// Bytes one decode step of `batch` requests reads on the GPU: every weight but the
// embedding table (one row per request) and the routed experts nobody picked (exact for
// batch 1: top_k experts per MoE layer; the expected number of distinct experts under
// uniform routing otherwise), plus the latent cache of every request. 0 for the CPU model.
double decode_step_bytes(const Model& model, int64_t batch, int64_t context) {
#if MLA_HAVE_CUDA
  const auto* cuda = dynamic_cast<const CudaModel*>(&model);
  if (cuda == nullptr) return 0;
  const ModelConfig& c = model.config();
  double bytes = static_cast<double>(cuda->weight_bytes());
  bytes -= static_cast<double>(c.vocab_size) * c.hidden_size * 2;  // embedding rows
  bytes += static_cast<double>(batch) * c.hidden_size * 2;
  if (c.n_routed_experts > 0) {
    const double E = static_cast<double>(c.n_routed_experts) / model.shard().tp_size();
    const double K = static_cast<double>(c.num_experts_per_tok);
    const double used = batch == 1 ? K : E * (1 - std::pow(1 - K / c.n_routed_experts, batch));
    // bf16, or e4m3 with an fp32 scale per 128 (fp8_weights keep).
    const double element = cuda->weights().fp8_experts ? 1.0 + 4.0 / 128 : 2.0;
    const double expert = 3.0 * c.hidden_size * c.moe_intermediate_size * element;
    int64_t moe_layers = 0;
    for (int64_t l = 0; l < c.num_layers; ++l) moe_layers += c.is_moe_layer(l) ? 1 : 0;
    bytes -= moe_layers * (E - std::min(E, used)) * expert;
  }
  bytes += static_cast<double>(batch) * context * c.num_layers *
           cuda::latent_row_bytes(latent_element(cuda->cache_storage()), c.kv_lora_rank,
                                  c.qk_rope_head_dim);
  return bytes;
#else
  return 0;
#endif
}

struct GenerateArgs {
  DeployFlags deploy;
  std::string prompt;  // text, through the model's tokenizer
  std::vector<std::string> stop;
  std::string prompt_ids;
  int32_t prompt_len = 0;
  double copy_gbps = 0;
  int32_t max_tokens = 16;
  std::string batches = "1";
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool ignore_eos = false;
  std::string dump_dir;
};

// Runs `batch` copies of `req` to completion and prints tokens and timings; with a tokenizer,
// each request's text too (ending it at the first stop string).
void run_batch(const GenerateArgs& a, const GroupRuntime& rt, const Request& req, int32_t batch,
               const Tokenizer* tokenizer) {
  Engine& engine = *rt.engine;
  std::vector<RequestId> ids;
  for (int32_t i = 0; i < batch; ++i) {
    // Benchmark prompts differ per request, so the batch routes like real traffic.
    Request r = req;
    if (a.prompt_len > 0) {
      r.prompt = random_prompt(a.prompt_len, a.seed + i, rt.model->config().vocab_size);
    }
    ids.push_back(engine.add_request(r));
  }
  const EngineStats before = engine.stats();

  std::map<RequestId, std::vector<int32_t>> out;
  std::map<RequestId, std::string> reason, text;
  std::map<RequestId, TextStream> streams;
  if (tokenizer) {
    for (RequestId id : ids) streams.emplace(id, TextStream(*tokenizer, a.stop));
  }
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  // Decode phase: once every request has its first token, each step is one decode token per
  // running request.
  std::optional<Clock::time_point> decode_start;
  int64_t decode_tokens = 0;
  std::vector<double> decode_steps;
  while (engine.has_work()) {
    const auto s0 = Clock::now();
    const auto outputs = engine.step();
    const auto s1 = Clock::now();
    if (decode_start) {
      decode_tokens += static_cast<int64_t>(outputs.size());
      decode_steps.push_back(std::chrono::duration<double>(s1 - s0).count());
    }
    for (const auto& o : outputs) {
      out[o.id].push_back(o.token);
      if (o.finished) reason[o.id] = to_string(o.finish);
      auto s = streams.find(o.id);
      if (s == streams.end() || s->second.stopped()) continue;
      text[o.id] += s->second.push(o.token);
      if (s->second.stopped() && !o.finished) {
        engine.cancel(o.id);
        reason[o.id] = "stop string";
      }
    }
    if (!decode_start && out.size() == ids.size()) decode_start = s1;
  }
  const auto t1 = Clock::now();
  const double secs = std::chrono::duration<double>(t1 - t0).count();
  int64_t generated = 0;
  const std::string group =
      rt.groups.num_groups > 1 ? fmt::format("group {} ", rt.groups.group_index) : "";
  for (auto id : ids) {
    std::cout << fmt::format("{}request {} ({}): {}\n", group, id, reason[id],
                             fmt::join(out[id], ","));
    if (tokenizer) {
      text[id] += streams.at(id).finish();
      std::cout << fmt::format("{}request {} text: {}\n", group, id,
                               nlohmann::json(text[id]).dump());
    }
    generated += static_cast<int64_t>(out[id].size());
  }
  EngineStats st = engine.stats();
  st.steps -= before.steps;
  st.computed_tokens -= before.computed_tokens;
  st.preemptions -= before.preemptions;
  for (int f = 0; f < kNumAttnForms; ++f) st.work.form_chunks[f] -= before.work.form_chunks[f];
  std::cout << fmt::format(
      "batch {}: {} tokens generated in {:.3f} s: {:.1f} tokens/s ({} steps, {} tokens computed, "
      "{} preemptions; attention forms: latent {} ({} weights), decompressed {})\n",
      batch, generated, secs, generated / secs, st.steps, st.computed_tokens, st.preemptions,
      st.work.chunks(AttnForm::kLatent), to_string(engine.model().forms().latent_weights()),
      st.work.chunks(AttnForm::kDecompressed));
  if (decode_start && !decode_steps.empty()) {
    const double prefill = std::chrono::duration<double>(*decode_start - t0).count();
    const double decode = std::chrono::duration<double>(t1 - *decode_start).count();
    std::sort(decode_steps.begin(), decode_steps.end());
    const double median = decode_steps[decode_steps.size() / 2];
    std::cout << fmt::format(
        "prefill {:.3f} s (first token of all {} requests); decode {} tokens in {:.3f} s: "
        "{:.1f} tokens/s, median step {:.3f} ms\n",
        prefill, ids.size(), decode_tokens, decode, decode_tokens / decode, median * 1e3);
    const int64_t context = static_cast<int64_t>(req.prompt.size()) + a.max_tokens / 2;
    const double bytes = decode_step_bytes(*rt.model, batch, context);
    if (bytes > 0) {
      std::cout << fmt::format(
          "decode step reads {:.3f} GB (weights{} + cache at mean context {}): {:.1f} GB/s{}\n",
          bytes / 1e9, batch == 1 ? "" : " (experts estimated)", context, bytes / median / 1e9,
          a.copy_gbps > 0 ? fmt::format(", {:.1f} % of the {:.0f} GB/s copy bandwidth",
                                        100 * bytes / median / 1e9 / a.copy_gbps, a.copy_gbps)
                          : "");
    }
  }
}

int run_generate(const GenerateArgs& a) {
  DeployConfig d = a.deploy.resolve();
  MLA_REQUIRE(!a.prompt_ids.empty() + !a.prompt.empty() + (a.prompt_len != 0) == 1,
              "give exactly one of --prompt, --prompt-ids and --prompt-len");
  Request req;
  std::optional<Tokenizer> tokenizer;
  if (!a.prompt.empty()) {
    tokenizer.emplace(Tokenizer::load(d.model_dir));
    req.prompt = tokenizer->encode(a.prompt);
  } else if (a.prompt_len == 0) {
    req.prompt = parse_ids(a.prompt_ids);
  }
  MLA_REQUIRE(a.stop.empty() || tokenizer, "--stop needs a text --prompt");
  std::optional<TensorDump> dump;
  if (!a.dump_dir.empty()) {
    MLA_REQUIRE(a.prompt_len == 0 && a.batches == "1",
                "--dump-tensors takes one prompt given with --prompt-ids, run once (--batch 1)");
    // The dump keeps each tensor's first forward pass: the whole prompt, in one chunk.
    auto& budget = d.engine.scheduler.max_batch_tokens;
    budget = std::max<int32_t>(budget, static_cast<int32_t>(req.prompt.size()));
    dump.emplace(a.dump_dir);
  }
  req.max_tokens = a.max_tokens;
  req.sampling = {a.temperature, a.top_k, a.top_p, a.seed};
  req.ignore_eos = a.ignore_eos;

  auto rt = GroupRuntime::start(d);
  if (a.prompt_len > 0) {
    req.prompt = random_prompt(a.prompt_len, a.seed, rt->model->config().vocab_size);
  }
  Engine& engine = *rt->engine;
  if (!engine.is_leader()) {
    engine.follow();
    return 0;
  }
  FollowerRelease release(engine);
  if (dump) engine.runner().set_dump(&*dump);
  for (int32_t batch : parse_ids(a.batches, "--batch")) {
    MLA_REQUIRE(batch >= 1, "--batch sizes must be >= 1, got {}", batch);
    run_batch(a, *rt, req, batch, tokenizer ? &*tokenizer : nullptr);
  }
  if (dump) {
    engine.runner().set_dump(nullptr);
    std::cout << fmt::format("dumped {} tensors to {}\n", dump->files().size(), dump->dir());
  }
  return 0;
}

}  // namespace

void add_generate_command(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<GenerateArgs>();
  auto* cmd = app.add_subcommand("generate", "Generate tokens offline from a model directory");
  args->deploy.add_to(*cmd);
  cmd->add_option("--prompt", args->prompt,
                  "Prompt text, through the model directory's tokenizer.json (prints the text "
                  "generated too)");
  cmd->add_option("--stop", args->stop,
                  "With --prompt: end a request at this text (not printed); repeatable");
  cmd->add_option("--prompt-ids", args->prompt_ids, "Prompt token ids, comma separated");
  cmd->add_option("--prompt-len", args->prompt_len,
                  "Instead of --prompt-ids: a random prompt of this many tokens (benchmarks)");
  cmd->add_option("--copy-gbps", args->copy_gbps,
                  "Device copy bandwidth (GB/s, from bench-kernels) to report the decode "
                  "step's bandwidth utilisation against");
  cmd->add_option("--max-tokens", args->max_tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--batch", args->batches,
                  "Run the prompt as this many concurrent requests; a list (1,16,64) runs "
                  "each in turn in the same engine")
      ->capture_default_str();
  cmd->add_option("--temperature", args->temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", args->top_k, "0 = off")->capture_default_str();
  cmd->add_option("--top-p", args->top_p, "1 = off")->capture_default_str();
  cmd->add_option("--seed", args->seed, "Sampling seed")->capture_default_str();
  cmd->add_flag("--ignore-eos", args->ignore_eos, "Do not stop at the end-of-sequence token");
  cmd->add_option("--dump-tensors", args->dump_dir,
                  "Write the prompt's named per-layer intermediates to this (new) directory as "
                  ".npy, to compare with transformers (tests/parity/README.md); one rank");
  cmd->callback([args, &exit_code] { exit_code = run_generate(*args); });
}

void add_make_tiny_command(CLI::App& app, int& exit_code) {
  struct Args {
    std::string preset = "v3", out_dir, dtype = "F32";
    uint64_t seed = 0;
    int64_t layers = 0;
    int64_t expert_ranks = 1;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("make-tiny", "Write a random checkpoint in Hugging Face format");
  cmd->add_option("--preset", args->preset,
                  "v3, v2-lite (tiny), v2-lite-full or v3-full (published shapes)")
      ->capture_default_str();
  cmd->add_option("--out", args->out_dir, "Output directory")->required();
  cmd->add_option("--dtype", args->dtype, "F32, BF16 or F8_E4M3")->capture_default_str();
  cmd->add_option("--seed", args->seed, "Random seed")->capture_default_str();
  cmd->add_option("--layers", args->layers,
                  "Keep only this many decoder layers (0: the preset's), e.g. a few layers of a "
                  "full-size shape for kernel and step benchmarks");
  cmd->add_option("--for-emulated-tp", args->expert_ranks,
                  "Write only the routed experts rank 0 of a group of this many ranks loads, for "
                  "`mlaserve profile --emulate --tp N` (a full-size MoE shape too large to write "
                  "whole; no other rank or TP size can load it)")
      ->capture_default_str();
  cmd->callback([args, &exit_code] {
    const auto t = dtype_from_name(args->dtype);
    if (!t) MLA_THROW(kInvalidArgument, "--dtype `{}` is not F32, BF16 or F8_E4M3", args->dtype);
    ModelConfig config = model_preset(args->preset);
    if (args->layers > 0) {
      MLA_REQUIRE(args->layers <= config.num_layers, "--layers {} above the preset's {}",
                  args->layers, config.num_layers);
      config.num_layers = args->layers;
    }
    write_random_checkpoint(config, args->out_dir, args->seed, *t, args->expert_ranks);
    exit_code = 0;
  });
}

}  // namespace mla::launch
