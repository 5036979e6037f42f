#include "runtime/model.h"

#include <spdlog/spdlog.h>

#include "kernels/error.h"
#include "runtime/deepseek_model.h"
#if MLA_HAVE_CUDA
#include "runtime/cuda/cuda_model.h"
#endif

namespace mla {

CommStats predicted_step_comm(const ModelConfig& c, int32_t tp_size, KvShard kv,
                              int64_t num_tokens) {
  CommStats stats;
  if (tp_size <= 1) return stats;
  const int64_t f = sizeof(float), T = num_tokens, H = c.num_heads;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    if (kv == KvShard::kSequence) {
      stats.add(CommOp::kAllGather, T * H * c.latent_width() * f);
      stats.add(CommOp::kAllToAll, T * H * c.kv_lora_rank * f);  // partial outputs
      stats.add(CommOp::kAllToAll, T * H * f);                   // their LSEs
    }
    stats.add(CommOp::kAllReduce, T * c.hidden_size * f);
    stats.add(CommOp::kAllReduce, T * c.hidden_size * f);
  }
  return stats;
}

Model::Model(ModelConfig config, const ModelOptions& options, ShardPlan shard,
             const std::string& decompressed_unsupported)
    : config_(std::move(config)),
      shard_(shard),
      forms_(config_, options.absorb, options.cost,
             // The decompressed form's up-projection spans the context up to the chunk's end,
             // so its rows would depend on how a prompt was cut into chunks.
             options.deterministic ? "deterministic: the decompressed form's rows depend on "
                                     "where a prompt's chunk ends"
                                   : decompressed_unsupported,
             options.fp8_weights == Fp8Weights::kKeep),
      fp8_weights_(options.fp8_weights) {}

void Model::check_fp8_weights(const std::string& model_dir, const ModelConfig& config,
                              const ModelOptions& options) {
  MLA_REQUIRE(options.fp8_weights != Fp8Weights::kKeep || config.fp8_checkpoint,
              "fp8_weights keep: {} has no fp8 weights (its config.json has no "
              "quantization_config); use fp8_weights widen",
              model_dir);
}

ShardPlan Model::plan_for(const ModelConfig& config, const ModelOptions& options) {
  const ShardPlan shard(options.tp_size, options.tp_rank, config.num_heads, options.kv_shard);
  const int64_t P = shard.tp_size();
  auto divisible = [&](int64_t n, const char* what) {
    MLA_REQUIRE(n % P == 0, "tensor-parallel size {} does not divide {} ({})", P, what, n);
  };
  divisible(config.intermediate_size, "intermediate_size");
  if (config.n_routed_experts > 0) {
    divisible(config.n_routed_experts, "n_routed_experts");
    divisible(config.n_shared_experts * config.moe_intermediate_size, "the shared experts' width");
  }
  return shard;
}

Fp8Weights fp8_weights_from_string(std::string_view name, std::string_view field) {
  if (name == "widen") return Fp8Weights::kWiden;
  if (name == "keep") return Fp8Weights::kKeep;
  MLA_THROW(kInvalidArgument, "{}: '{}' is not a choice for fp8 weights (widen, keep)", field,
            name);
}

const char* to_string(Fp8Weights w) { return w == Fp8Weights::kKeep ? "keep" : "widen"; }

void Model::log_loaded(const ModelOptions& options, const char* backend) const {
  const ModelConfig& c = config_;
  spdlog::info(
      "loaded {} ({} layers, {} heads, d_c {}, d_r {}, {} experts) on {}, absorption {} ({} "
      "latent weights){}",
      c.family_name(), c.num_layers, c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim,
      c.n_routed_experts, backend, to_string(options.absorb), to_string(forms_.latent_weights()),
      shard_.tp_size() > 1 ? fmt::format(", tp rank {}/{} heads [{}, {})", shard_.tp_rank(),
                                         shard_.tp_size(), shard_.head_begin(), shard_.head_end())
                           : "");
}

CacheGeometry Model::cache_geometry(int32_t block_size) const {
  return CacheGeometry{static_cast<int32_t>(config_.num_layers), block_size,
                       static_cast<int32_t>(config_.kv_lora_rank),
                       static_cast<int32_t>(config_.qk_rope_head_dim)};
}

cpu::MoeGate moe_gate_kind(GateKind g) {
  switch (g) {
    case GateKind::kSoftmaxGreedy:
      return cpu::MoeGate::kSoftmaxGreedy;
    case GateKind::kSoftmaxGroupLimited:
      return cpu::MoeGate::kSoftmaxGroupLimited;
    case GateKind::kSigmoidNoauxTc:
      return cpu::MoeGate::kSigmoidNoauxTc;
  }
  MLA_THROW(kInternal, "unknown gate kind");
}

std::shared_ptr<Model> load_model(const std::string& model_dir, const ModelOptions& options) {
  if (options.device == Device::kCpu) return DeepseekModel::load(model_dir, options);
#if MLA_HAVE_CUDA
  return CudaModel::load(model_dir, options);
#else
  MLA_THROW(kFailedPrecondition,
            "this build has no CUDA backend (nvcc was not found when it was "
            "configured); use --device cpu");
#endif
}

}  // namespace mla
