// Loading checkpoints into the model: storage dtypes, the fused-expert layout, the skipped
// multi-token-prediction layer, and errors that name what is wrong.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <utility>

#include "runtime/checkpoint.h"
#include "runtime/deepseek_model.h"
#include "runtime/safetensors.h"
#include "runtime/tiny_checkpoint.h"

namespace mla {
namespace {

namespace fs = std::filesystem;
using testing::HasSubstr;

std::string temp_dir(const std::string& name) {
  const fs::path dir = fs::path(testing::TempDir()) / ("mla_model_load_" + name);
  fs::remove_all(dir);
  return dir.string();
}

// Logits of the last token of a fixed prompt.
std::vector<float> prompt_logits(const DeepseekModel& m) {
  LatentCache cache(m.cache_geometry(4), 8);
  BlockTable table;
  const std::vector<int32_t> prompt = {3, 14, 15, 92, 65, 35, 89};
  EXPECT_TRUE(cache.reserve(table, static_cast<int32_t>(prompt.size())));
  ForwardBatch batch{prompt, {{&table, 0, static_cast<int32_t>(prompt.size()), true}}};
  Tensor logits = m.make_runner(cache)->forward(batch);
  return {logits.f32(), logits.f32() + logits.numel()};
}

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    err += (a[i] - b[i]) * (a[i] - b[i]);
    norm += b[i] * b[i];
  }
  return std::sqrt(err / norm);
}

ModelOptions quiet() { return {AbsorbMode::kAuto, CostModel{}, false}; }

TEST(ModelLoad, Bf16AndFp8CheckpointsTrackTheF32One) {
  const ModelConfig config = model_preset("v3");
  const std::string f32 = temp_dir("f32"), bf16 = temp_dir("bf16"), fp8 = temp_dir("fp8");
  write_random_checkpoint(config, f32, 11, DType::kF32);
  write_random_checkpoint(config, bf16, 11, DType::kBF16);
  write_random_checkpoint(config, fp8, 11, DType::kF8E4M3);
  EXPECT_TRUE(Checkpoint::open(fp8).has("model.layers.1.self_attn.kv_b_proj.weight_scale_inv"));
  EXPECT_EQ(Checkpoint::open(fp8).info("model.layers.1.self_attn.kv_b_proj.weight").dtype,
            DType::kF8E4M3);
  const auto ref = prompt_logits(*DeepseekModel::load(f32, quiet()));
  // Rounding the weights to bf16 (8 mantissa bits) or fp8 (3 bits, block-scaled) moves the
  // logits by about that relative amount, no more.
  EXPECT_LT(rel_error(prompt_logits(*DeepseekModel::load(bf16, quiet())), ref), 0.02);
  EXPECT_LT(rel_error(prompt_logits(*DeepseekModel::load(fp8, quiet())), ref), 0.15);
}

