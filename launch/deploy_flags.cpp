#include "launch/deploy_flags.h"

#include <sstream>

#include "runtime/paths.h"

namespace mla::launch {

std::vector<int32_t> parse_ids(const std::string& text, const char* flag) {
  std::vector<int32_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      ids.push_back(std::stoi(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      MLA_THROW(kInvalidArgument, "{}: `{}` is not an integer", flag, item);
    }
  }
  return ids;
}

void DeployFlags::add_to(CLI::App& cmd) {
  cmd_ = &cmd;
  cmd.add_option("--config", config_path_, "Deployment config (YAML, see configs/)");
  cmd.add_option("--model", flags_.model_dir, "Hugging Face model directory");
  cmd.add_option("--absorb", absorb_, "naive, factored, premerged or auto")->capture_default_str();
  cmd.add_option("--block-size", flags_.engine.block_size, "Tokens per cache page")
      ->capture_default_str();
  cmd.add_option("--num-pages", flags_.engine.num_pages,
                 "Cache pages per rank (0: size the cache from free GPU memory). Default: 256 "
                 "with --device cpu, 0 with --device cuda")
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--device", device_, "cpu (fp32 reference) or cuda (bf16 on the GPU)")
      ->capture_default_str();
  cmd.add_option("--cache-dtype", cache_dtype_,
                 "auto (fp32 on the CPU, bf16 on the GPU) or fp8 (e4m3 latents with a scale per "
                 "128, bf16 rotary keys: ~1.75x bf16's context)")
      ->capture_default_str();
  cmd.add_option("--fp8-weights", fp8_weights_,
                 "An fp8 checkpoint's weights: widen (to fp32 on the CPU, bf16 on the GPU) or keep "
                 "(e4m3 with block scales, activations quantised per 128)")
      ->capture_default_str();
  cmd.add_option("--cache-memory-fraction", flags_.engine.cache_memory_fraction,
                 "With --num-pages 0: share of free GPU memory for the cache")
      ->capture_default_str();
  cmd.add_flag("--no-cuda-graphs", no_graphs_, "Run decode steps without CUDA graphs");
  cmd.add_flag("--deterministic", deterministic_,
               "Batch-invariant logits: a request samples the same tokens however it is batched");
  cmd.add_flag("--prefix-caching", prefix_caching_,
               "Keep full cache pages for later requests with the same leading tokens (tp 1)");
  cmd.add_flag("--no-small-gemm", no_small_gemm_,
               "Run products with few rows through cuBLAS and the tiled expert kernels, not the "
               "small-row kernels");
  cmd.add_flag("--fused-attention", fused_attention_,
               "Decode at few tokens, short contexts: run the attention as one kernel, not five "
               "(W_UK^T, RoPE, split-KV attention and combine, W_UV)");
  cmd.add_flag("--prefetch-weights", prefetch_weights_,
               "Decode at few tokens: prefetch each MoE layer's o_proj and shared-expert weights "
               "into L2, on a second stream beside its attention");
  cmd.add_option("--max-batch-tokens", flags_.engine.scheduler.max_batch_tokens,
                 "Token budget per step")
      ->capture_default_str();
  cmd.add_option("--max-running", flags_.engine.scheduler.max_running,
                 "Sequences in one step at most")
      ->capture_default_str();
  cmd.add_option("--tp", flags_.parallel.tp,
                 "Tensor-parallel group size (under mpirun: N / tp groups)")
      ->capture_default_str();
  cmd.add_option("--kv-shard", kv_shard_,
                 "Latent cache under TP: sequence (each rank its pages) or replicate")
      ->capture_default_str();
  cmd.add_option("--comm-timeout", flags_.parallel.comm_timeout_s,
                 "Seconds before a collective fails")
      ->capture_default_str();
}

DeployConfig DeployFlags::resolve() const {
  DeployConfig d = config_path_.empty() ? DeployConfig{} : DeployConfig::load(config_path_);
  auto given = [&](const char* flag) { return cmd_->get_option(flag)->count() > 0; };
  if (given("--model")) d.model_dir = flags_.model_dir;
  if (given("--absorb")) d.model.absorb = absorb_mode_from_string(absorb_);
  if (given("--block-size")) d.engine.block_size = flags_.engine.block_size;
  if (given("--num-pages")) d.engine.num_pages = flags_.engine.num_pages;
  if (given("--device")) d.model.device = device_from_string(device_);
  if (given("--cache-dtype")) {
    d.model.cache_dtype = cache_dtype_from_string(cache_dtype_, "--cache-dtype");
  }
  if (given("--fp8-weights")) {
    d.model.fp8_weights = fp8_weights_from_string(fp8_weights_, "--fp8-weights");
  }
  if (given("--cache-memory-fraction")) {
    d.engine.cache_memory_fraction = flags_.engine.cache_memory_fraction;
  }
  if (no_graphs_) d.model.cuda.graphs = false;
  if (deterministic_) d.model.deterministic = true;
  if (prefix_caching_) d.engine.prefix_caching = true;
  if (no_small_gemm_) d.model.cuda.small_gemm = false;
  if (prefetch_weights_) d.model.cuda.prefetch_weights = true;
  if (fused_attention_) d.model.cuda.fused_attention = true;
  if (given("--max-batch-tokens")) {
    d.engine.scheduler.max_batch_tokens = flags_.engine.scheduler.max_batch_tokens;
  }
  if (given("--max-running")) d.engine.scheduler.max_running = flags_.engine.scheduler.max_running;
  if (given("--tp")) d.parallel.tp = flags_.parallel.tp;
  if (given("--kv-shard")) d.parallel.kv_shard = kv_shard_from_string(kv_shard_, "--kv-shard");
  if (given("--comm-timeout")) d.parallel.comm_timeout_s = flags_.parallel.comm_timeout_s;
  if (d.model_dir.empty()) MLA_THROW(kInvalidArgument, "give --model or a --config that names one");
  try {
    require_directory(d.model_dir, "model directory");
  } catch (const Error& e) {
    const std::string source =
        given("--model") ? "--model " + d.model_dir : fmt::format("`model` in {}", config_path_);
    throw Error(e.code(), source + ": " + e.what());
  }
  return d;
}

}  // namespace mla::launch
