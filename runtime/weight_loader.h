// WeightLoader: reads one tensor-parallel rank's share of a DeepSeek checkpoint as fp32
// host tensors, a layer at a time (docs/ARCHITECTURE.md section 6 says which slice each rank
// keeps).
//
// The CPU model keeps what it reads; the CUDA model converts each layer to bf16 on the
// device and drops the host copy, so a model larger than host memory in fp32 still loads.
// With `keep_fp8`, the linear weights the checkpoint stores in fp8 (all but kv_b_proj, which
// the absorbed forms need in fp32) stay fp8 (LinearWeight); a shard whose columns start inside
// a scale block is widened instead (counted in widened_fp8()).
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
  WeightLoader(Checkpoint& ckpt, const ModelConfig& config, const ShardPlan& shard,
               bool keep_fp8 = false);

  Tensor embed();       // [V, D]
  Tensor final_norm();  // [D]
  // lm_head.weight, or `embed` itself when the embeddings are tied and no head is stored.
  Tensor lm_head(const Tensor& embed);
  // Layer l's weights for this rank: H/P heads of the attention, 1/P of dense MLPs and of
  // the shared experts, E/P routed experts. Throws mla::Error naming a missing or
  // mis-shaped tensor.
  LayerWeights layer(int64_t l);

  int64_t kept_fp8() const { return kept_fp8_; }        // weights kept as fp8 so far
  int64_t widened_fp8() const { return widened_fp8_; }  // fp8 weights widened (see above)

 private:
  MlpWeights mlp(const std::string& prefix, int64_t width, int64_t parts);
  // Rows [r0, r1) and columns [c0, c1) of linear weight `name` (c1 = -1: to the end), fp8
  // when kept, else fp32.
  LinearWeight linear(const std::string& name, const Shape& shape, int64_t r0, int64_t r1,
                      int64_t c0 = 0, int64_t c1 = -1);

  Checkpoint& ckpt_;
  const ModelConfig& config_;
  ShardPlan shard_;
  bool keep_fp8_;
  int64_t kept_fp8_ = 0;
  int64_t widened_fp8_ = 0;
};

}  // namespace mla
