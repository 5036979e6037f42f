// ModelConfig parsing: the golden transformers configs, both rope layouts, the published
// DeepSeek-V3 numbers, serialisation and the errors a bad config.json gets.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "kernels/error.h"
#include "runtime/model_config.h"
#include "runtime/tiny_checkpoint.h"

namespace mla {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;

const std::vector<std::string> kGoldenModels = {"v3", "v3_plain", "v2_lite", "v2_group"};

std::string golden_dir(const std::string& name) {
  return std::string(MLA_TEST_DATA_DIR) + "/" + name;
}

json read_json(const std::string& path) {
  json j;
  std::ifstream(path) >> j;
  return j;
}

// The mla::Error that `f` throws; a test failure if it throws none (or something else).
template <typename F>
Error error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected an mla::Error, got another exception: " << e.what();
    return Error(ErrorCode::kInternal, "wrong exception type");
  }
  ADD_FAILURE() << "expected an mla::Error";
  return Error(ErrorCode::kInternal, "nothing thrown");
}

// DeepSeek-V3's published config.json (deepseek-ai/DeepSeek-V3), older rope layout.
json deepseek_v3_published() {
  return json::parse(R"({
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": true,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": false,
    "rope_theta": 10000,
    "rope_scaling": {
      "beta_fast": 32,
      "beta_slow": 1,
      "factor": 40,
      "mscale": 1.0,
      "mscale_all_dim": 1.0,
      "original_max_position_embeddings": 4096,
      "type": "yarn"
    },
    "bos_token_id": 0,
    "eos_token_id": 1,
    "quantization_config": {
      "activation_scheme": "dynamic",
      "fmt": "e4m3",
      "quant_method": "fp8",
      "weight_block_size": [128, 128]
    },
    "torch_dtype": "bfloat16"
  })");
}

// The same config in the newer transformers layout: rope_parameters carrying rope_theta.
json to_newer_layout(json j) {
  json rp = j["rope_scaling"];
  rp["rope_type"] = rp["type"];
  rp.erase("type");
  rp["rope_theta"] = j["rope_theta"];
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = rp;
  return j;
}

// The older layout: rope_scaling (null for default rope) plus a top-level rope_theta.
json to_older_layout(json j) {
  json rp = j["rope_parameters"];
  j.erase("rope_parameters");
  j["rope_theta"] = rp["rope_theta"];
  rp.erase("rope_theta");
  if (rp.value("rope_type", "default") == "default") {
    j["rope_scaling"] = nullptr;
  } else {
    rp["type"] = rp["rope_type"];
    rp.erase("rope_type");
    j["rope_scaling"] = rp;
  }
  return j;
}

void expect_same_derived(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.rope_inv_freq(), b.rope_inv_freq());
  EXPECT_EQ(a.rope_attention_factor(), b.rope_attention_factor());
  EXPECT_EQ(a.softmax_scale(), b.softmax_scale());
  EXPECT_EQ(a.rope.type, b.rope.type);
  EXPECT_EQ(a.rope.theta, b.rope.theta);
  EXPECT_EQ(a.rope.factor, b.rope.factor);
  EXPECT_EQ(a.rope.original_max_position_embeddings, b.rope.original_max_position_embeddings);
  EXPECT_EQ(a.rope.mscale, b.rope.mscale);
  EXPECT_EQ(a.rope.mscale_all_dim, b.rope.mscale_all_dim);
}

