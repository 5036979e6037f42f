#include "runtime/model_config.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>

#include "kernels/error.h"
#include "runtime/paths.h"

namespace mla {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Reads the fields of one JSON object. Errors name a field by its path in config.json, e.g.
// `rope_parameters.factor`, and never accept a value of another type: 64.5 and "64" are not
// the integer 64, and a nested object that is not an object is an error, not "absent".
class Fields {
 public:
  Fields(const json& j, std::string prefix) : j_(j), prefix_(std::move(prefix)) {}

  std::string name(std::string_view key) const { return prefix_ + std::string(key); }
  // The field's value; nullptr if it is absent or JSON null.
  const json* find(std::string_view key) const {
    const auto it = j_.find(key);
    return it == j_.end() || it->is_null() ? nullptr : &*it;
  }

  template <typename T>
  T get_or(std::string_view key, T fallback) const {
    const json* v = find(key);
    return v == nullptr ? fallback : convert<T>(key, *v);
  }

  template <typename T>
  T required(std::string_view key) const {
    const json* v = find(key);
    if (v == nullptr) MLA_THROW(kInvalidArgument, "config lacks `{}`", name(key));
    return convert<T>(key, *v);
  }

  // The nested object `key`, or nullopt if it is absent or null.
  std::optional<Fields> object(std::string_view key) const {
    const json* v = find(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_object()) {
      MLA_THROW(kInvalidArgument, "config field `{}` must be an object or null, not a {}",
                name(key), v->type_name());
    }
    return Fields(*v, name(key) + ".");
  }

 private:
  template <typename T>
  T convert(std::string_view key, const json& v) const {
    if constexpr (std::is_same_v<T, bool>) {
      if (v.is_boolean()) return v.get<bool>();
    } else if constexpr (std::is_same_v<T, int64_t>) {
      if (v.is_number_integer() && (!v.is_number_unsigned() || v.get<uint64_t>() <= INT64_MAX)) {
        return v.get<int64_t>();
      }
      MLA_THROW(kInvalidArgument, "config field `{}` must be an integer, got {}", name(key),
                v.is_number() ? v.dump() : std::string("a ") + v.type_name());
    } else if constexpr (std::is_same_v<T, double>) {
      if (v.is_number() && std::isfinite(v.get<double>())) return v.get<double>();
      MLA_THROW(kInvalidArgument, "config field `{}` must be a finite number, got {}", name(key),
                v.is_number() ? v.dump() : std::string("a ") + v.type_name());
    } else {
      static_assert(std::is_same_v<T, std::string>);
      if (v.is_string()) return v.get<std::string>();
    }
    MLA_THROW(kInvalidArgument, "config field `{}` has the wrong type: a {}", name(key),
              v.type_name());
  }

