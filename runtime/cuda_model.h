// CudaModel: the DeepSeek-V2/V3 forward pass on one GPU in bf16 with fp32 accumulation
// (docs/ARCHITECTURE.md section 5), on the same paged latent cache layout as the CPU model, kept in
// device memory as bf16 (CacheStorage::kDeviceBf16).
//
// Data flow of a layer: the residual stream x is fp32 [T, D]; RMSNorm writes the bf16
// activations that feed cuBLAS; the latent (c, k_r) of every new token goes to the cache
// pool; attention runs in the step's forms (docs/ARCHITECTURE.md section 5): latent decode through
// the split-KV MLA kernel, latent chunked prefill through the paged prefill kernel,
// decompressed prefill through the MHA kernel over up-projected context; MoE layers route
// on the GPU and run every expert's tokens in two grouped products. Logits are fp32; the
// tokens are picked on the GPU (greedy or top-k/top-p with the (seed, position) draw of
// mla::sample_token), and only they are copied back.
//
// Steps where every sequence decodes one token in a latent form are captured in CUDA
// graphs, one per (batch bucket, page-table width bucket), and replayed. Tensor
// parallelism: each rank holds its shard as the CPU model does and the collectives go
// through the group's Communicator (an NcclCommunicator over device buffers). When the
// communicator can enqueue on the model's stream, TP decode steps are captured too (after
// one uncaptured run of each shape) with their collectives inside the graph.
//
// Not thread-safe: the model owns one stream and its scratch buffers, so one thread at a time
// (the engine's step loop) drives it. It lives on the device that was current at load; every
// entry point makes that device current for its duration, so it may be called from any thread
// (CUDA's current device is per thread).
#pragma once

#include <memory>
#include <string>

#include "runtime/model.h"

namespace mla {

class CudaModel : public Model {
 public:
  // Loads the checkpoint a layer at a time (fp32 on the host, then bf16 on the device).
  // Throws kInvalidArgument when no GPU is visible, and what DeepseekModel::load
  // throws for bad checkpoints or plans.
  static std::shared_ptr<CudaModel> load(const std::string& model_dir,
                                         const ModelOptions& options = {});
  ~CudaModel() override;

  CacheStorage cache_storage() const override { return CacheStorage::kDeviceBf16; }
  int cuda_device() const override;
  // Pages that fit in memory_fraction of the device memory that is free once the model's
  // step buffers (sized for `kMaxStepTokens` tokens) are allocated; logs the size.
  int32_t auto_num_pages(int32_t block_size, double memory_fraction) const override;

  Tensor forward(const ForwardBatch& batch, LatentCache& cache, WorkCounter* counter = nullptr,
                 Communicator* comm = nullptr) const override;
  SampledStep forward_sample(const ForwardBatch& batch, const std::vector<SampleRequest>& requests,
                             LatentCache& cache, WorkCounter* counter = nullptr,
                             Communicator* comm = nullptr) const override;

  // Bytes of weights on the device (for bandwidth reports).
  int64_t weight_bytes() const;
  // Where a step's time goes, summed over the steps run while profiling: the latent decode /
  // prefill attention (its collectives under a sequence-sharded cache included) and every
  // collective of the step, each timed with CUDA events on the model's stream.
  struct StepProfile {
    int64_t steps = 0;
    double attention_ms = 0;
    double collective_ms = 0;
  };
  // While on, steps add to profile(). Decode steps still replay graphs: profiled ones of their
  // own, captured with event record nodes around the sections. Costs two events per section.
  void set_profiling(bool on) const;
  StepProfile profile() const;
  void reset_profile() const;

  // Graphs captured so far (tests check that decode steps replay them).
  int64_t graphs_captured() const;
  int64_t graph_replays() const;

  // Step buffers are sized for this many tokens up front; a larger step grows them.
  static constexpr int64_t kMaxStepTokens = 8192;

  struct Impl;  // device state; defined in cuda_model.cpp

 private:
  CudaModel(ModelConfig config, const ModelOptions& options, ShardPlan shard);
  // Enqueues the step (a graph replay where it can) up to the logits of the sequences that
  // want them (rows in batch order, on the device).
  void run(const ForwardBatch& batch, LatentCache& cache, WorkCounter* counter,
           Communicator* comm) const;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mla
