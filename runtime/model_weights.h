// The DeepSeek weights as the CPU model holds them: fp32 host tensors, linear weights
// [out, in]; with ModelOptions::fp8_weights kKeep, the linear weights an fp8 checkpoint stores
// in fp8 stay fp8 (LinearWeight). Filled once by DeepseekModel::load; immutable afterwards.
// Under tensor parallelism H below is this rank's heads (H/P) and MLP widths are this rank's
// part.
#pragma once

#include <vector>

#include "kernels/tensor.h"

namespace mla {

// A linear layer's weight, [out, in]: fp32, or an fp8 checkpoint's weight kept as it is,
// e4m3 bytes with an fp32 scale per row and `group` columns,
//   W[r][j] = e4m3[r][j] * scale[r][j / group]
// (kernels/cpu/fp8_gemm.h multiplies it with activations quantised per row and group).
struct LinearWeight {
  Tensor w;           // [out, in]: F32, or F8E4M3 bytes
  Tensor scale;       // [out, ceil(in / group)] F32; fp8 only
  int64_t group = 0;  // columns per scale; fp8 only

  LinearWeight() = default;
  LinearWeight(Tensor f32) : w(std::move(f32)) {}  // NOLINT: an fp32 weight is a LinearWeight
  LinearWeight(Tensor e4m3, Tensor scales, int64_t columns_per_scale);

  bool defined() const { return w.defined(); }
  bool fp8() const { return scale.defined(); }
  int64_t out() const { return w.dim(0); }
  int64_t in() const { return w.dim(1); }
  // The fp32 weight. Throws kInternal for an fp8 weight: a path that needs fp32 values reads
  // widened() once at load time instead.
  const Tensor& f32_weight() const;
  // An fp32 copy of an fp8 weight; the fp32 weight itself otherwise.
  Tensor widened() const;
  // Bytes held: the values and, for fp8, the scales.
  size_t nbytes() const;
  // Rows of `a` then rows of `b` (same in, same kind, same group).
  static LinearWeight concat_rows(const LinearWeight& a, const LinearWeight& b);
};

struct MlpWeights {
  LinearWeight gate_up;  // [2 * width, D]: gate rows then up rows (one product for both)
  LinearWeight down;     // [D, width]
  int64_t width = 0;
};

struct AttentionWeights {
  LinearWeight q_a;   // [d_q, D]                      (q LoRA only)
  Tensor q_a_norm;    // [d_q]                         (q LoRA only)
  LinearWeight q_b;   // [H * (d_n + d_r), q_in]       q_b_proj, or q_proj without q LoRA
  LinearWeight kv_a;  // [d_c + d_r, D]
  Tensor kv_a_norm;   // [d_c]
  // [H * (d_n + d_v), d_c]: W_UK[h] and W_UV[h] are row blocks of it. Always fp32: the absorbed
  // forms multiply with it per head (an fp8 checkpoint's kv_b_proj is widened at load).
  Tensor kv_b;
  LinearWeight o;  // [D, H * d_v]
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
  Tensor lm_head;     // [V, D] (the embeddings themselves when tied)

  size_t nbytes() const;  // every tensor held, a tied head once
};

}  // namespace mla
