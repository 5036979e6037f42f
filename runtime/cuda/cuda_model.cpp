#include "runtime/cuda/cuda_model.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/fp8_latent.h"
#include "kernels/cuda/mha_prefill.h"
#include "runtime/checkpoint.h"
#include "runtime/cuda/cuda_runner.h"
#include "runtime/cuda/cuda_step.h"
#include "runtime/weight_loader.h"

namespace mla {
namespace {

// Why the decompressed-form kernel cannot run this model's shapes; empty when it can.
std::string decompressed_unsupported(const ModelConfig& c) {
  std::string why = cuda::mha_prefill_unsupported(static_cast<int32_t>(c.qk_nope_head_dim),
                                                  static_cast<int32_t>(c.qk_rope_head_dim),
                                                  static_cast<int32_t>(c.v_head_dim));
  if (why.empty() && c.latent_width() % 8 != 0) {
    why = fmt::format("d_c + d_r = {} is not a multiple of 8", c.latent_width());
  }
  return why;
}

// The form policy weighs FLOPs against weight bytes: left at the CPU default, use the GPU's
// balance (bf16 weights; an H100 does ~300 bf16 FLOPs per byte of HBM traffic).
ModelOptions gpu_options(const ModelOptions& options) {
  ModelOptions gpu = options;
  if (gpu.cost.flops_per_byte == CostModel{}.flops_per_byte &&
      gpu.cost.weight_bytes_per_element == CostModel{}.weight_bytes_per_element) {
    gpu.cost.flops_per_byte = 300;
    gpu.cost.weight_bytes_per_element = 2;
  }
  return gpu;
}

}  // namespace

CudaModel::CudaModel(ModelConfig config, const ModelOptions& options, ShardPlan shard)
    : Model(config, options, shard, decompressed_unsupported(config)),
      options_(options.cuda),
      deterministic_(options.deterministic),
      cache_storage_(options.cache_dtype == CacheDType::kFp8 ? CacheStorage::kDeviceFp8
                                                             : CacheStorage::kDeviceBf16),
      device_(cuda::current_device()) {
  // A decode graph captures the planned split-KV kernel and the small-batch products that a
  // deterministic step replaces.
  if (deterministic_) options_.graphs = false;
}

CudaModel::~CudaModel() {
  // Free the weights on the model's device; a destructor must not throw, so errors are let be.
  int previous = 0;
  const bool known = cudaGetDevice(&previous) == cudaSuccess;
  cudaSetDevice(device_);
  weights_ = DeviceWeights{};
  if (known) cudaSetDevice(previous);
}

std::shared_ptr<CudaModel> CudaModel::load(const std::string& model_dir,
                                           const ModelOptions& options) {
  MLA_REQUIRE(cuda::device_count() > 0, "--device cuda: no CUDA device is visible");
  MLA_REQUIRE(!options.deterministic || options.tp_size <= 2,
              "deterministic on GPUs needs tp <= 2 (got {}): over more ranks the all-reduce's "
              "summation order follows NCCL's algorithm for each message size",
              options.tp_size);
  ModelConfig config = ModelConfig::load(model_dir);
  // The fp8 row's scales are fp32, read in place: every row must keep them 4-byte aligned.
  MLA_REQUIRE(options.cache_dtype != CacheDType::kFp8 ||
                  (config.kv_lora_rank % 4 == 0 && config.qk_rope_head_dim % 2 == 0),
              "cache.dtype fp8 needs kv_lora_rank a multiple of 4 and qk_rope_head_dim even on "
              "the GPU, the model has {} and {}",
              config.kv_lora_rank, config.qk_rope_head_dim);
  check_fp8_weights(model_dir, config, options);
  const ShardPlan shard = plan_for(config, options);
  std::shared_ptr<CudaModel> model(new CudaModel(std::move(config), gpu_options(options), shard));
  const ModelConfig& c = model->config_;
  Checkpoint ckpt = Checkpoint::open(model_dir, c.fp8_block);
  ckpt.set_progress(options.show_progress);
  const bool keep = model->fp8_weights() == Fp8Weights::kKeep;
  WeightLoader loader(ckpt, c, shard, keep);
  model->weights_ = DeviceWeights::upload(loader, c, shard, model->forms_.needs_premerged());
  ckpt.finish_progress();
  const DeviceWeights& w = model->weights_;
  const std::string backend =
      !keep ? "cuda bf16"
            : fmt::format("cuda bf16, {} fp8 weights kept as fp8{}", w.kept_fp8,
                          w.widened_fp8 + loader.widened_fp8() > 0
                              ? fmt::format(" ({} widened to bf16: a shard starting inside a "
                                            "scale block, or an input not in 128-column groups)",
                                            w.widened_fp8 + loader.widened_fp8())
                              : "");
  model->log_loaded(options, backend.c_str());
  spdlog::info("{:.2f} GiB of weights on the GPU", model->weights_.bytes / double(1 << 30));
  return model;
}

std::unique_ptr<ModelRunner> CudaModel::make_runner(LatentCache& cache, Communicator* comm) const {
  return std::make_unique<CudaRunner>(*this, cache, comm);
}

StepBuffers::Sizing CudaModel::step_sizing(int num_sms) const {
  return {.config = &config_,
          .shard = shard_,
          .max_mlp_width = weights_.max_mlp_width,
          .num_sms = num_sms,
          .fp8_max_in = weights_.fp8_max_in,
          .fp8_experts = weights_.fp8_experts};
}

int32_t CudaModel::auto_num_pages(int32_t block_size, double memory_fraction) const {
  MLA_REQUIRE(memory_fraction > 0 && memory_fraction < 1,
              "cache memory fraction must be in (0, 1), got {}", memory_fraction);
  const cuda::DeviceGuard on_device(device_);
  const StepBuffers sizing(step_sizing(cuda::num_sms()));
  const int64_t step_bytes =
      sizing.bytes_for(CudaRunner::kMaxStepTokens, CudaRunner::kMaxStepSeqs) +
      CudaRunner::kFixedBytes;
  const cuda::MemoryInfo mem = cuda::memory_info();
  const int64_t free = std::max<int64_t>(static_cast<int64_t>(mem.free) - step_bytes, 0);
  const int64_t page_bytes = int64_t{block_size} * config_.num_layers *
                             cuda::latent_row_bytes(latent_element(cache_storage_),
                                                    config_.kv_lora_rank, config_.qk_rope_head_dim);
  const auto pages = static_cast<int64_t>(static_cast<double>(free) * memory_fraction) / page_bytes;
  MLA_REQUIRE(pages >= 1,
              "no room for a cache page: {} bytes free after {} for a runner, a page takes {}",
              mem.free, step_bytes, page_bytes);
  const auto n = static_cast<int32_t>(std::min<int64_t>(pages, INT32_MAX));
  spdlog::info(
      "latent cache: {} pages of {} tokens = {:.2f} GiB ({} of {:.2f} GiB free), {} "
      "tokens",
      n, block_size, n * double(page_bytes) / (1 << 30), memory_fraction, free / double(1 << 30),
      int64_t{n} * block_size);
  return n;
}

}  // namespace mla
