// Model: one tensor-parallel rank's shard of a DeepSeek checkpoint (docs/ARCHITECTURE.md
// section 6), on the CPU (DeepseekModel, the fp32 reference) or on a GPU (CudaModel, bf16 with
// fp32 accumulation). A model is immutable after load and safe to share between threads; its
// forward passes run through a ModelRunner (runtime/model_runner.h), made once per latent cache
// and group, which holds whatever a backend mutates while running (the GPU's stream, scratch,
// CUDA graphs).
#pragma once

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/moe.h"
#include "kernels/tensor.h"
#include "parallel/communicator.h"
#include "parallel/shard_plan.h"
#include "runtime/absorption.h"
#include "runtime/forward_batch.h"
#include "runtime/latent_cache.h"
#include "runtime/model_config.h"
#include "runtime/sampler.h"

namespace mla {

class ModelRunner;

// What only the CUDA backend reads.
struct CudaOptions {
  // Capture decode steps in CUDA graphs (one per batch-size bucket). Default: true.
  bool graphs = true;
  // Products with at most 2 rows (decode at batch 1 and 2) through mlaserve's small-row
  // kernel, launched as programmatic dependents of the kernel before them, instead of cuBLAS,
  // and the routed experts of steps with at most kMoeGemvMaxSlots (token, expert) slots through
  // the weight-streaming expert kernels instead of the tiled ones. Default: true.
  bool small_gemm = true;
  // At decode's few tokens (kMoeRouteMaxTokens), each MoE layer prefetches into L2, on a second
  // stream once its query and latent products are done, the weights it reads after its attention
  // (o_proj and the shared experts), so that they stream in while the attention's small kernels
  // leave DRAM idle (cuda/l2_prefetch.h). Default: false (not yet measured on a GPU in this form).
  bool prefetch_weights = false;
  // Decode steps of at most kMlaDecodeFusedMaxTokens tokens over contexts of at most
  // kMlaDecodeFusedMaxKeys keys (bf16 cache, every page on this rank, the factored latent form)
  // run the attention from the query to W_UV's output as one kernel (cuda/mla_decode_fused.h)
  // instead of five. Default: false (not yet run on a GPU).
  bool fused_attention = false;
};

// What happens to the linear weights an fp8 checkpoint (DeepSeek-V3/R1's own files) stores in
// fp8 e4m3 with 128x128 block scales (`fp8_weights`).
enum class Fp8Weights : uint8_t {
  kWiden,  // widened at load (fp32 on the CPU, bf16 on the GPU): transformers' dequantised model
  kKeep,   // kept fp8; products quantise activations per row and 128 columns (DeepSeek's fp8
           // inference, kernels/cpu/fp8_gemm.h; on the GPU cuda/fp8_gemm.h, moe_experts_fp8.h).
};
Fp8Weights fp8_weights_from_string(std::string_view name, std::string_view field);  // throws
const char* to_string(Fp8Weights w);  // "widen", "keep"

struct ModelOptions {
  AbsorbMode absorb = AbsorbMode::kAuto;  // Default: auto.
  CostModel cost;                         // Default: CPU balance (see CostModel).
  bool show_progress = true;              // Progress line while loading. Default: true.
  // This rank's place in its tensor-parallel group. Default: one rank.
  int32_t tp_size = 1;
  int32_t tp_rank = 0;
  KvShard kv_shard = KvShard::kSequence;  // Default: sequence-sharded latent cache.
  // Where the forward pass runs: kCpu (fp32 reference) or kCuda (bf16 on the current GPU).
  // Default: kCpu.
  Device device = Device::kCpu;
  CudaOptions cuda;  // Default: see CudaOptions.
  // Each request's logits independent of what else its batch holds and of how its prompt is
  // cut into chunks (batch-invariant products, the latent form only; on the GPU also
  // single-split latent attention, the tiled expert kernels and no decode graphs), so a seeded
  // request samples the same tokens however it is batched, migrated, failed over or served from
  // cached prefix pages. Default: false.
  bool deterministic = false;
  // How the latent cache stores its rows (`cache.dtype`): kAuto, the backend's own (fp32 on the
  // CPU, bf16 on the GPU), or kFp8 (kernels/cpu/fp8_latent.h, on either backend).
  // Default: kAuto.
  CacheDType cache_dtype = CacheDType::kAuto;
  // An fp8 checkpoint's weights (see Fp8Weights); kKeep with a checkpoint that has no fp8
  // weights is refused at load. Default: kWiden.
  Fp8Weights fp8_weights = Fp8Weights::kWiden;
};

// How to pick the token of one sequence that wants logits, and whether to keep its logits.
struct SampleRequest {
  SamplingParams params;
  int64_t position = 0;      // the position the token will take (the draw's counter)
  bool keep_logits = false;  // copy the full logits row back (logprobs, parity tests)
};

// The tokens a step picked, in batch order of the sequences that wanted logits.
struct SampledStep {
  std::vector<int32_t> tokens;
  std::vector<std::vector<float>> logits;  // [tokens.size()]; empty unless keep_logits
};

// The collectives of one forward step of `num_tokens` tokens whose sequences all run in a
// latent form (decode; latent chunked prefill), by the CommStats conventions. Per layer:
// an all-reduce of [T, D] after attention and one after the FFN; with a sequence-sharded
// cache also the all-gather of the absorbed queries [T, H, d_c + d_r] and the all-to-all
// of the partial outputs [T, H, d_c] and of their LSEs [T, H]. Nothing for one rank.
CommStats predicted_step_comm(const ModelConfig& c, int32_t tp_size, KvShard kv,
                              int64_t num_tokens);

class Model {
 public:
  virtual ~Model() = default;