// Every parsed field, so a round trip that drops one fails.
void expect_same_config(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.family, b.family);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.num_layers, b.num_layers);
  EXPECT_EQ(a.num_heads, b.num_heads);
  EXPECT_EQ(a.q_lora_rank, b.q_lora_rank);
  EXPECT_EQ(a.kv_lora_rank, b.kv_lora_rank);
  EXPECT_EQ(a.qk_rope_head_dim, b.qk_rope_head_dim);
  EXPECT_EQ(a.qk_nope_head_dim, b.qk_nope_head_dim);
  EXPECT_EQ(a.v_head_dim, b.v_head_dim);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.moe_intermediate_size, b.moe_intermediate_size);
  EXPECT_EQ(a.n_routed_experts, b.n_routed_experts);
  EXPECT_EQ(a.n_shared_experts, b.n_shared_experts);
  EXPECT_EQ(a.num_experts_per_tok, b.num_experts_per_tok);
  EXPECT_EQ(a.n_group, b.n_group);
  EXPECT_EQ(a.topk_group, b.topk_group);
  EXPECT_EQ(a.first_k_dense_replace, b.first_k_dense_replace);
  EXPECT_EQ(a.moe_layer_freq, b.moe_layer_freq);
  EXPECT_EQ(a.routed_scaling_factor, b.routed_scaling_factor);
  EXPECT_EQ(a.norm_topk_prob, b.norm_topk_prob);
  EXPECT_EQ(a.gate, b.gate);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.rope_interleave, b.rope_interleave);
  EXPECT_EQ(a.rope.beta_fast, b.rope.beta_fast);
  EXPECT_EQ(a.rope.beta_slow, b.rope.beta_slow);
  EXPECT_EQ(a.rope.attention_factor, b.rope.attention_factor);
  EXPECT_EQ(a.rope.truncate, b.rope.truncate);
  expect_same_derived(a, b);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
}

// ---------------------------------------------------------------------------------------
// Golden configs

TEST(ModelConfig, GoldenConfigsParseAndDeriveWhatTransformersUsed) {
  for (const auto& name : kGoldenModels) {
    SCOPED_TRACE(name);
    const json raw = read_json(golden_dir(name) + "/config.json");
    const json golden = read_json(golden_dir(name) + "/golden.json");
    const ModelConfig c = ModelConfig::load(golden_dir(name));
    EXPECT_EQ(c.family_name(), raw["model_type"].get<std::string>());
    EXPECT_EQ(c.hidden_size, raw["hidden_size"].get<int64_t>());
    EXPECT_EQ(c.num_layers, raw["num_hidden_layers"].get<int64_t>());
    EXPECT_EQ(c.q_lora_rank, raw["q_lora_rank"].is_null() ? 0 : raw["q_lora_rank"].get<int64_t>());
    EXPECT_EQ(c.rope_interleave, raw.value("rope_interleave", true));
    EXPECT_EQ(c.rope.type == RopeType::kYarn ? "yarn" : "default",
              golden["rope_type"].get<std::string>());

    const auto inv = c.rope_inv_freq();
    const auto want = golden["rope_inv_freq"].get<std::vector<double>>();
    ASSERT_EQ(inv.size(), want.size());
    for (size_t i = 0; i < inv.size(); ++i) EXPECT_NEAR(inv[i], want[i], 1e-7 * want[i]) << i;
    EXPECT_NEAR(c.rope_attention_factor(), golden["rope_attention_scaling"].get<double>(), 1e-7);
    EXPECT_NEAR(c.softmax_scale(), golden["softmax_scale"].get<double>(), 1e-9);
  }
}

TEST(ModelConfig, OlderAndNewerRopeLayoutsGiveIdenticalValues) {
  for (const auto& name : kGoldenModels) {
    SCOPED_TRACE(name);
    const json newer = read_json(golden_dir(name) + "/config.json");
    const json older = to_older_layout(newer);
    ASSERT_FALSE(older.contains("rope_parameters"));
    expect_same_config(ModelConfig::from_json(newer), ModelConfig::from_json(older));
  }
  // And the other way round, from V3's published (older-layout) config.
  const json older = deepseek_v3_published();
  const ModelConfig a = ModelConfig::from_json(older);
  const ModelConfig b = ModelConfig::from_json(to_newer_layout(older));
  expect_same_config(a, b);
  EXPECT_EQ(a.rope.type, RopeType::kYarn);
  EXPECT_EQ(a.rope.factor, 40.0);
}