  const json& j_;
  std::string prefix_;
};

double yarn_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

// One rope object (`rope_parameters` or `rope_scaling`); `theta` is the top-level rope_theta,
// which the object's own `rope_theta` overrides.
RopeConfig parse_rope_object(const Fields& p, double theta) {
  RopeConfig r;
  r.theta = p.get_or<double>("rope_theta", theta);
  MLA_REQUIRE(r.theta > 0, "config field `{}` must be positive, got {}",
              p.find("rope_theta") != nullptr ? p.name("rope_theta") : "rope_theta", r.theta);
  const std::string type =
      p.get_or<std::string>("rope_type", p.get_or<std::string>("type", "default"));
  if (type == "default") return r;
  if (type != "yarn") {
    MLA_THROW(kInvalidArgument,
              "config field `{}`: rope type `{}` is not supported (default or yarn)",
              p.name(p.find("rope_type") != nullptr ? "rope_type" : "type"), type);
  }
  r.type = RopeType::kYarn;
  r.factor = p.required<double>("factor");
  r.original_max_position_embeddings =
      p.get_or<int64_t>("original_max_position_embeddings", r.original_max_position_embeddings);
  r.beta_fast = p.get_or<double>("beta_fast", 32.0);
  r.beta_slow = p.get_or<double>("beta_slow", 1.0);
  r.mscale = p.get_or<double>("mscale", 0.0);
  r.mscale_all_dim = p.get_or<double>("mscale_all_dim", 0.0);
  r.attention_factor = p.get_or<double>("attention_factor", 0.0);
  r.truncate = p.get_or<bool>("truncate", true);
  return r;
}

// Every value that sets RoPE, under its config.json name: what two rope objects must agree on.
std::vector<std::pair<const char*, double>> rope_values(const RopeConfig& r) {
  std::vector<std::pair<const char*, double>> v = {
      {"rope_type", r.type == RopeType::kYarn ? 1.0 : 0.0}, {"rope_theta", r.theta}};
  if (r.type == RopeType::kDefault) return v;
  v.insert(v.end(), {{"factor", r.factor},
                     {"original_max_position_embeddings",
                      static_cast<double>(r.original_max_position_embeddings)},
                     {"beta_fast", r.beta_fast},
                     {"beta_slow", r.beta_slow},
                     {"mscale", r.mscale},
                     {"mscale_all_dim", r.mscale_all_dim},
                     {"attention_factor", r.attention_factor},
                     {"truncate", r.truncate ? 1.0 : 0.0}});
  return v;
}

// Reads the newer `rope_parameters` or the older `rope_scaling` + top-level `rope_theta`.
// A config may carry both (written for old and new readers alike) only if they agree: which
// one a reader honours differs between transformers versions.
RopeConfig parse_rope(const Fields& f) {
  const double top_theta = f.get_or<double>("rope_theta", 10000.0);
  const std::optional<Fields> parameters = f.object("rope_parameters");
  const std::optional<Fields> scaling = f.object("rope_scaling");
  RopeConfig r = parameters ? parse_rope_object(*parameters, top_theta)
                 : scaling  ? parse_rope_object(*scaling, top_theta)
                            : RopeConfig{.theta = top_theta};
  if (parameters && f.find("rope_theta") != nullptr && r.theta != top_theta) {
    MLA_THROW(kInvalidArgument,
              "config fields `rope_theta` ({}) and `rope_parameters.rope_theta` ({}) disagree",
              top_theta, r.theta);
  }
  if (parameters && scaling) {
    const auto a = rope_values(r);
    const auto b = rope_values(parse_rope_object(*scaling, top_theta));
    // The rope types come first, so the lists have the same length past a type mismatch.
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i].second != b[i].second) {
        MLA_THROW(kInvalidArgument,
                  "config fields `rope_parameters` and `rope_scaling` disagree on `{}`; give one "
                  "of them",
                  a[i].first);
      }
    }
  }
  return r;
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j) {
  MLA_REQUIRE(j.is_object(), "config.json is not a JSON object");
  const Fields f(j, "");
  ModelConfig c;
  const std::string model_type = f.get_or<std::string>("model_type", "deepseek_v3");
  if (model_type == "deepseek_v2") {
    c.family = ModelFamily::kDeepseekV2;
  } else if (model_type == "deepseek_v3" || model_type == "kimi_k2") {
    c.family = ModelFamily::kDeepseekV3;
  } else {
    MLA_THROW(kInvalidArgument, "model_type `{}` is not a DeepSeek MLA model", model_type);
  }
  c.vocab_size = f.required<int64_t>("vocab_size");
  c.hidden_size = f.required<int64_t>("hidden_size");
  c.num_layers = f.required<int64_t>("num_hidden_layers");
  c.num_heads = f.required<int64_t>("num_attention_heads");
  c.q_lora_rank = f.get_or<int64_t>("q_lora_rank", 0);
  c.kv_lora_rank = f.required<int64_t>("kv_lora_rank");
  c.qk_rope_head_dim = f.required<int64_t>("qk_rope_head_dim");
  c.qk_nope_head_dim = f.required<int64_t>("qk_nope_head_dim");
  c.v_head_dim = f.required<int64_t>("v_head_dim");
  c.intermediate_size = f.required<int64_t>("intermediate_size");
  c.moe_intermediate_size = f.get_or<int64_t>("moe_intermediate_size", 0);
  c.n_routed_experts = f.get_or<int64_t>("n_routed_experts", 0);
  c.n_shared_experts = f.get_or<int64_t>("n_shared_experts", 0);
  c.num_experts_per_tok = f.get_or<int64_t>("num_experts_per_tok", 0);
  c.n_group = f.get_or<int64_t>("n_group", 1);
  c.topk_group = f.get_or<int64_t>("topk_group", 1);
  c.first_k_dense_replace = f.get_or<int64_t>("first_k_dense_replace", 0);
  c.moe_layer_freq = f.get_or<int64_t>("moe_layer_freq", 1);
  c.routed_scaling_factor = f.get_or<double>("routed_scaling_factor", 1.0);
  c.norm_topk_prob = f.get_or<bool>("norm_topk_prob", false);
  c.rms_norm_eps = f.get_or<double>("rms_norm_eps", 1e-6);
  c.max_position_embeddings = f.get_or<int64_t>("max_position_embeddings", 4096);
  c.tie_word_embeddings = f.get_or<bool>("tie_word_embeddings", false);
  c.rope = parse_rope(f);

  // The MLPs are SwiGLU; another activation would load and compute the wrong function.
  const std::string act = f.get_or<std::string>("hidden_act", "silu");
  MLA_REQUIRE(act == "silu", "config field `hidden_act` is `{}`; only silu is supported", act);

  const bool v3 = c.family == ModelFamily::kDeepseekV3;
  c.rope_interleave = f.get_or<bool>("rope_interleave", true);
  const std::string topk_method = f.get_or<std::string>("topk_method", v3 ? "noaux_tc" : "greedy");
  if (topk_method == "noaux_tc") {
    c.gate = GateKind::kSigmoidNoauxTc;
  } else if (topk_method == "greedy") {
    c.gate = GateKind::kSoftmaxGreedy;
  } else if (topk_method == "group_limited_greedy") {
    c.gate = GateKind::kSoftmaxGroupLimited;
  } else {
    MLA_THROW(kInvalidArgument, "topk_method `{}` is not supported", topk_method);
  }

  if (const json* eos = f.find("eos_token_id")) {
    const auto is_id = [](const json& v) {
      return v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() <= INT32_MAX;
    };
    const bool ok = eos->is_array() ? std::ranges::all_of(*eos, is_id) : is_id(*eos);
    MLA_REQUIRE(ok, "config field `eos_token_id` must be a token id or a list of them");
    if (eos->is_array()) {
      for (const json& v : *eos) c.eos_token_ids.push_back(v.get<int32_t>());
    } else {
      c.eos_token_ids.push_back(eos->get<int32_t>());
    }
  }
  if (const std::optional<Fields> q = f.object("quantization_config")) {
    c.fp8_checkpoint = true;
    if (const json* b = q->find("weight_block_size")) {
      const bool ok =
          b->is_array() && b->size() == 2 && std::ranges::all_of(*b, [](const json& v) {
            return v.is_number_integer() && v.get<int64_t>() > 0 && v.get<int64_t>() <= INT32_MAX;
          });
      MLA_REQUIRE(ok, "config field `{}` must be two positive integers",
                  q->name("weight_block_size"));
      c.fp8_block = {(*b)[0].get<int>(), (*b)[1].get<int>()};
    }
    // Block-scaled fp8 is the one quantisation the loader dequantises; any other method's
    // tensors would be read as plain weights.
    const std::string method = q->required<std::string>("quant_method");
    MLA_REQUIRE(method == "fp8",
                "config field `{}` is `{}`; only fp8 (e4m3 with block scales) is supported",
                q->name("quant_method"), method);
    const std::string fmt = q->get_or<std::string>("fmt", "e4m3");
    MLA_REQUIRE(fmt == "e4m3", "config field `{}` is `{}`; only e4m3 is supported", q->name("fmt"),
                fmt);
  }
  c.validate();
  return c;
}

