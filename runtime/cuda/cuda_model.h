// CudaModel: one tensor-parallel rank's DeepSeek-V2/V3 weights on one GPU (bf16, or an fp8
// checkpoint's linear weights kept fp8 with fp8_weights keep; fp32 norms and router), immutable
// after load; its forward passes run through CudaRunner
// (runtime/cuda/cuda_runner.h), made per cache and group with make_runner(). The layer math is
// runtime/cuda/cuda_step.h; the cache is the same paged latent layout as the CPU model's, kept
// in device memory as bf16 (CacheStorage::kDeviceBf16) or, with `cache.dtype: fp8`, as the
// packed fp8 rows the CPU model's fp8 cache holds (CacheStorage::kDeviceFp8).
//
// Thread-safe (immutable); it lives on the device that was current at load.
#pragma once

#include <memory>
#include <string>

#include "runtime/cuda/device_weights.h"
#include "runtime/cuda/step_buffers.h"
#include "runtime/model.h"
#include "runtime/model_runner.h"

namespace mla {

class CudaModel : public Model {
 public:
  // Loads the checkpoint a layer at a time (fp32 on the host, then bf16 on the device).
  // Throws kInvalidArgument when no GPU is visible or when `naive` absorption asks for the
  // decompressed form with dimensions the decompressed kernel does not take, and what
  // DeepseekModel::load throws for bad checkpoints or plans.
  static std::shared_ptr<CudaModel> load(const std::string& model_dir,
                                         const ModelOptions& options = {});
  ~CudaModel() override;

  CacheStorage cache_storage() const override { return cache_storage_; }
  int cuda_device() const override { return device_; }
  // Pages that fit in memory_fraction of the device memory that is free less what one runner
  // takes (step buffers for CudaRunner::kMaxStepTokens tokens, cuBLAS, stream); logs the size.
  // Made before the engine's runner, so the runner's memory is estimated, not measured.
  int32_t auto_num_pages(int32_t block_size, double memory_fraction) const override;
  std::unique_ptr<ModelRunner> make_runner(LatentCache& cache,
                                           Communicator* comm = nullptr) const override;

  const DeviceWeights& weights() const { return weights_; }
  const CudaOptions& options() const { return options_; }
  // ModelOptions::deterministic: every step batch-invariant (CudaStepContext::batch_invariant);
  // decode steps then run without CUDA graphs.
  bool deterministic() const { return deterministic_; }
  // Bytes of weights on the device (for bandwidth reports).
  int64_t weight_bytes() const { return weights_.bytes; }
  // What a runner's step buffers are sized from, on a device of `num_sms` SMs.
  StepBuffers::Sizing step_sizing(int num_sms) const;

 private:
  CudaModel(ModelConfig config, const ModelOptions& options, ShardPlan shard);

  CudaOptions options_;
  bool deterministic_;
  CacheStorage cache_storage_;
  int device_;
  DeviceWeights weights_;
};

}  // namespace mla
