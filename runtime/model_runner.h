// ModelRunner: runs one Model's forward passes on one latent cache for one tensor-parallel group
// (nano-vllm's ModelRunner). The Model is the immutable weights; the runner is what running
// mutates: for the CUDA backend the stream, step buffers, CUDA graphs and profiling
// (runtime/cuda/cuda_runner.h); for the CPU backend nothing but the binding. An Engine makes one
// at construction. Binding the cache and the communicator once means nothing captured for one
// of them can ever run against another.
//
// Not thread-safe: one thread drives a runner. Runners of the same model may run concurrently.
#pragma once

#include <memory>
#include <vector>

#include "runtime/model.h"

namespace mla {

class TensorDump;

class ModelRunner {
 public:
  virtual ~ModelRunner() = default;
  ModelRunner(const ModelRunner&) = delete;
  ModelRunner& operator=(const ModelRunner&) = delete;

  const Model& model() const { return model_; }
  LatentCache& cache() const { return cache_; }
  // The group's communicator; null for one rank.
  Communicator* comm() const { return comm_; }

  // Runs the new tokens of `batch` through the model: stores each token's latent in the cache
  // (pages must be reserved; under TP this rank's shard) and returns the logits
  // [num seqs wanting logits, V] in batch order, on the host, on every rank. Adds the work done
  // to `counter` when given.
  virtual Tensor forward(const ForwardBatch& batch, WorkCounter* counter = nullptr) = 0;
  // forward(), then one token per sequence wanting logits, picked as mla::sample_token would
  // from its logits. `requests` has one entry per such sequence, or none (a tensor-parallel
  // follower that only runs its part): then nothing is sampled. This version samples on the
  // host; the CUDA runner samples on the GPU and copies back only the tokens (and the rows
  // asked for with keep_logits).
  virtual SampledStep forward_sample(const ForwardBatch& batch,
                                     const std::vector<SampleRequest>& requests,
                                     WorkCounter* counter = nullptr);

  // While set, forward passes copy their named intermediates (runtime/cuda/cuda_step.h lists
  // them; attn_norm, q_nope, ..., layer_out per layer, then final_norm and logits of every
  // row) into `dump`, which keeps the first of each: a tool for comparing a checkpoint layer by
  // layer with transformers, slow (host copies, no CUDA graphs). One rank only: throws
  // kInvalidArgument under tensor parallelism. nullptr stops it. The dump must outlive its use.
  void set_dump(TensorDump* dump);

 protected:
  // Checks that `cache` and `comm` fit `model` (see Model::make_runner).
  ModelRunner(const Model& model, LatentCache& cache, Communicator* comm);

  const Model& model_;
  LatentCache& cache_;
  Communicator* comm_;  // null for one rank
  TensorDump* dump_ = nullptr;
};

}  // namespace mla
