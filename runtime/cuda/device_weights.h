// DeviceWeights: one tensor-parallel rank's DeepSeek weights on a GPU, as the CUDA runner reads
// them: linear weights bf16 [out, in] (or, with fp8_weights keep, an fp8 checkpoint's weights
// as e4m3 with their scales: DeviceLinear), norms, router and rope frequencies fp32, the routed
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

// A linear weight [out, in] (stacked experts: [E_local, out, in]): bf16, or e4m3 bytes with an
// fp32 scale per row and 128 columns, W[r][j] = e4m3[r][j] * scale[r][j / 128] (the layout of
// runtime/model_weights.h's LinearWeight; cuda/fp8_gemm.h multiplies it).
struct DeviceLinear {
  Tensor w;      // BF16, or U8 holding e4m3
  Tensor scale;  // F32 [..., out, in / 128]; fp8 only
  // F32 [ceil(out / 128), in / 128]: the checkpoint's 128x128 blocks, for cuda/fp8_gemm_lt.h's
  // prefill products; fp8 (not stacked) weights whose row scales are uniform within each block.
  Tensor block_scale;
  bool defined() const { return w.defined(); }
  bool fp8() const { return scale.defined(); }
};

struct DeviceMlp {
  DeviceLinear gate_up;  // [2 * width, D]
  DeviceLinear down;     // [D, width]
  int64_t width = 0;
};

struct DeviceLayer {
  Tensor input_norm, post_attn_norm;      // f32 [D]
  DeviceLinear q_a, q_b, kv_a, o;         // shapes as in AttentionWeights
  Tensor kv_b;                            // bf16 (always: the absorbed forms multiply per head)
  Tensor q_a_norm, kv_a_norm;             // f32
  Tensor q_absorbed, q_rope, o_absorbed;  // bf16, premerged latent form only
  bool is_moe = false;
  DeviceMlp mlp;                 // dense layers
  Tensor gate, correction_bias;  // f32 [E, D], [E]
  DeviceLinear experts_gate_up;  // [E_local, 2I, D]
  DeviceLinear experts_down;     // [E_local, D, I]
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
  int64_t fp8_max_in = 0;     // widest input of an fp8 product outside the experts (0: none)
  bool fp8_experts = false;   // some layer's routed experts are fp8
  int64_t bytes = 0;          // device bytes of all of the above
  // Linear weights kept as fp8, and fp8 weights widened to bf16 because the GPU products need
  // 128-column groups starting at column 0 (or an expert of the same layer was widened).
  int64_t kept_fp8 = 0, widened_fp8 = 0;

  // Reads every layer through `loader` (fp32 on the host, or fp8 as kept, one layer at a time)
  // and uploads it to the current device; builds the premerged matrices when `premerged`.
  static DeviceWeights upload(WeightLoader& loader, const ModelConfig& config,
                              const ShardPlan& shard, bool premerged);
};

}  // namespace mla