TEST(ModelConfig, RopeThetaOutsideDefaultRopeScaling) {
  json j = read_json(golden_dir("v3_plain") + "/config.json");
  j.erase("rope_parameters");
  j["rope_theta"] = 50000.0;
  j["rope_scaling"] = nullptr;
  const ModelConfig c = ModelConfig::from_json(j);
  EXPECT_EQ(c.rope.type, RopeType::kDefault);
  EXPECT_EQ(c.rope.theta, 50000.0);
  EXPECT_FLOAT_EQ(c.rope_inv_freq()[1], std::pow(50000.0f, -2.0f / 16.0f));
}

TEST(ModelConfig, HeadDimIsIgnored) {
  json j = read_json(golden_dir("v3") + "/config.json");
  ASSERT_TRUE(j.contains("head_dim"));
  const ModelConfig with = ModelConfig::from_json(j);
  j["head_dim"] = 999;
  expect_same_config(with, ModelConfig::from_json(j));
  j.erase("head_dim");
  expect_same_config(with, ModelConfig::from_json(j));
  EXPECT_EQ(with.qk_head_dim(), 32);
}

TEST(ModelConfig, NullQLoraRankMeansNoQLora) {
  json j = read_json(golden_dir("v3") + "/config.json");
  j["q_lora_rank"] = nullptr;
  const ModelConfig c = ModelConfig::from_json(j);
  EXPECT_EQ(c.q_lora_rank, 0);
  EXPECT_EQ(c.q_in_dim(), c.hidden_size);
  j.erase("q_lora_rank");
  EXPECT_EQ(ModelConfig::from_json(j).q_lora_rank, 0);
  j["q_lora_rank"] = 48;
  EXPECT_EQ(ModelConfig::from_json(j).q_in_dim(), 48);
}

TEST(ModelConfig, EosTokenIdAsIntOrList) {
  json j = read_json(golden_dir("v3") + "/config.json");
  j["eos_token_id"] = 7;
  EXPECT_EQ(ModelConfig::from_json(j).eos_token_ids, (std::vector<int32_t>{7}));
  j["eos_token_id"] = {100001, 100008, 3};
  EXPECT_EQ(ModelConfig::from_json(j).eos_token_ids, (std::vector<int32_t>{100001, 100008, 3}));
  j["eos_token_id"] = nullptr;
  EXPECT_TRUE(ModelConfig::from_json(j).eos_token_ids.empty());
}

TEST(ModelConfig, QuantizationBlockSizeIsRead) {
  json j = read_json(golden_dir("v3") + "/config.json");
  EXPECT_EQ(ModelConfig::from_json(j).fp8_block, (std::array<int, 2>{128, 128}));  // default
  j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {64, 32}}};
  EXPECT_EQ(ModelConfig::from_json(j).fp8_block, (std::array<int, 2>{64, 32}));
}

