#include "runtime/model_config.h"

#include <cmath>
#include <fstream>
#include <stdexcept>
#include <nlohmann/json.hpp>

#include "kernels/error.h"

namespace mla {
namespace {

using json = nlohmann::json;

// Reads an optional field, treating JSON null as absent.
template <typename T>
T get_or(const json& j, const char* key, T fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  try {
    return it->get<T>();
  } catch (const json::exception& e) {
    MLA_THROW(kInvalidArgument, "config field `{}` has the wrong type: {}", key, e.what());
  }
}

template <typename T>
T get_required(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) MLA_THROW(kInvalidArgument, "config lacks `{}`", key);
  return get_or<T>(j, key, T{});
}

double yarn_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

RopeConfig parse_rope(const json& j) {
  RopeConfig r;
  r.theta = get_or<double>(j, "rope_theta", 10000.0);
  const json* p = nullptr;
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) p = &*it;
  if (auto it = j.find("rope_scaling"); p == nullptr && it != j.end() && it->is_object()) p = &*it;
  if (p == nullptr) return r;

  r.theta = get_or<double>(*p, "rope_theta", r.theta);
  std::string type = get_or<std::string>(*p, "rope_type", get_or<std::string>(*p, "type", "default"));
  if (type == "default") return r;
  if (type != "yarn") {
    MLA_THROW(kInvalidArgument, "rope type `{}` is not supported (default or yarn)", type);
  }
  r.type = RopeType::kYarn;
  r.factor = get_required<double>(*p, "factor");
  r.original_max_position_embeddings =
      get_or<int64_t>(*p, "original_max_position_embeddings", r.original_max_position_embeddings);
  r.beta_fast = get_or<double>(*p, "beta_fast", 32.0);
  r.beta_slow = get_or<double>(*p, "beta_slow", 1.0);
  r.mscale = get_or<double>(*p, "mscale", 0.0);
  r.mscale_all_dim = get_or<double>(*p, "mscale_all_dim", 0.0);
  r.attention_factor = get_or<double>(*p, "attention_factor", 0.0);
  r.truncate = get_or<bool>(*p, "truncate", true);
  return r;
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j) {
  MLA_REQUIRE(j.is_object(), "config.json is not a JSON object");
  ModelConfig c;
  const std::string model_type = get_or<std::string>(j, "model_type", "deepseek_v3");
  if (model_type == "deepseek_v2") {
    c.family = ModelFamily::kDeepseekV2;
  } else if (model_type == "deepseek_v3" || model_type == "kimi_k2") {
    c.family = ModelFamily::kDeepseekV3;
  } else {
    MLA_THROW(kInvalidArgument, "model_type `{}` is not a DeepSeek MLA model", model_type);
  }
  c.vocab_size = get_required<int64_t>(j, "vocab_size");
  c.hidden_size = get_required<int64_t>(j, "hidden_size");
  c.num_layers = get_required<int64_t>(j, "num_hidden_layers");
  c.num_heads = get_required<int64_t>(j, "num_attention_heads");
  c.q_lora_rank = get_or<int64_t>(j, "q_lora_rank", 0);
  c.kv_lora_rank = get_required<int64_t>(j, "kv_lora_rank");
  c.qk_rope_head_dim = get_required<int64_t>(j, "qk_rope_head_dim");
  c.qk_nope_head_dim = get_required<int64_t>(j, "qk_nope_head_dim");
  c.v_head_dim = get_required<int64_t>(j, "v_head_dim");
  c.intermediate_size = get_required<int64_t>(j, "intermediate_size");
  c.moe_intermediate_size = get_or<int64_t>(j, "moe_intermediate_size", 0);
  c.n_routed_experts = get_or<int64_t>(j, "n_routed_experts", 0);
  c.n_shared_experts = get_or<int64_t>(j, "n_shared_experts", 0);
  c.num_experts_per_tok = get_or<int64_t>(j, "num_experts_per_tok", 0);
  c.n_group = get_or<int64_t>(j, "n_group", 1);
  c.topk_group = get_or<int64_t>(j, "topk_group", 1);
  c.first_k_dense_replace = get_or<int64_t>(j, "first_k_dense_replace", 0);
  c.moe_layer_freq = get_or<int64_t>(j, "moe_layer_freq", 1);
  c.routed_scaling_factor = get_or<double>(j, "routed_scaling_factor", 1.0);
  c.norm_topk_prob = get_or<bool>(j, "norm_topk_prob", false);
  c.rms_norm_eps = get_or<double>(j, "rms_norm_eps", 1e-6);
  c.max_position_embeddings = get_or<int64_t>(j, "max_position_embeddings", 4096);
  c.tie_word_embeddings = get_or<bool>(j, "tie_word_embeddings", false);
  c.rope = parse_rope(j);

  const bool v3 = c.family == ModelFamily::kDeepseekV3;
  c.rope_interleave = get_or<bool>(j, "rope_interleave", true);
  const std::string topk_method = get_or<std::string>(j, "topk_method", v3 ? "noaux_tc" : "greedy");
  if (topk_method == "noaux_tc") {
    c.gate = GateKind::kSigmoidNoauxTc;
  } else if (topk_method == "greedy") {
    c.gate = GateKind::kSoftmaxGreedy;
  } else if (topk_method == "group_limited_greedy") {
    c.gate = GateKind::kSoftmaxGroupLimited;
  } else {
    MLA_THROW(kInvalidArgument, "topk_method `{}` is not supported", topk_method);
  }

  try {
    if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
      if (it->is_array()) {
        for (const auto& v : *it) c.eos_token_ids.push_back(v.get<int32_t>());
      } else {
        c.eos_token_ids.push_back(it->get<int32_t>());
      }
    }
  } catch (const json::exception&) {
    MLA_THROW(kInvalidArgument, "config field `eos_token_id` must be an integer or a list of them");
  }
  if (auto it = j.find("quantization_config"); it != j.end() && it->is_object()) {
    if (auto b = it->find("weight_block_size"); b != it->end() && !b->is_null()) {
      try {
        const auto block = b->get<std::vector<int>>();
        if (block.size() != 2 || block[0] <= 0 || block[1] <= 0) throw std::invalid_argument("");
        c.fp8_block = {block[0], block[1]};
      } catch (const std::exception&) {
        MLA_THROW(kInvalidArgument,
                  "config field `quantization_config.weight_block_size` must be two positive "
                  "integers");
      }
    }
  }
  c.validate();
  return c;
}