  const ModelConfig& config() const { return config_; }
  const FormPolicy& forms() const { return forms_; }
  const ShardPlan& shard() const { return shard_; }
  // What the model does with an fp8 checkpoint's weights (ModelOptions::fp8_weights).
  Fp8Weights fp8_weights() const { return fp8_weights_; }
  // Cache layout for this model with pages of `block_size` tokens.
  CacheGeometry cache_geometry(int32_t block_size) const;
  // Where this model wants its cache rows: host fp32 or fp8 (CPU), device bf16 (CUDA).
  virtual CacheStorage cache_storage() const { return CacheStorage::kHostF32; }
  // The CUDA device the model (and so its cache) lives on; -1 for a host model.
  virtual int cuda_device() const { return -1; }
  // Pages of `block_size` tokens the cache gets when the deployment asks for an automatic
  // size: for the CUDA model the free device memory times `memory_fraction`; the CPU model
  // has no automatic size and returns 0.
  virtual int32_t auto_num_pages(int32_t block_size, double memory_fraction) const { return 0; }

  // A runner of this model's forward passes on `cache` (made for this model: its geometry,
  // storage and shard plan) for the group `comm` (size and rank those of the shard plan; null
  // for one rank). Throws kInvalidArgument when the cache or the group does not fit the model.
  // The model must outlive the runner.
  virtual std::unique_ptr<ModelRunner> make_runner(LatentCache& cache,
                                                   Communicator* comm = nullptr) const = 0;

 protected:
  // `decompressed_unsupported`: why the backend cannot run the decompressed form for this
  // model's shapes, empty when it can (see FormPolicy).
  Model(ModelConfig config, const ModelOptions& options, ShardPlan shard,
        const std::string& decompressed_unsupported = "");
  // The plan `options` asks for, validated against the model before any weight is read:
  // throws kInvalidArgument if P does not divide the heads, experts or MLP widths.
  static ShardPlan plan_for(const ModelConfig& config, const ModelOptions& options);
  // Throws kInvalidArgument naming fp8_weights when keep is asked of the checkpoint in
  // `model_dir` (`config`) that has no fp8 weights.
  static void check_fp8_weights(const std::string& model_dir, const ModelConfig& config,
                                const ModelOptions& options);
  void log_loaded(const ModelOptions& options, const char* backend) const;

  ModelConfig config_;
  ShardPlan shard_;
  FormPolicy forms_;
  Fp8Weights fp8_weights_;
};

// The kernels' name for a config's router kind.
cpu::MoeGate moe_gate_kind(GateKind g);

// Loads a Hugging Face model directory for options.device: a DeepseekModel on the CPU, a
// CudaModel on the GPU (kFailedPrecondition when this build has no CUDA backend,
// kInvalidArgument when no GPU is visible). Throws mla::Error naming what is wrong.
std::shared_ptr<Model> load_model(const std::string& model_dir, const ModelOptions& options = {});

}  // namespace mla
