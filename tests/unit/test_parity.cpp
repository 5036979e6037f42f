// Model parity against transformers: the golden checkpoints in tests/data were written by
// tests/parity/make_golden.py (transformers, eager attention, fp32), together with the
// logits and greedy tokens transformers produced. Every absorption mode, page size and
// batching pattern must reproduce them (relative error < 1e-4, identical greedy tokens).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "runtime/deepseek_model.h"
#include "runtime/engine.h"
#include "runtime/safetensors.h"
#include "tests/support/golden.h"
#include "tests/support/golden_run.h"

namespace mla {
namespace {

constexpr double kTolerance = 1e-4;

using test::Golden;
using test::golden;
using test::model_dir;
using test::Pattern;
using test::pattern_name;
using test::pattern_options;
using test::rel_error;
using test::run_golden;

std::shared_ptr<DeepseekModel> model(const std::string& name, AbsorbMode mode) {
  static std::map<std::pair<std::string, AbsorbMode>, std::shared_ptr<DeepseekModel>> cache;
  auto& m = cache[{name, mode}];
  if (!m) m = DeepseekModel::load(model_dir(name), {mode, CostModel{}, false});
  return m;
}

using Param = std::tuple<std::string, AbsorbMode, int32_t, Pattern>;

class ModelParity : public testing::TestWithParam<Param> {};

TEST_P(ModelParity, ReproducesTransformersStepLogitsAndGreedyTokens) {
  const auto& [name, mode, block_size, pattern] = GetParam();
  const Golden& g = golden(name);
  auto m = model(name, mode);
  const int64_t V = m->config().vocab_size;
  const int steps = g.steps;

  const EngineOptions opts = pattern_options(pattern, block_size);
  Engine engine(m, opts);
  const auto outputs = run_golden(engine, g, pattern);

  for (size_t p = 0; p < outputs.size(); ++p) {
    const auto& outs = outputs[p];
    ASSERT_EQ(static_cast<int>(outs.size()), steps) << "prompt " << p;
    for (int s = 0; s < steps; ++s) {
      EXPECT_EQ(outs[s].token, g.greedy[p][s]) << "prompt " << p << " step " << s;
      const double err = rel_error(outs[s].logits.data(), g.step_logits[p].f32() + s * V, V);
      EXPECT_LT(err, kTolerance) << "prompt " << p << " step " << s;
    }
    EXPECT_TRUE(outs.back().finished);
    EXPECT_EQ(outs.back().finish, FinishReason::kLength);
  }
  EXPECT_EQ(engine.cache().pool().num_free(), opts.num_pages) << "pages leaked";
}

std::string param_name(const testing::TestParamInfo<Param>& info) {
  const auto& [name, mode, block, pattern] = info.param;
  return fmt::format("{}_{}_b{}_{}", name, to_string(mode), block, pattern_name(pattern));
}

const std::vector<std::string> kModels = {"v3",     "v3_plain",  "v2_lite", "v2_group",
                                          "v3_mla", "v3_mla_h8", "v3_fp8"};

INSTANTIATE_TEST_SUITE_P(
    Golden, ModelParity,
    testing::Combine(testing::ValuesIn(kModels),
                     testing::Values(AbsorbMode::kNaive, AbsorbMode::kFactored,
                                     AbsorbMode::kPremerged, AbsorbMode::kAuto),
                     testing::Values(1, 4, 64),
                     testing::Values(Pattern::kUnbatched, Pattern::kBatched, Pattern::kJoinMidRun,
                                     Pattern::kChunkedPrefill)),
    param_name);

// Every prompt position's logits, computed one token per forward pass through the cache.
class PromptParity : public testing::TestWithParam<std::tuple<std::string, AbsorbMode>> {};

TEST_P(PromptParity, EveryPromptPositionMatches) {
  const auto& [name, mode] = GetParam();
  const Golden& g = golden(name);
  auto m = model(name, mode);
  const int64_t V = m->config().vocab_size;
  LatentCache cache(m->cache_geometry(4), 32);
  for (size_t p = 0; p < g.prompts.size(); ++p) {
    BlockTable table;
    const auto& prompt = g.prompts[p];
    for (size_t i = 0; i < prompt.size(); ++i) {
      ASSERT_TRUE(cache.reserve(table, static_cast<int32_t>(i + 1)));
      ForwardBatch batch{{prompt[i]}, {{&table, static_cast<int32_t>(i), 1, true}}};
      Tensor logits = m->make_runner(cache)->forward(batch);
      EXPECT_LT(rel_error(logits.f32(), g.prompt_logits[p].f32() + i * V, V), kTolerance)
          << "prompt " << p << " position " << i;
    }
    cache.release(table);
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, PromptParity,
                         testing::Combine(testing::ValuesIn(kModels),
                                          testing::Values(AbsorbMode::kNaive, AbsorbMode::kFactored,
                                                          AbsorbMode::kPremerged,
                                                          AbsorbMode::kAuto)),
                         [](const auto& info) {
                           return std::get<0>(info.param) + "_" +
                                  to_string(std::get<1>(info.param));
                         });

// The RoPE frequencies and softmax scale the config derives equal those transformers used.
class DerivedConstants : public testing::TestWithParam<std::string> {};

TEST_P(DerivedConstants, MatchTransformers) {
  const Golden& g = golden(GetParam());
  const ModelConfig c = ModelConfig::load(model_dir(GetParam()));
  const auto inv = c.rope_inv_freq();
  const auto want = g.meta["rope_inv_freq"].get<std::vector<double>>();
  ASSERT_EQ(inv.size(), want.size());
  for (size_t i = 0; i < inv.size(); ++i) EXPECT_NEAR(inv[i], want[i], 1e-7 * want[i]) << i;
  EXPECT_NEAR(c.rope_attention_factor(), g.meta["rope_attention_scaling"].get<double>(), 1e-7);
  EXPECT_NEAR(c.softmax_scale(), g.meta["softmax_scale"].get<double>(), 1e-9);
}

INSTANTIATE_TEST_SUITE_P(Golden, DerivedConstants, testing::ValuesIn(kModels));

}  // namespace
}  // namespace mla
