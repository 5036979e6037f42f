// The DeepSeek weights as the CPU model holds them: fp32 host tensors, linear weights
// [out, in]. Filled once by DeepseekModel::load; immutable afterwards. Under tensor
// parallelism H below is this rank's heads (H/P) and MLP widths are this rank's part.
#pragma once

#include <vector>

#include "kernels/tensor.h"

namespace mla {

struct MlpWeights {
  Tensor gate_up;  // [2 * width, D]: gate rows then up rows (one product for both)
  Tensor down;     // [D, width]
  int64_t width = 0;
};

struct AttentionWeights {
  Tensor q_a;        // [d_q, D]                      (q LoRA only)
  Tensor q_a_norm;   // [d_q]                         (q LoRA only)
  Tensor q_b;        // [H * (d_n + d_r), q_in]       q_b_proj, or q_proj without q LoRA
  Tensor kv_a;       // [d_c + d_r, D]
  Tensor kv_a_norm;  // [d_c]
  Tensor kv_b;       // [H * (d_n + d_v), d_c]        W_UK[h] and W_UV[h] are row blocks of it
  Tensor o;          // [D, H * d_v]
  // Premerged form (built at load time when the form policy needs it):
  Tensor q_absorbed;  // [H * d_c, q_in]   W_Q'[h] = W_UK[h]^T W_q,nope[h]
  Tensor q_rope;      // [H * d_r, q_in]   the rope rows of q_b
  Tensor o_absorbed;  // [D, H * d_c]      W_O'[h] = W_o[:, h] W_UV[h]
};

struct MoeWeights {
  Tensor gate;             // [E, D]
  Tensor correction_bias;  // [E] (noaux_tc only)
  std::vector<MlpWeights>
      experts;  // this rank's routed experts: first_expert, first_expert + 1, ...
  int64_t first_expert = 0;
  MlpWeights shared;  // n_shared_experts * moe_intermediate_size wide
};

struct LayerWeights {
  Tensor input_norm;      // [D]
  Tensor post_attn_norm;  // [D]
  AttentionWeights attn;
  bool is_moe = false;
  MlpWeights mlp;  // dense layers
  MoeWeights moe;  // MoE layers
};

struct ModelWeights {
  Tensor embed;  // [V, D]
  std::vector<LayerWeights> layers;
  Tensor final_norm;  // [D]
  Tensor lm_head;     // [V, D]
};

}  // namespace mla