TEST(ModelConfig, DeepseekV3PublishedNumbers) {
  const ModelConfig c = ModelConfig::from_json(deepseek_v3_published());
  EXPECT_EQ(c.family, ModelFamily::kDeepseekV3);
  EXPECT_EQ(c.latent_width(), 576);
  EXPECT_EQ(c.qk_head_dim(), 192);
  EXPECT_EQ(c.q_in_dim(), 1536);
  EXPECT_EQ(c.gate, GateKind::kSigmoidNoauxTc);
  EXPECT_FALSE(c.is_moe_layer(2));
  EXPECT_TRUE(c.is_moe_layer(3));
  EXPECT_TRUE(c.is_moe_layer(60));
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{1}));
  EXPECT_EQ(c.fp8_block, (std::array<int, 2>{128, 128}));

  const double m = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(c.softmax_scale(), std::pow(192.0, -0.5) * m * m, 1e-12);
  // mscale == mscale_all_dim: the two YaRN magnitudes cancel on cos/sin.
  EXPECT_FLOAT_EQ(c.rope_attention_factor(), 1.0f);

  // YaRN correction range for d_r 64, original length 4096, base 1e4: dims below
  // floor(10.47) keep their frequency, dims from ceil(22.5) on are divided by the factor 40.
  const auto inv = c.rope_inv_freq();
  ASSERT_EQ(inv.size(), 32u);
  auto base_freq = [](int i) { return std::pow(10000.0, -2.0 * i / 64.0); };
  for (int i : {0, 5, 10}) EXPECT_NEAR(inv[i], base_freq(i), 1e-6 * base_freq(i)) << i;
  for (int i : {23, 27, 31}) EXPECT_NEAR(inv[i], base_freq(i) / 40, 1e-6 * base_freq(i) / 40) << i;
  // Between them a linear ramp: dim 16 is (16 - 10) / (23 - 10) of the way to interpolation.
  const double ramp = 6.0 / 13.0;
  EXPECT_NEAR(inv[16], base_freq(16) * (1 - ramp) + base_freq(16) / 40 * ramp,
              1e-6 * base_freq(16));
}

TEST(ModelConfig, ToJsonRoundTripsThroughFromJson) {
  std::vector<ModelConfig> configs;
  for (const auto& name : kGoldenModels) configs.push_back(ModelConfig::load(golden_dir(name)));
  for (const auto& name : model_preset_names()) configs.push_back(model_preset(name));
  configs.push_back(ModelConfig::from_json(deepseek_v3_published()));
  for (const ModelConfig& c : configs) {
    SCOPED_TRACE(c.to_json().dump());
    const ModelConfig back = ModelConfig::from_json(c.to_json());
    expect_same_config(c, back);
    EXPECT_EQ(back.to_json(), c.to_json());
  }
}

// The full-size presets are the published shapes (benchmarks cut their layers, nothing else).
TEST(ModelConfig, V3FullPresetIsThePublishedConfig) {
  expect_same_config(model_preset("v3-full"), ModelConfig::from_json(deepseek_v3_published()));
}

// Fields a round trip must not drop even though the common configs leave them at defaults.
TEST(ModelConfig, ToJsonKeepsEosListAndYarnExtras) {
  json j = deepseek_v3_published();
  j["eos_token_id"] = {1, 128815};
  j["rope_scaling"]["attention_factor"] = 0.8;
  j["rope_scaling"]["truncate"] = false;
  const ModelConfig c = ModelConfig::from_json(j);
  ASSERT_EQ(c.eos_token_ids, (std::vector<int32_t>{1, 128815}));
  ASSERT_FLOAT_EQ(c.rope_attention_factor(), 0.8f);
  const ModelConfig back = ModelConfig::from_json(c.to_json());
  EXPECT_EQ(back.eos_token_ids, c.eos_token_ids);
  EXPECT_EQ(back.rope_attention_factor(), c.rope_attention_factor());
  EXPECT_EQ(back.rope_inv_freq(), c.rope_inv_freq());
}

// ---------------------------------------------------------------------------------------
// Errors