// Tensors of 2^20 values and more are narrowed and quantised on all cores: each bf16 value is
// its f32 value rounded, and each 128x128 fp8 block scaled by its amax / 448, exactly as the
// serial loops did (the embedding and the dense layer's gate_proj, 16384 x 64 each, here).
TEST(ModelLoad, LargeTensorsNarrowAndQuantiseValueByValue) {
  ModelConfig config = model_preset("v3");
  config.vocab_size = 16384;
  config.intermediate_size = 16384;
  const std::string f32 = temp_dir("big_f32"), bf16 = temp_dir("big_bf16"),
                    fp8 = temp_dir("big_fp8");
  write_random_checkpoint(config, f32, 13, DType::kF32);
  write_random_checkpoint(config, bf16, 13, DType::kBF16);
  write_random_checkpoint(config, fp8, 13, DType::kF8E4M3);
  const auto wide = SafetensorsFile::open(f32 + "/model.safetensors");
  const auto narrow = SafetensorsFile::open(bf16 + "/model.safetensors");
  const auto quant = SafetensorsFile::open(fp8 + "/model.safetensors");

  const Tensor embed = wide->tensor("model.embed_tokens.weight");
  ASSERT_GE(embed.numel(), int64_t{1} << 20);
  const Tensor embed16 = narrow->tensor("model.embed_tokens.weight");
  for (int64_t i = 0; i < embed.numel(); ++i) {
    ASSERT_EQ(embed16.data<uint16_t>()[i], f32_to_bf16(embed.f32()[i])) << "value " << i;
  }

  const std::string gate = "model.layers.0.mlp.gate_proj.weight";
  const Tensor w = wide->tensor(gate);
  ASSERT_GE(w.numel(), int64_t{1} << 20);
  const Tensor codes = quant->tensor(gate), scales = quant->tensor(gate + "_scale_inv");
  const int64_t rows = w.dim(0), cols = w.dim(1), bc = (cols + 127) / 128;
  for (int64_t bi = 0; bi * 128 < rows; ++bi) {
    for (int64_t bj = 0; bj < bc; ++bj) {
      float amax = 0.0f;
      for (int64_t i = bi * 128; i < std::min(rows, (bi + 1) * 128); ++i)
        for (int64_t j = bj * 128; j < std::min(cols, (bj + 1) * 128); ++j)
          amax = std::max(amax, std::fabs(w.f32()[i * cols + j]));
      const float scale = amax > 0 ? amax / 448.0f : 1.0f;
      ASSERT_EQ(scales.f32()[bi * bc + bj], scale) << "block " << bi << ", " << bj;
      for (int64_t i = bi * 128; i < std::min(rows, (bi + 1) * 128); ++i)
        for (int64_t j = bj * 128; j < std::min(cols, (bj + 1) * 128); ++j)
          ASSERT_EQ(codes.data<uint8_t>()[i * cols + j],
                    f32_to_fp8e4m3(w.f32()[i * cols + j] / scale))
              << "value " << i << ", " << j;
    }
  }
}

// transformers keeps experts fused ([E, 2I, D] and [E, D, I]); checkpoints may hold either.
TEST(ModelLoad, FusedExpertLayoutEqualsPerExpertLayout) {
  const ModelConfig config = model_preset("v2-lite");
  const std::string per = temp_dir("per_expert"), fused = temp_dir("fused");
  write_random_checkpoint(config, per, 5);
  auto file = SafetensorsFile::open(per + "/model.safetensors");
  const int64_t E = config.n_routed_experts, I = config.moe_intermediate_size,
                D = config.hidden_size;
  std::vector<std::pair<std::string, Tensor>> out;
  std::map<int64_t, std::pair<Tensor, Tensor>> fused_by_layer;
  for (const auto& name : file->names()) {
    int layer = -1, expert = -1;
    char proj[16] = {};
    if (std::sscanf(name.c_str(), "model.layers.%d.mlp.experts.%d.%15[a-z]_proj", &layer, &expert,
                    proj) != 3) {
      out.emplace_back(name, file->tensor(name));
      continue;
    }
    auto& [gu, down] = fused_by_layer[layer];
    if (!gu.defined()) {
      gu = Tensor::empty({E, 2 * I, D});
      down = Tensor::empty({E, D, I});
    }
    const Tensor src = file->tensor(name);
    const std::string p(proj);
    float* dst = p == "down" ? down.f32() + expert * D * I
                             : gu.f32() + (expert * 2 * I + (p == "up" ? I : 0)) * D;
    std::memcpy(dst, src.raw(), src.nbytes());
  }
  for (auto& [layer, t] : fused_by_layer) {
    out.emplace_back(fmt::format("model.layers.{}.mlp.experts.gate_up_proj", layer), t.first);
    out.emplace_back(fmt::format("model.layers.{}.mlp.experts.down_proj", layer), t.second);
  }
  fs::create_directories(fused);
  fs::copy_file(per + "/config.json", fused + "/config.json");
  write_safetensors(fused + "/model.safetensors", out);
  EXPECT_EQ(prompt_logits(*DeepseekModel::load(fused, quiet())),
            prompt_logits(*DeepseekModel::load(per, quiet())));
}

