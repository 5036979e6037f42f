// ModelConfig: the hyper-parameters of a DeepSeek MLA checkpoint (config.json).
//
// Immutable after parsing; everything derived from it (RoPE frequencies, softmax scale,
// which layers are MoE) is computed by const methods so there is no half-built state.
// Parsing accepts both the older (`rope_scaling` + top-level `rope_theta`) and the newer
// (`rope_parameters`) transformers layouts, `type` or `rope_type`, and ignores `head_dim`.
// A config that carries both layouts must have them agree.
//
// Notation, used in code and comments throughout the runtime:
//   D     hidden_size                    H     num_attention_heads (all heads)
//   d_q   q_lora_rank (0: no q LoRA)     q_in  query up-projection input: d_q, or D without it
//   d_c   kv_lora_rank (512)             d_r   qk_rope_head_dim (64)
//   d_n   qk_nope_head_dim (128)         d_v   v_head_dim (128)
//   d_qk  d_n + d_r: a head's query/key  d_lat d_c + d_r: one cached latent row (576)
//   E, K  routed experts, experts per token; I one expert's width
// and of a run: P tensor-parallel size, H_l = H / P heads on a rank, H_a heads a rank attends
// (H under a sequence-sharded cache, else H_l), B tokens per cache page, T tokens and S
// sequences in a step, L keys a sequence's last new token sees.
//
// A config that would load but compute something else is refused, naming the field: sizes
// that are not JSON integers (64.5, "64"), values outside the bounds below, rope_theta <= 0,
// rope objects that are not objects, `hidden_act` other than silu, rms_norm_eps < 0, and a
// `quantization_config` other than fp8 e4m3 with block scales.
#pragma once

#include <array>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace mla {

enum class ModelFamily { kDeepseekV2, kDeepseekV3 };

// How the router picks experts (the gate rules of transformers' DeepseekV2/V3 MoE).
enum class GateKind {
  kSoftmaxGreedy,        // V2 `greedy`: top-k of softmax
  kSoftmaxGroupLimited,  // V2 `group_limited_greedy`: groups scored by their max
  kSigmoidNoauxTc,       // V3 `noaux_tc`: sigmoid + correction bias, groups by top-2 sum
};

enum class RopeType { kDefault, kYarn };

struct RopeConfig {
  RopeType type = RopeType::kDefault;
  double theta = 10000.0;
  double factor = 1.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 0.0;            // 0 means unset, as in transformers
  double mscale_all_dim = 0.0;    // 0 means unset
  double attention_factor = 0.0;  // 0 means derive from factor/mscale
  bool truncate = true;
};

struct ModelConfig {
  // Upper bounds on sizes, checked before anything is sized from them. Each is far above
  // every published DeepSeek-V2/V3 and Kimi-K2 shape (in brackets: DeepSeek-V3), and low
  // enough that a config cannot ask for an allocation whose size overflows.
  static constexpr int64_t kMaxVocabSize = int64_t{1} << 22;         // vocab_size [129280]
  static constexpr int64_t kMaxWidth = int64_t{1} << 16;             // hidden_size [7168],
                                                                     // q/kv_lora_rank [1536/512]
  static constexpr int64_t kMaxLayers = 1024;                        // num_hidden_layers [61]
  static constexpr int64_t kMaxHeads = 1024;                         // num_attention_heads [128]
  static constexpr int64_t kMaxHeadDim = 1024;                       // qk_*_head_dim, v [64/128]
  static constexpr int64_t kMaxIntermediateSize = int64_t{1} << 20;  // intermediate [18432]
  static constexpr int64_t kMaxExperts = 4096;                       // n_routed_experts [256]
  static constexpr int64_t kMaxPositions = int64_t{1} << 24;         // max_position_emb. [163840]

  ModelFamily family = ModelFamily::kDeepseekV3;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;  // D
  int64_t num_layers = 0;
  int64_t num_heads = 0;              // H
  int64_t q_lora_rank = 0;            // d_q; 0 = no q LoRA (q_proj)
  int64_t kv_lora_rank = 0;           // d_c
  int64_t qk_rope_head_dim = 0;       // d_r
  int64_t qk_nope_head_dim = 0;       // d_n
  int64_t v_head_dim = 0;             // d_v
  int64_t intermediate_size = 0;      // dense MLP width
  int64_t moe_intermediate_size = 0;  // one expert's width
  int64_t n_routed_experts = 0;       // 0 = dense model
  int64_t n_shared_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = false;
  GateKind gate = GateKind::kSigmoidNoauxTc;
  double rms_norm_eps = 1e-6;
  bool rope_interleave = true;  // pairs (2j, 2j+1) rotate; else (j, j + d_r/2)
  RopeConfig rope;
  int64_t max_position_embeddings = 4096;
  std::vector<int32_t> eos_token_ids;
  bool tie_word_embeddings = false;
  std::array<int, 2> fp8_block = {128, 128};  // quantization_config.weight_block_size
  bool fp8_checkpoint = false;                // a quantization_config (fp8 e4m3) is present

  // Parses a transformers config.json object and validates it; throws kInvalidArgument
  // naming the field.
  static ModelConfig from_json(const nlohmann::json& j);
  // Reads DIR/config.json. Throws kNotFound if `model_dir` or its config.json does not exist,
  // kInvalidArgument naming the path if `model_dir` is not a directory or the file is not
  // valid JSON (its bytes are not quoted), and what from_json throws, prefixed with the path.
  static ModelConfig load(const std::string& model_dir);
  // The config.json transformers would write for this model (newer `rope_parameters` form).
  nlohmann::json to_json() const;

  // Epsilon of q_a_layernorm and kv_a_layernorm: transformers fixes it, whatever rms_norm_eps.
  static constexpr float kLoraNormEps = 1e-6f;

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  int64_t latent_width() const { return kv_lora_rank + qk_rope_head_dim; }  // 576 for DeepSeek
  // Input width of the query up-projection: d_q with q LoRA, else D.
  int64_t q_in_dim() const { return q_lora_rank > 0 ? q_lora_rank : hidden_size; }
  bool is_moe_layer(int64_t layer) const;
  // Whether the router divides the top-k weights by their sum: V3 with norm_topk_prob;
  // transformers' DeepseekV2 never does (norm_topk_prob is false in every V2 checkpoint anyway).
  bool renormalize_topk() const { return norm_topk_prob && family == ModelFamily::kDeepseekV3; }
  std::string family_name() const;

  // RoPE inverse frequencies [d_r / 2] (YaRN-corrected when configured), in fp32 as
  // transformers computes them, and the factor cos/sin are multiplied by.
  std::vector<float> rope_inv_freq() const;
  float rope_attention_factor() const;
  // Softmax scale: (d_n + d_r)^-0.5, times m^2 under YaRN, m = yarn_mscale(factor,
  // mscale_all_dim) (transformers >= 5 does this for V2 and V3 alike).
  double softmax_scale() const;
  // Throws kInvalidArgument naming the field if the hyper-parameters are inconsistent, out of
  // the bounds above, or would make RoPE or RMSNorm compute NaN.
  void validate() const;
};

}  // namespace mla
