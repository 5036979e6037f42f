// WeightLoader: reads one tensor-parallel rank's share of a DeepSeek checkpoint as fp32
// host tensors, a layer at a time (docs/ARCHITECTURE.md section 6 says which slice each rank
// keeps).
//
// The CPU model keeps what it reads; the CUDA model converts each layer to bf16 on the
// device and drops the host copy, so a model larger than host memory in fp32 still loads.
// Not thread-safe; owns nothing but a reference to the checkpoint.
#pragma once

#include <cstdint>

#include "parallel/shard_plan.h"
#include "runtime/checkpoint.h"
#include "runtime/model_config.h"
#include "runtime/model_weights.h"

namespace mla {

class WeightLoader {
 public:
  // Sets the checkpoint's progress total to the bytes this rank will read.
  WeightLoader(Checkpoint& ckpt, const ModelConfig& config, const ShardPlan& shard);

  Tensor embed();       // [V, D]
  Tensor final_norm();  // [D]
  // lm_head.weight, or `embed` itself when the embeddings are tied and no head is stored.
  Tensor lm_head(const Tensor& embed);
  // Layer l's weights for this rank: H/P heads of the attention, 1/P of dense MLPs and of
  // the shared experts, E/P routed experts. Throws mla::Error naming a missing or
  // mis-shaped tensor.
  LayerWeights layer(int64_t l);

 private:
  MlpWeights mlp(const std::string& prefix, int64_t width, int64_t parts);

  Checkpoint& ckpt_;
  const ModelConfig& config_;
  ShardPlan shard_;
};

}  // namespace mla