ModelConfig ModelConfig::load(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path);
  if (!in) MLA_THROW(kNotFound, "cannot open {}", path);
  json j;
  try {
    in >> j;
  } catch (const json::exception& e) {
    MLA_THROW(kInvalidArgument, "{} is not valid JSON: {}", path, e.what());
  }
  try {
    return from_json(j);
  } catch (const Error& e) {
    throw Error(e.code(), path + ": " + e.what());
  }
}

json ModelConfig::to_json() const {
  const bool v3 = family == ModelFamily::kDeepseekV3;
  json j = {
      {"architectures", {v3 ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM"}},
      {"model_type", v3 ? "deepseek_v3" : "deepseek_v2"},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"num_hidden_layers", num_layers},
      {"num_attention_heads", num_heads},
      {"num_key_value_heads", num_heads},
      {"q_lora_rank", q_lora_rank > 0 ? json(q_lora_rank) : json(nullptr)},
      {"kv_lora_rank", kv_lora_rank},
      {"qk_rope_head_dim", qk_rope_head_dim},
      {"qk_nope_head_dim", qk_nope_head_dim},
      {"v_head_dim", v_head_dim},
      {"intermediate_size", intermediate_size},
      {"moe_intermediate_size", moe_intermediate_size},
      {"n_routed_experts", n_routed_experts},
      {"n_shared_experts", n_shared_experts},
      {"num_experts_per_tok", num_experts_per_tok},
      {"n_group", n_group},
      {"topk_group", topk_group},
      {"first_k_dense_replace", first_k_dense_replace},
      {"moe_layer_freq", moe_layer_freq},
      {"routed_scaling_factor", routed_scaling_factor},
      {"norm_topk_prob", norm_topk_prob},
      {"topk_method", gate == GateKind::kSigmoidNoauxTc    ? "noaux_tc"
                      : gate == GateKind::kSoftmaxGreedy ? "greedy"
                                                         : "group_limited_greedy"},
      {"scoring_func", gate == GateKind::kSigmoidNoauxTc ? "sigmoid" : "softmax"},
      {"rms_norm_eps", rms_norm_eps},
      {"rope_interleave", rope_interleave},
      {"max_position_embeddings", max_position_embeddings},
      {"tie_word_embeddings", tie_word_embeddings},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"torch_dtype", "float32"},
  };
  json rp = {{"rope_theta", rope.theta}};
  if (rope.type == RopeType::kYarn) {
    rp.update({{"rope_type", "yarn"},
               {"factor", rope.factor},
               {"original_max_position_embeddings", rope.original_max_position_embeddings},
               {"beta_fast", rope.beta_fast},
               {"beta_slow", rope.beta_slow},
               {"mscale", rope.mscale},
               {"mscale_all_dim", rope.mscale_all_dim}});
    if (rope.attention_factor > 0) rp["attention_factor"] = rope.attention_factor;
    if (!rope.truncate) rp["truncate"] = false;
  } else {
    rp["rope_type"] = "default";
  }
  j["rope_parameters"] = rp;
  if (eos_token_ids.size() == 1) j["eos_token_id"] = eos_token_ids.front();
  if (eos_token_ids.size() > 1) j["eos_token_id"] = eos_token_ids;
  return j;
}