ModelConfig ModelConfig::load(const std::string& model_dir) {
  require_directory(model_dir, "model directory");
  const std::string path = (fs::path(model_dir) / "config.json").string();
  require_file(path, "model config");
  std::ifstream in(path);
  if (!in) MLA_THROW(kFailedPrecondition, "cannot read {}: {}", path, std::strerror(errno));
  json j;
  try {
    in >> j;
  } catch (const json::parse_error& e) {
    // The parser's message quotes the bytes it stopped at; the position says enough.
    MLA_THROW(kInvalidArgument, "{} is not valid JSON (error at byte {})", path, e.byte);
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
      {"topk_method", gate == GateKind::kSigmoidNoauxTc  ? "noaux_tc"
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
  // Sizes are checked against their bounds before anything is sized from them.
  auto size = [](int64_t v, const char* name, int64_t max) {
    MLA_REQUIRE(v > 0, "config field `{}` must be positive, got {}", name, v);
    MLA_REQUIRE(v <= max, "config field `{}` is {}, above the supported maximum {}", name, v, max);
  };
  auto count = [](int64_t v, const char* name, int64_t max) {
    MLA_REQUIRE(v >= 0 && v <= max, "config field `{}` is {}, outside the supported [0, {}]", name,
                v, max);
  };
  size(vocab_size, "vocab_size", kMaxVocabSize);
  size(hidden_size, "hidden_size", kMaxWidth);
  size(num_layers, "num_hidden_layers", kMaxLayers);
  size(num_heads, "num_attention_heads", kMaxHeads);
  count(q_lora_rank, "q_lora_rank", kMaxWidth);
  size(kv_lora_rank, "kv_lora_rank", kMaxWidth);
  size(qk_rope_head_dim, "qk_rope_head_dim", kMaxHeadDim);
  size(qk_nope_head_dim, "qk_nope_head_dim", kMaxHeadDim);
  size(v_head_dim, "v_head_dim", kMaxHeadDim);
  size(intermediate_size, "intermediate_size", kMaxIntermediateSize);
  count(moe_intermediate_size, "moe_intermediate_size", kMaxIntermediateSize);
  count(n_routed_experts, "n_routed_experts", kMaxExperts);
  count(n_shared_experts, "n_shared_experts", kMaxExperts);
  count(first_k_dense_replace, "first_k_dense_replace", kMaxLayers);
  size(max_position_embeddings, "max_position_embeddings", kMaxPositions);
  MLA_REQUIRE(qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even, got {}", qk_rope_head_dim);
  MLA_REQUIRE(rms_norm_eps >= 0, "config field `rms_norm_eps` must be >= 0, got {}", rms_norm_eps);
  if (n_routed_experts > 0) {
    size(moe_intermediate_size, "moe_intermediate_size", kMaxIntermediateSize);
    size(num_experts_per_tok, "num_experts_per_tok", kMaxExperts);
    size(n_group, "n_group", kMaxExperts);
    size(moe_layer_freq, "moe_layer_freq", kMaxLayers);
    MLA_REQUIRE(num_experts_per_tok <= n_routed_experts,
                "num_experts_per_tok ({}) exceeds n_routed_experts ({})", num_experts_per_tok,
                n_routed_experts);
    MLA_REQUIRE(n_routed_experts % n_group == 0,
                "n_routed_experts ({}) is not divisible by n_group ({})", n_routed_experts,
                n_group);
    MLA_REQUIRE(topk_group >= 1 && topk_group <= n_group,
                "topk_group ({}) must be in [1, n_group={}]", topk_group, n_group);
    MLA_REQUIRE(gate != GateKind::kSigmoidNoauxTc || n_routed_experts / n_group >= 2,
                "noaux_tc needs at least 2 experts per group");
    MLA_REQUIRE(num_experts_per_tok <= topk_group * (n_routed_experts / n_group),
                "num_experts_per_tok ({}) exceeds the experts in topk_group groups",
                num_experts_per_tok);
  }
  // RoPE: theta, and YaRN's factor, original length and betas enter logarithms and divisions;
  // a value <= 0 gives NaN frequencies and NaN logits, not an error, further down.
  MLA_REQUIRE(rope.theta > 0, "config field `rope_theta` must be positive, got {}", rope.theta);
  if (rope.type == RopeType::kYarn) {
    MLA_REQUIRE(rope.factor > 0, "rope factor must be positive, got {}", rope.factor);
    MLA_REQUIRE(rope.original_max_position_embeddings > 0,
                "rope original_max_position_embeddings must be positive, got {}",
                rope.original_max_position_embeddings);
    MLA_REQUIRE(rope.beta_fast > 0 && rope.beta_slow > 0,
                "rope beta_fast ({}) and beta_slow ({}) must be positive", rope.beta_fast,
                rope.beta_slow);
  }
}

}  // namespace mla