void expect_invalid(const json& j, const std::string& field) {
  SCOPED_TRACE(field);
  const Error e = error_of([&] { ModelConfig::from_json(j); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr(field));
}

TEST(ModelConfig, ErrorsNameTheField) {
  const json good = read_json(golden_dir("v3") + "/config.json");
  ASSERT_NO_THROW(ModelConfig::from_json(good));

  json j = good;
  j.erase("hidden_size");
  expect_invalid(j, "hidden_size");

  j = good;
  j["hidden_size"] = nullptr;
  expect_invalid(j, "hidden_size");

  j = good;
  j["hidden_size"] = "64";
  expect_invalid(j, "hidden_size");

  j = good;
  j["kv_lora_rank"] = 0;
  expect_invalid(j, "kv_lora_rank");

  j = good;
  j["model_type"] = "llama";
  expect_invalid(j, "llama");
  expect_invalid(j, "model_type");

  j = good;
  j["rope_parameters"]["rope_type"] = "longrope";
  expect_invalid(j, "longrope");

  j = good;
  j["topk_method"] = "random";
  expect_invalid(j, "topk_method");

  j = good;
  j["n_routed_experts"] = 18;  // n_group 4
  expect_invalid(j, "n_group");
  expect_invalid(j, "n_routed_experts");

  j = good;
  j["qk_rope_head_dim"] = 15;
  expect_invalid(j, "qk_rope_head_dim");

  j = good;
  j["topk_group"] = 5;  // n_group 4
  expect_invalid(j, "topk_group");

  j = good;
  j["rope_parameters"].erase("factor");
  expect_invalid(j, "factor");

  expect_invalid(json::array({1, 2}), "not a JSON object");
}

// Fields read outside get_or/get_required must also fail as kInvalidArgument, not as a raw
// nlohmann exception that the CLI and RPC boundaries do not map.
TEST(ModelConfig, WrongTypeInEosOrBlockSizeIsInvalidArgument) {
  const json good = read_json(golden_dir("v3") + "/config.json");
  json j = good;
  j["eos_token_id"] = "</s>";
  expect_invalid(j, "eos_token_id");

  j = good;
  j["eos_token_id"] = {1, "2"};
  expect_invalid(j, "eos_token_id");

  j = good;
  j["quantization_config"] = {{"weight_block_size", {"128", "128"}}};
  expect_invalid(j, "weight_block_size");
}

// Values that used to load and then compute NaN or the wrong function.
TEST(ModelConfig, RopeThetaMustBePositive) {
  const json good = read_json(golden_dir("v3") + "/config.json");
  for (double theta : {0.0, -10000.0}) {
    json j = good;
    j["rope_parameters"]["rope_theta"] = theta;
    expect_invalid(j, "rope_parameters.rope_theta");

    j = to_older_layout(good);
    j["rope_theta"] = theta;
    expect_invalid(j, "`rope_theta`");
  }
  json j = to_older_layout(read_json(golden_dir("v3_plain") + "/config.json"));
  ASSERT_TRUE(j["rope_scaling"].is_null());
  j["rope_theta"] = 0;
  expect_invalid(j, "rope_theta");
}

TEST(ModelConfig, RopeObjectsMustBeObjectsOrNull) {
  const json good = read_json(golden_dir("v3") + "/config.json");
  for (const json& bad : {json("yarn"), json(10000), json::array({4.0}), json(true)}) {
    SCOPED_TRACE(bad.dump());
    json j = good;
    j["rope_parameters"] = bad;
    expect_invalid(j, "rope_parameters");

    j = to_older_layout(good);
    j["rope_scaling"] = bad;
    expect_invalid(j, "rope_scaling");
  }
  json j = good;
  j["rope_parameters"]["factor"] = "4";
  expect_invalid(j, "rope_parameters.factor");
}

TEST(ModelConfig, BothRopeLayoutsMustAgree) {
  const json newer = read_json(golden_dir("v3") + "/config.json");
  const json older = to_older_layout(newer);
  json both = newer;
  both["rope_scaling"] = older["rope_scaling"];
  both["rope_theta"] = older["rope_theta"];
  expect_same_config(ModelConfig::from_json(both), ModelConfig::from_json(newer));

  json j = both;
  j["rope_scaling"]["factor"] = 40.0;
  expect_invalid(j, "disagree on `factor`");
  expect_invalid(j, "rope_scaling");

  j = both;
  j["rope_scaling"] = {{"type", "default"}};
  expect_invalid(j, "disagree on `rope_type`");

  j = both;
  j["rope_theta"] = 50000.0;
  expect_invalid(j, "`rope_theta` (50000) and `rope_parameters.rope_theta` (10000) disagree");
}

TEST(ModelConfig, HiddenActMustBeSilu) {
  json j = read_json(golden_dir("v3") + "/config.json");
  j["hidden_act"] = "gelu";
  expect_invalid(j, "hidden_act");
  expect_invalid(j, "gelu");
  j["hidden_act"] = 1;
  expect_invalid(j, "hidden_act");
  j.erase("hidden_act");
  EXPECT_NO_THROW(ModelConfig::from_json(j));
}

TEST(ModelConfig, SizesMustBeJsonIntegers) {
  const json good = read_json(golden_dir("v3") + "/config.json");
  const json not_integers[] = {
      64.5, 64.0, "64", true, 1e20, json::array({64}), json(std::numeric_limits<uint64_t>::max())};
  for (const char* field : {"hidden_size", "num_hidden_layers", "vocab_size", "n_routed_experts",
                            "max_position_embeddings"}) {
    for (const json& bad : not_integers) {
      SCOPED_TRACE(bad.dump());
      json j = good;
      j[field] = bad;
      expect_invalid(j, field);
    }
  }
  json j = good;
  j["rope_parameters"]["original_max_position_embeddings"] = 64.5;
  expect_invalid(j, "rope_parameters.original_max_position_embeddings");
  j = good;
  j["eos_token_id"] = 1.5;
  expect_invalid(j, "eos_token_id");
  j = good;
  j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128.5, 128}}};
  expect_invalid(j, "weight_block_size");
}

