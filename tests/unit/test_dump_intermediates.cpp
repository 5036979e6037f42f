// The CPU model's named intermediates (ModelRunner::set_dump): every name in every layer with
// the documented shape, logits of every prompt row equal to transformers', and the same
// tensors whatever absorption mode ran them (the modes are exact rewrites of one another).
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <string>

#include "runtime/deepseek_model.h"
#include "tests/support/dump_run.h"
#include "tests/support/golden.h"

namespace mla {
namespace {

using test::dump_file;
using test::dump_layer_names;
using test::read_npy_f32;

std::string temp_dir(const std::string& name) {
  return (std::filesystem::path(testing::TempDir()) / ("mla_dump_" + name)).string();
}

class DumpIntermediates : public testing::TestWithParam<std::string> {};

TEST_P(DumpIntermediates, EveryNameEveryLayerLogitsMatchAndModesAgree) {
  const std::string& name = GetParam();
  const test::Golden& g = test::golden(name);
  const auto& prompt = g.prompts[0];
  const auto T = static_cast<int64_t>(prompt.size());
  std::map<AbsorbMode, std::string> dirs;
  ModelConfig c;
  for (AbsorbMode mode : {AbsorbMode::kNaive, AbsorbMode::kFactored, AbsorbMode::kPremerged}) {
    const auto m = DeepseekModel::load(test::model_dir(name), {mode, CostModel{}, false});
    c = m->config();
    dirs[mode] = test::dump_prompt(*m, prompt, temp_dir(name + "_" + to_string(mode)));
  }
  const int64_t D = c.hidden_size, H = c.num_heads, V = c.vocab_size;
  const std::map<std::string, std::vector<int64_t>> shapes = {
      {"attn_norm", {T, D}},
      {"q_nope", {T, H, c.qk_nope_head_dim}},
      {"q_rope", {T, H, c.qk_rope_head_dim}},
      {"q_absorbed", {T, H, c.kv_lora_rank}},
      {"latent", {T, c.kv_lora_rank}},
      {"k_rope", {T, c.qk_rope_head_dim}},
      {"attn_out", {T, D}},
      {"ffn_norm", {T, D}},
      {"ffn_out", {T, D}},
      {"layer_out", {T, D}}};
  for (int64_t l = 0; l < c.num_layers; ++l) {
    for (const std::string& n : dump_layer_names()) {
      SCOPED_TRACE(testing::Message() << "layer " << l << " " << n);
      // The decompressed form (naive) has no absorbed query.
      EXPECT_EQ(std::filesystem::exists(dump_file(dirs[AbsorbMode::kNaive], n, l)),
                n != "q_absorbed");
      const auto ref = read_npy_f32(dump_file(dirs[AbsorbMode::kFactored], n, l));
      EXPECT_EQ(ref.shape, shapes.at(n));
      for (AbsorbMode mode : {AbsorbMode::kNaive, AbsorbMode::kPremerged}) {
        const std::string file = dump_file(dirs[mode], n, l);
        if (!std::filesystem::exists(file)) continue;
        const auto got = read_npy_f32(file);
        ASSERT_EQ(got.values.size(), ref.values.size()) << to_string(mode);
        EXPECT_LT(test::rel_error(got.values.data(), ref.values.data(),
                                  static_cast<int64_t>(ref.values.size())),
                  1e-4)
            << to_string(mode) << " vs factored";
      }
    }
  }
  for (const auto& [mode, dir] : dirs) {
    const auto logits = read_npy_f32(dump_file(dir, "logits", -1));
    ASSERT_EQ(logits.shape, (std::vector<int64_t>{T, V}));
    EXPECT_LT(test::rel_error(logits.values.data(), g.prompt_logits[0].f32(), T * V), 1e-4)
        << to_string(mode) << ": every prompt row against transformers";
    EXPECT_EQ(read_npy_f32(dump_file(dir, "final_norm", -1)).shape, (std::vector<int64_t>{T, D}));
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, DumpIntermediates, testing::Values("v3", "v2_lite", "v3_mla"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace mla