// DeepSeek-V3 ships its multi-token-prediction head as layer num_hidden_layers; it is
// never loaded, whatever it holds.
TEST(ModelLoad, LayersPastNumHiddenLayersAreSkipped) {
  const ModelConfig config = model_preset("v3");
  const std::string dir = temp_dir("mtp");
  write_random_checkpoint(config, dir, 3);
  const auto before = prompt_logits(*DeepseekModel::load(dir, quiet()));
  const std::string mtp = fmt::format("model.layers.{}.", config.num_layers);
  write_safetensors(dir + "/mtp.safetensors",
                    {{mtp + "eh_proj.weight", Tensor::zeros({3, 5})},
                     {mtp + "self_attn.kv_b_proj.weight", Tensor::zeros({1, 1})}});
  EXPECT_EQ(prompt_logits(*DeepseekModel::load(dir, quiet())), before);
}

TEST(ModelLoad, MissingOrMisShapedTensorNamesIt) {
  const ModelConfig config = model_preset("v2-lite");
  const std::string dir = temp_dir("broken");
  write_random_checkpoint(config, dir, 3);
  auto file = SafetensorsFile::open(dir + "/model.safetensors");
  std::vector<std::pair<std::string, Tensor>> kept;
  for (const auto& name : file->names()) {
    if (name == "model.layers.1.self_attn.kv_a_layernorm.weight") continue;
    kept.emplace_back(
        name, name == "model.norm.weight" ? Tensor::zeros({7}) : file->tensor(name).clone());
  }
  file.reset();
  write_safetensors(dir + "/model.safetensors", kept);
  try {
    DeepseekModel::load(dir, quiet());
    FAIL() << "loaded a broken checkpoint";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("model.norm.weight"));
    EXPECT_THAT(e.what(), HasSubstr("[7]"));
  }
  kept.erase(std::find_if(kept.begin(), kept.end(),
                          [](auto& kv) { return kv.first == "model.norm.weight"; }));
  kept.emplace_back("model.norm.weight", Tensor::zeros({config.hidden_size}));
  write_safetensors(dir + "/model.safetensors", kept);
  try {
    DeepseekModel::load(dir, quiet());
    FAIL() << "loaded a checkpoint without kv_a_layernorm";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
    EXPECT_THAT(e.what(), HasSubstr("model.layers.1.self_attn.kv_a_layernorm.weight"));
  }
}

// A config.json whose sizes are absurd fails at the config, naming the field, before a
// tensor, a cache or a thread is sized from it.
TEST(ModelLoad, AbsurdSizesFailBeforeLoading) {
  const std::string dir = temp_dir("absurd");
  write_random_checkpoint(model_preset("v3"), dir, 3);
  const nlohmann::json good = nlohmann::json::parse(std::ifstream(dir + "/config.json"));
  for (const auto& [field, value] :
       {std::pair<const char*, int64_t>{"num_hidden_layers", 10'000'000},
        {"hidden_size", 1'000'000'000},
        {"max_position_embeddings", 0}}) {
    SCOPED_TRACE(field);
    nlohmann::json j = good;
    j[field] = value;
    std::ofstream(dir + "/config.json") << j.dump();
    try {
      DeepseekModel::load(dir, quiet());
      FAIL() << "loaded a config with " << field << " " << value;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_THAT(e.what(), HasSubstr(dir + "/config.json"));
      EXPECT_THAT(e.what(), HasSubstr(fmt::format("`{}`", field)));
    }
  }
}

TEST(ModelLoad, WriteRandomCheckpointOverAFileNamesIt) {
  const std::string file = temp_dir("not_a_dir");
  std::ofstream(file) << "x";
  try {
    write_random_checkpoint(model_preset("v3"), file, 0);
    FAIL() << "wrote into a file";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr("output directory " + file + " exists and is not a directory"));
  }
  fs::remove(file);
}

}  // namespace
}  // namespace mla