TEST(ModelConfig, RmsNormEpsMustNotBeNegative) {
  json j = read_json(golden_dir("v3") + "/config.json");
  j["rms_norm_eps"] = -1e-6;
  expect_invalid(j, "rms_norm_eps");
  j["rms_norm_eps"] = "1e-6";
  expect_invalid(j, "rms_norm_eps");
  j["rms_norm_eps"] = 0.0;
  EXPECT_EQ(ModelConfig::from_json(j).rms_norm_eps, 0.0);
}

TEST(ModelConfig, OnlyFp8E4m3QuantizationIsSupported) {
  const json good = read_json(golden_dir("v3") + "/config.json");
  json j = good;
  j["quantization_config"] = deepseek_v3_published()["quantization_config"];
  EXPECT_EQ(ModelConfig::from_json(j).fp8_block, (std::array<int, 2>{128, 128}));
  j["quantization_config"] = nullptr;
  EXPECT_NO_THROW(ModelConfig::from_json(j));

  for (const char* method : {"awq", "gptq", "bitsandbytes", "compressed-tensors"}) {
    j = good;
    j["quantization_config"] = {{"quant_method", method}, {"bits", 4}};
    expect_invalid(j, "quantization_config.quant_method");
    expect_invalid(j, method);
  }
  j = good;
  j["quantization_config"] = {{"weight_block_size", {128, 128}}};
  expect_invalid(j, "quantization_config.quant_method");
  j = good;
  j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e5m2"}};
  expect_invalid(j, "quantization_config.fmt");
  j = good;
  j["quantization_config"] = "fp8";
  expect_invalid(j, "quantization_config");
}

