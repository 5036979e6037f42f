// DeepseekModel: the DeepSeek-V2/V3 forward pass on the CPU in fp32 (docs/ARCHITECTURE.md section
// 5), reading and writing the paged latent cache: the reference every other backend is tested
// against. Notation as in runtime/model_config.h; the layer is the one runtime/cuda/cuda_step.h
// spells out, in the same order and with the same names.
//
// Under tensor parallelism (docs/ARCHITECTURE.md section 6) each rank holds the model for its
// ShardPlan: the attention weights of its H/P heads, 1/P of every dense MLP and of the
// shared experts, E/P of the routed experts; the rest is replicated. Every rank of the
// group runs the same batch on its own cache shard; the collectives go
// through the Communicator, one all-reduce after attention and one after the FFN, plus the
// query all-gather and all-to-alls of the partial outputs and their LSEs when the cache is
// sequence-sharded.
//
// Immutable after load(); its runners (make_runner) may run concurrently on different caches.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "runtime/model.h"
#include "runtime/model_runner.h"
#include "runtime/model_weights.h"

namespace mla {

class Checkpoint;
class TensorDump;

class DeepseekModel : public Model {
 public:
  // Loads config.json and the safetensors weights of a Hugging Face model directory and
  // prepares the absorbed matrices the mode needs (options.device is ignored: this is the
  // CPU model). Throws mla::Error naming what is wrong. With options.tp_size P > 1 only
  // this rank's shard is read from the checkpoint; throws kInvalidArgument if P does not
  // divide the heads, experts or MLP widths.
  static std::shared_ptr<DeepseekModel> load(const std::string& model_dir,
                                             const ModelOptions& options = {});

  std::unique_ptr<ModelRunner> make_runner(LatentCache& cache,
                                           Communicator* comm = nullptr) const override;
  CacheStorage cache_storage() const override { return cache_storage_; }
  // Bytes of the weights this rank holds (kept fp8 weights: their e4m3 bytes and scales).
  size_t weight_bytes() const { return weights_.nbytes(); }

 private:
  friend class DeepseekRunner;
  Tensor forward(const ForwardBatch& batch, LatentCache& cache, WorkCounter* counter,
                 Communicator* comm, TensorDump* dump) const;
  DeepseekModel(ModelConfig config, const ModelOptions& options, ShardPlan shard);
  // Reads this rank's weights; returns what fp8_weights keep kept ("" without it), for the log.
  std::string load_weights(Checkpoint& ckpt);

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
  // y[rows, out] = x[rows, in] * w^T (+ beta * y), counting the FLOPs; batch-invariant with
  // ModelOptions::deterministic (an fp8 weight's product always is).
  void linear(const float* x, int64_t rows, const LinearWeight& w, float* y, WorkCounter& counter,
              float beta = 0.0f) const;

  ModelWeights weights_;
  bool batch_invariant_;
  CacheStorage cache_storage_;  // host fp32, or fp8 with ModelOptions::cache_dtype kFp8
  std::vector<float> inv_freq_;
  float rope_factor_;
  float softmax_scale_;
};

}  // namespace mla
