// DeviceWeights: one tensor-parallel rank's DeepSeek weights on a GPU, as the CUDA runner reads
// them: linear weights bf16 [out, in], norms, router and rope frequencies fp32, the routed
// experts stacked [E_local, ...] for the grouped expert kernels. Shapes are those of
// runtime/model_weights.h (H there is this rank's heads). Immutable once uploaded.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/tensor.h"
#include "parallel/shard_plan.h"
#include "runtime/model_config.h"

namespace mla {

class WeightLoader;

struct DeviceMlp {
  Tensor gate_up;  // bf16 [2 * width, D]
  Tensor down;     // bf16 [D, width]
  int64_t width = 0;
};

struct DeviceLayer {
  Tensor input_norm, post_attn_norm;      // f32 [D]
  Tensor q_a, q_b, kv_a, kv_b, o;         // bf16, shapes as in AttentionWeights
  Tensor q_a_norm, kv_a_norm;             // f32
  Tensor q_absorbed, q_rope, o_absorbed;  // bf16, premerged latent form only
  bool is_moe = false;
  DeviceMlp mlp;                 // dense layers
  Tensor gate, correction_bias;  // f32 [E, D], [E]
  Tensor experts_gate_up;        // bf16 [E_local, 2I, D]
  Tensor experts_down;           // bf16 [E_local, D, I]
  int64_t first_expert = 0, local_experts = 0;
  DeviceMlp shared;
};

struct DeviceWeights {
  Tensor embed;       // bf16 [V, D]
  Tensor final_norm;  // f32 [D]
  Tensor lm_head;     // bf16 [V, D]; the same storage as embed when tied
  Tensor inv_freq;    // f32 [d_r / 2]
  std::vector<DeviceLayer> layers;
  int64_t max_mlp_width = 0;  // widest dense or shared MLP on this rank
  int64_t bytes = 0;          // device bytes of all of the above

  // Reads every layer through `loader` (fp32 on the host, one layer at a time) and uploads it
  // to the current device; builds the premerged matrices when `premerged`.
  static DeviceWeights upload(WeightLoader& loader, const ModelConfig& config,
                              const ShardPlan& shard, bool premerged);
};

}  // namespace mla