TEST(ModelConfig, AbsurdSizesFailNamingTheField) {
  const json good = read_json(golden_dir("v3") + "/config.json");
  const std::pair<const char*, int64_t> absurd[] = {
      {"num_hidden_layers", 10'000'000},
      {"hidden_size", 1'000'000'000},
      {"vocab_size", int64_t{1} << 40},
      {"num_attention_heads", 1'000'000},
      {"kv_lora_rank", 1'000'000'000},
      {"q_lora_rank", 1'000'000'000},
      {"qk_nope_head_dim", 1'000'000},
      {"v_head_dim", 1'000'000},
      {"intermediate_size", 1'000'000'000},
      {"moe_intermediate_size", 1'000'000'000},
      {"n_routed_experts", 1'000'000},
      {"n_shared_experts", 1'000'000},
      {"max_position_embeddings", int64_t{1} << 40},
      {"first_k_dense_replace", 10'000'000},
  };
  for (const auto& [field, value] : absurd) {
    json j = good;
    j[field] = value;
    expect_invalid(j, fmt::format("`{}` is {}", field, value));
  }
  // The bounds themselves are allowed.
  json j = good;
  j["num_hidden_layers"] = ModelConfig::kMaxLayers;
  j["max_position_embeddings"] = ModelConfig::kMaxPositions;
  j["vocab_size"] = ModelConfig::kMaxVocabSize;
  EXPECT_EQ(ModelConfig::from_json(j).num_layers, ModelConfig::kMaxLayers);
  j["num_hidden_layers"] = ModelConfig::kMaxLayers + 1;
  expect_invalid(j, "num_hidden_layers");
}

TEST(ModelConfig, MaxPositionEmbeddingsMustBePositive) {
  json j = read_json(golden_dir("v3") + "/config.json");
  for (int64_t bad : {0, -4096}) {
    j["max_position_embeddings"] = bad;
    expect_invalid(j, "max_position_embeddings");
  }
}

TEST(ModelConfig, YarnValuesThatGiveNanAreErrors) {
  const json good = read_json(golden_dir("v3") + "/config.json");
  for (const char* field :
       {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow"}) {
    json j = good;
    j["rope_parameters"][field] = 0;
    expect_invalid(j, field);
  }
}

class ModelConfigFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = (fs::path(::testing::TempDir()) /
            fmt::format("mla_{}_{}_{}", test->test_suite_name(), test->name(), ::getpid()))
               .string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string dir_;
};

TEST_F(ModelConfigFiles, MissingDirIsNotFound) {
  const std::string missing = dir_ + "/no_such_model";
  const Error e = error_of([&] { ModelConfig::load(missing); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  EXPECT_THAT(e.what(), HasSubstr("model directory " + missing + " does not exist"));

  const Error no_config = error_of([&] { ModelConfig::load(dir_); });
  EXPECT_EQ(no_config.code(), ErrorCode::kNotFound);
  EXPECT_THAT(no_config.what(), HasSubstr("model config " + dir_ + "/config.json does not exist"));
}

TEST_F(ModelConfigFiles, ModelDirThatIsAFileNamesThePath) {
  const std::string file = dir_ + "/model.safetensors";
  std::ofstream(file) << "weights";
  const Error e = error_of([&] { ModelConfig::load(file); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr("model directory " + file + " is not a directory"));
}

TEST_F(ModelConfigFiles, InvalidJsonNamesThePath) {
  std::ofstream(dir_ + "/config.json") << R"({"hidden_size": 64,)";
  const Error e = error_of([&] { ModelConfig::load(dir_); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr(dir_ + "/config.json"));
}

TEST_F(ModelConfigFiles, InvalidJsonIsNotQuoted) {
  // An unterminated string: the JSON parser's own message would quote all of it.
  std::ofstream(dir_ + "/config.json") << "\"api_key=sk-5ecret\n";
  const Error e = error_of([&] { ModelConfig::load(dir_); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr(dir_ + "/config.json is not valid JSON"));
  EXPECT_THAT(e.what(), Not(HasSubstr("api")));
  EXPECT_THAT(e.what(), Not(HasSubstr("5ecret")));
}

TEST_F(ModelConfigFiles, BadFieldNamesPathAndField) {
  json j = read_json(golden_dir("v2_lite") + "/config.json");
  j.erase("kv_lora_rank");
  std::ofstream(dir_ + "/config.json") << j.dump();
  const Error e = error_of([&] { ModelConfig::load(dir_); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr(dir_ + "/config.json"));
  EXPECT_THAT(e.what(), HasSubstr("kv_lora_rank"));
}

TEST_F(ModelConfigFiles, LoadReadsWhatToJsonWrote) {
  const ModelConfig c = model_preset("v2-lite");
  std::ofstream(dir_ + "/config.json") << c.to_json().dump(2);
  expect_same_config(ModelConfig::load(dir_), c);
}

}  // namespace
}  // namespace mla
