// DeepseekModel: the DeepSeek-V2/V3 forward pass on the CPU in fp32 (DESIGN.md section 2),
// reading and writing the paged latent cache.
//
// Immutable after load(); forward() is const and may run concurrently on different caches.
#pragma once

#include <array>
#include <memory>
#include <string>
#include <vector>

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
  void reset() { *this = WorkCounter{}; }
};

class DeepseekModel {
 public:
  // Loads config.json and the safetensors weights of a Hugging Face model directory and
  // prepares the absorbed matrices the mode needs. Throws mla::Error naming what is wrong.
  static std::shared_ptr<DeepseekModel> load(const std::string& model_dir,
                                             const ModelOptions& options = {});

  const ModelConfig& config() const { return config_; }
  const FormPolicy& forms() const { return forms_; }
  // Cache layout for this model with pages of `block_size` tokens.
  CacheGeometry cache_geometry(int32_t block_size) const;

  // Runs the new tokens of `batch` through the model: stores each token's latent in
  // `cache` (pages must be reserved) and returns the logits [num seqs wanting logits, V]
  // in batch order. Adds the work done to `counter` when given.
  Tensor forward(const ForwardBatch& batch, LatentCache& cache,
                 WorkCounter* counter = nullptr) const;

 private:
  DeepseekModel(ModelConfig config, const ModelOptions& options);
  void load_weights(Checkpoint& ckpt);
  void prepare_premerged(AttentionWeights& w) const;

  struct StepContext;
  void attention(const LayerWeights& lw, int64_t layer, const float* xn, StepContext& ctx,
                 LatentCache& cache, float* out) const;
  void moe(const MoeWeights& w, const float* x, int64_t rows, float* out,
           WorkCounter& counter) const;
  void mlp(const MlpWeights& w, const float* x, int64_t rows, float* out,
           WorkCounter& counter) const;

  ModelConfig config_;
  FormPolicy forms_;
  ModelWeights weights_;
  std::vector<float> inv_freq_;
  float rope_factor_;
  float softmax_scale_;
};

}  // namespace mla
