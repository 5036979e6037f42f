// DeepseekModel: the DeepSeek-V2/V3 forward pass on the CPU in fp32 (DESIGN.md section 2),
// reading and writing the paged latent cache.
//
// Under tensor parallelism (DESIGN.md section 5) each rank holds the model for its
// ShardPlan: the attention weights of its H/P heads, 1/P of every dense MLP and of the
// shared experts, E/P of the routed experts; the rest is replicated. Every rank of the
// group calls forward() with the same batch and its own cache shard; the collectives go
// through the Communicator, one all-reduce after attention and one after the FFN, plus the
// query all-gather and partial-output all-to-all when the cache is sequence-sharded.
//
// Immutable after load(); forward() is const and may run concurrently on different caches.
#pragma once

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/shard_plan.h"
#include "runtime/absorption.h"
#include "runtime/latent_cache.h"
#include "runtime/model_config.h"
#include "runtime/model_weights.h"

namespace mla {

class Checkpoint;

struct ModelOptions {
  AbsorbMode absorb = AbsorbMode::kAuto;  // Default: auto.
  CostModel cost;                         // Default: CPU balance (see CostModel).
  bool show_progress = true;              // Progress line while loading. Default: true.
  // This rank's place in its tensor-parallel group. Default: one rank.
  int32_t tp_size = 1;
  int32_t tp_rank = 0;
  KvShard kv_shard = KvShard::kSequence;  // Default: sequence-sharded latent cache.
};

// One sequence's slice of a step: `num_tokens` new tokens at positions
// [start, start + num_tokens), whose pages `table` already holds.
struct ForwardSeq {
  const BlockTable* table = nullptr;
  int32_t start = 0;
  int32_t num_tokens = 0;
  bool want_logits = false;  // return logits of the last new token
};

struct ForwardBatch {
  std::vector<int32_t> tokens;  // the new tokens of every sequence, concatenated in order
  std::vector<ForwardSeq> seqs;
};

// Work done by forward passes, for reports and for tests that check what ran.
struct WorkCounter {
  int64_t weight_flops = 0;        // products with weight matrices (projections, MLP, head)
  int64_t cache_upproj_flops = 0;  // up-projection of cached latents (decompressed form only)
  int64_t attention_flops = 0;     // score and value products over keys
  std::array<int64_t, kNumAttnForms> form_chunks{};  // sequence-steps per attention form
  CommStats comm;                  // collectives issued by the forward passes
  void reset() { *this = WorkCounter{}; }
  void add(const WorkCounter& other);
};

// The collectives of one forward step of `num_tokens` tokens whose sequences all run in a
// latent form (decode; latent chunked prefill), by the CommStats conventions. Per layer:
// an all-reduce of [T, D] after attention and one after the FFN; with a sequence-sharded
// cache also the all-gather of the absorbed queries [T, H, d_c + d_r] and the all-to-all
// of the partial outputs with their LSE [T, H, d_c + 1]. Nothing for one rank.
CommStats predicted_step_comm(const ModelConfig& c, int32_t tp_size, KvShard kv,
                              int64_t num_tokens);

class DeepseekModel {
 public:
  // Loads config.json and the safetensors weights of a Hugging Face model directory and
  // prepares the absorbed matrices the mode needs. Throws mla::Error naming what is wrong.
  // With options.tp_size P > 1 only this rank's shard is read from the checkpoint; throws
  // kInvalidArgument if P does not divide the heads, experts or MLP widths.
  static std::shared_ptr<DeepseekModel> load(const std::string& model_dir,
                                             const ModelOptions& options = {});

  const ModelConfig& config() const { return config_; }
  const FormPolicy& forms() const { return forms_; }
  const ShardPlan& shard() const { return shard_; }
  // Cache layout for this model with pages of `block_size` tokens.
  CacheGeometry cache_geometry(int32_t block_size) const;

  // Runs the new tokens of `batch` through the model: stores each token's latent in
  // `cache` (pages must be reserved; under TP this rank's shard, with the model's plan) and
  // returns the logits [num seqs wanting logits, V] in batch order, on every rank. Adds the
  // work done to `counter` when given. `comm` is the group's communicator (null for P = 1).
  Tensor forward(const ForwardBatch& batch, LatentCache& cache, WorkCounter* counter = nullptr,
                 Communicator* comm = nullptr) const;

 private:
  DeepseekModel(ModelConfig config, const ModelOptions& options, ShardPlan shard);
  void load_weights(Checkpoint& ckpt);
  void prepare_premerged(AttentionWeights& w) const;

  struct StepContext;
  void attention(const LayerWeights& lw, int64_t layer, const float* xn, StepContext& ctx,
                 LatentCache& cache, float* out) const;
  void latent_attention(int64_t layer, StepContext& ctx, const LatentCache& cache,
                        const std::vector<float>& q_local, std::vector<float>& o_lat) const;
  std::vector<float> gather_context(int64_t layer, const ForwardSeq& seq, StepContext& ctx,
                                    const LatentCache& cache) const;
  void moe(const MoeWeights& w, const float* x, int64_t rows, float* out,
           WorkCounter& counter) const;
  void mlp(const MlpWeights& w, const float* x, int64_t rows, float* out,
           WorkCounter& counter) const;

  ModelConfig config_;
  ShardPlan shard_;
  FormPolicy forms_;
  ModelWeights weights_;
  std::vector<float> inv_freq_;
  float rope_factor_;
  float softmax_scale_;
};

}  // namespace mla