bool ModelConfig::is_moe_layer(int64_t layer) const {
  return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
}

std::string ModelConfig::family_name() const {
  return family == ModelFamily::kDeepseekV3 ? "deepseek_v3" : "deepseek_v2";
}

std::vector<float> ModelConfig::rope_inv_freq() const {
  const int64_t dim = qk_rope_head_dim;
  const int64_t half = dim / 2;
  const float base = static_cast<float>(rope.theta);
  std::vector<float> pos_freq(half), extrapolation(half);
  for (int64_t i = 0; i < half; ++i) {
    pos_freq[i] = std::pow(base, static_cast<float>(2 * i) / static_cast<float>(dim));
    extrapolation[i] = 1.0f / pos_freq[i];
  }
  if (rope.type == RopeType::kDefault) return extrapolation;

  // YaRN (transformers' _compute_yarn_parameters): blend interpolated and extrapolated
  // frequencies with a linear ramp over the correction range.
  const double orig = static_cast<double>(rope.original_max_position_embeddings);
  auto correction_dim = [&](double rotations) {
    return (dim * std::log(orig / (rotations * 2 * M_PI))) / (2 * std::log(rope.theta));
  };
  double low = correction_dim(rope.beta_fast), high = correction_dim(rope.beta_slow);
  if (rope.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;
  std::vector<float> inv(half);
  const float factor = static_cast<float>(rope.factor);
  for (int64_t i = 0; i < half; ++i) {
    float ramp = (static_cast<float>(i) - static_cast<float>(low)) /
                 (static_cast<float>(high) - static_cast<float>(low));
    ramp = std::clamp(ramp, 0.0f, 1.0f);
    const float extra_weight = 1.0f - ramp;
    const float interpolation = 1.0f / (factor * pos_freq[i]);
    inv[i] = interpolation * (1.0f - extra_weight) + extrapolation[i] * extra_weight;
  }
  return inv;
}

float ModelConfig::rope_attention_factor() const {
  if (rope.type == RopeType::kDefault) return 1.0f;
  if (rope.attention_factor > 0) return static_cast<float>(rope.attention_factor);
  if (rope.mscale != 0 && rope.mscale_all_dim != 0) {
    return static_cast<float>(yarn_mscale(rope.factor, rope.mscale) /
                              yarn_mscale(rope.factor, rope.mscale_all_dim));
  }
  return static_cast<float>(yarn_mscale(rope.factor, 1.0));
}

double ModelConfig::softmax_scale() const {
  double scale = std::pow(static_cast<double>(qk_head_dim()), -0.5);
  if (rope.type == RopeType::kYarn && rope.mscale_all_dim != 0) {
    const double m = yarn_mscale(rope.factor, rope.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

void ModelConfig::validate() const {
  auto positive = [](int64_t v, const char* name) {
    MLA_REQUIRE(v > 0, "config field `{}` must be positive, got {}", name, v);
  };
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(num_layers, "num_hidden_layers");
  positive(num_heads, "num_attention_heads");
  positive(kv_lora_rank, "kv_lora_rank");
  positive(qk_rope_head_dim, "qk_rope_head_dim");
  positive(qk_nope_head_dim, "qk_nope_head_dim");
  positive(v_head_dim, "v_head_dim");
  positive(intermediate_size, "intermediate_size");
  MLA_REQUIRE(qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even, got {}",
              qk_rope_head_dim);
  MLA_REQUIRE(q_lora_rank >= 0, "q_lora_rank must be null or positive");
  if (n_routed_experts > 0) {
    positive(moe_intermediate_size, "moe_intermediate_size");
    positive(num_experts_per_tok, "num_experts_per_tok");
    positive(n_group, "n_group");
    positive(moe_layer_freq, "moe_layer_freq");
    MLA_REQUIRE(num_experts_per_tok <= n_routed_experts,
                "num_experts_per_tok ({}) exceeds n_routed_experts ({})", num_experts_per_tok,
                n_routed_experts);
    MLA_REQUIRE(n_routed_experts % n_group == 0,
                "n_routed_experts ({}) is not divisible by n_group ({})", n_routed_experts, n_group);
    MLA_REQUIRE(topk_group >= 1 && topk_group <= n_group,
                "topk_group ({}) must be in [1, n_group={}]", topk_group, n_group);
    MLA_REQUIRE(gate != GateKind::kSigmoidNoauxTc || n_routed_experts / n_group >= 2,
                "noaux_tc needs at least 2 experts per group");
    MLA_REQUIRE(num_experts_per_tok <= topk_group * (n_routed_experts / n_group),
                "num_experts_per_tok ({}) exceeds the experts in topk_group groups",
                num_experts_per_tok);
  }
  MLA_REQUIRE(rope.type == RopeType::kDefault || rope.factor > 0, "rope factor must be positive");
}

}  // namespace mla
