// CudaRunner: the ModelRunner of a CudaModel. Owns everything a GPU step mutates: the stream,
// cuBLAS, the step buffers and metadata staging, the CUDA-graph cache and the step profiler,
// all on the model's device, bound to one latent cache and one group for its whole life.
//
// A step: BatchLayout (validation, forms) -> pack_step (metadata, buffers grown) -> one upload
// of the metadata -> CudaStep enqueued, or its graph replayed (pure decode steps) -> sampling on
// the GPU -> the tokens copied back. Collectives that the communicator can enqueue on the
// runner's stream need no host syncs and are captured inside decode graphs.
//
// Not thread-safe: one thread drives a runner. Every entry point makes the model's device
// current for its duration, so that thread may be any thread.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <vector>

#include "kernels/cuda/gemm.h"
#include "runtime/cuda/graph_cache.h"
#include "runtime/cuda/step_buffers.h"
#include "runtime/cuda/step_profiler.h"
#include "runtime/model_runner.h"

namespace mla {

class CudaModel;

class CudaRunner final : public ModelRunner {
 public:
  // The step size CudaModel::auto_num_pages leaves device memory for (buffers grow with the
  // steps that run; a larger step still runs where memory allows).
  static constexpr int64_t kMaxStepTokens = 8192;
  static constexpr int64_t kMaxStepSeqs = 256;
  // What a runner holds besides its step buffers: cuBLAS's handle and 32 MiB workspace, the
  // stream, graphs, with headroom.
  static constexpr int64_t kFixedBytes = int64_t{128} << 20;

  CudaRunner(const CudaModel& model, LatentCache& cache, Communicator* comm);
  ~CudaRunner() override;

  Tensor forward(const ForwardBatch& batch, WorkCounter* counter = nullptr) override;
  SampledStep forward_sample(const ForwardBatch& batch, const std::vector<SampleRequest>& requests,
                             WorkCounter* counter = nullptr) override;

  // While on, steps add to profile(). Decode steps still replay graphs: profiled ones of their
  // own, captured with event record nodes around the sections. Costs two events per section.
  void set_profiling(bool on) { profiler_->set_on(on); }
  const StepProfile& profile() const { return profiler_->profile(); }
  void reset_profile() { profiler_->reset(); }

  // Graphs captured and replayed so far (tests check that decode steps replay them).
  int64_t graphs_captured() const { return graphs_->captured(); }
  int64_t graph_replays() const { return graphs_->replays(); }

 private:
  // Enqueues the step (a graph replay where it can) up to the logits of the sequences that
  // want them (rows in batch order, in buffers_.logits).
  void run(const ForwardBatch& batch, WorkCounter& work);
  // Waits for the step and adds its profile.
  void finish();
  // Frees everything (the model's device must be current).
  void release() noexcept;

  const CudaModel& cuda_model_;
  int device_;
  float scale_, rope_factor_;  // the config's softmax scale and RoPE factor
  int num_sms_ = 0;
  int64_t l2_bytes_ = 0;
  // Made and destroyed with the model's device current (hence held by pointer).
  cudaStream_t stream_ = nullptr;
  // CudaOptions::prefetch_weights: the stream the prefetches run on, and the events that fork
  // it from stream_ and join it back inside a step.
  cudaStream_t side_stream_ = nullptr;
  cudaEvent_t fork_ = nullptr, join_ = nullptr;
  std::unique_ptr<cuda::Blas> blas_;
  std::unique_ptr<StepBuffers> buffers_;
  std::unique_ptr<StepProfiler> profiler_;
  std::unique_ptr<GraphCache> graphs_;
  uint64_t graphs_generation_ = 0;  // the buffers' generation the graphs were captured under
};

}  // namespace mla
