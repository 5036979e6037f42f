// fp8 weights kept as an fp8 checkpoint stores them (`fp8_weights: keep`): the checkpoint's
// fp8 slices, LinearWeight, and the CPU model on tests/data/v3_fp8 (DeepSeek-V3's format:
// e4m3 weights with 128x128 block scales) against transformers' golden logits. The widened
// model is held to the golden data exactly like every other golden model (test_parity.cpp).
#include <gtest/gtest.h>

#include <iostream>

#include "kernels/dtype.h"
#include "runtime/checkpoint.h"
#include "runtime/deepseek_model.h"
#include "runtime/engine.h"
#include "runtime/model_config.h"
#include "runtime/model_weights.h"
#include "tests/support/golden.h"
#include "tests/support/golden_run.h"

namespace mla {
namespace {

constexpr const char* kModel = "v3_fp8";
const std::string kKvA = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight";  // [576, 128]
const std::string kO = "model.layers.0.self_attn.o_proj.weight";                // [128, 512]

void expect_same(const Tensor& a, const Tensor& b) {
  ASSERT_EQ(a.shape(), b.shape());
  for (int64_t i = 0; i < a.numel(); ++i) ASSERT_EQ(a.f32()[i], b.f32()[i]) << i;
}

LinearWeight kept(const Checkpoint::Fp8Slice& s) {
  return LinearWeight(s.values, s.scale, s.group);
}

// A slice kept as fp8 holds exactly the values load_f32_slice widens: whole tensors, rows that
// end in the half block of kv_a_proj's 576 rows, and columns from a block boundary.
TEST(Fp8Checkpoint, SlicesHoldWhatTheWidenedLoadReads) {
  const ModelConfig c = ModelConfig::load(test::model_dir(kModel));
  ASSERT_TRUE(c.fp8_checkpoint);
  Checkpoint ckpt = Checkpoint::open(test::model_dir(kModel), c.fp8_block);
  EXPECT_TRUE(ckpt.is_fp8(kKvA));
  EXPECT_FALSE(ckpt.is_fp8("model.layers.0.input_layernorm.weight"));

  const Checkpoint::Fp8Slice all = ckpt.load_fp8_slice(kKvA, {576, 128}, 0, 576);
  EXPECT_EQ(all.values.dtype(), DType::kF8E4M3);
  EXPECT_EQ(all.scale.shape(), (Shape{576, 1}));
  EXPECT_EQ(all.group, 128);
  expect_same(kept(all).widened(), ckpt.load_f32(kKvA, {576, 128}));
  expect_same(kept(ckpt.load_fp8_slice(kKvA, {576, 128}, 100, 576)).widened(),
              ckpt.load_f32_slice(kKvA, {576, 128}, 100, 576));
  const Checkpoint::Fp8Slice cols = ckpt.load_fp8_slice(kO, {128, 512}, 0, 128, 128, 384);
  EXPECT_EQ(cols.scale.shape(), (Shape{128, 2}));
  expect_same(kept(cols).widened(), ckpt.load_f32_slice(kO, {128, 512}, 0, 128, 128, 384));
}

TEST(Fp8Checkpoint, RefusesColumnsInsideABlockAndTensorsNotFp8) {
  Checkpoint ckpt = Checkpoint::open(test::model_dir(kModel));
  std::string message;
  EXPECT_EQ(test::code_of(
                [&] {
                  ckpt.load_fp8_slice(kO, {128, 512}, 0, 128, 64, 192);
                },
                &message),
            ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("inside a block"), std::string::npos) << message;
  EXPECT_EQ(test::code_of(
                [&] { ckpt.load_fp8_slice("model.layers.0.input_layernorm.weight", {128}, 0, 1); },
                &message),
            ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("not a 2-D fp8 tensor"), std::string::npos) << message;
}

TEST(LinearWeight, ConcatenatedRowsKeepTheirScales) {
  Checkpoint ckpt = Checkpoint::open(test::model_dir(kModel));
  const LinearWeight a = kept(ckpt.load_fp8_slice(kKvA, {576, 128}, 0, 200));
  const LinearWeight b = kept(ckpt.load_fp8_slice(kKvA, {576, 128}, 200, 576));
  const LinearWeight ab = LinearWeight::concat_rows(a, b);
  ASSERT_TRUE(ab.fp8());
  EXPECT_EQ(ab.out(), 576);
  EXPECT_EQ(ab.nbytes(), 576 * 128 + 576 * 4);
  expect_same(ab.widened(), ckpt.load_f32(kKvA, {576, 128}));
  EXPECT_EQ(test::code_of([&] { (void)ab.f32_weight(); }), ErrorCode::kInternal);
  EXPECT_EQ(test::code_of([&] {
              LinearWeight::concat_rows(a, LinearWeight(ckpt.load_f32(kKvA, {576, 128})));
            }),
            ErrorCode::kInternal);
}

ModelOptions keep_options(AbsorbMode mode) {
  ModelOptions o;
  o.absorb = mode;
  o.show_progress = false;
  o.fp8_weights = Fp8Weights::kKeep;
  return o;
}

// Kept fp8 weights hold a quarter of their fp32 bytes plus a scale per 128 values
// (LinearWeight.ConcatenatedRowsKeepTheirScales counts one exactly); kv_b_proj (which the
// absorbed forms multiply with per head) stays fp32.
TEST(Fp8Weights, KeptWeightsHoldAboutAQuarterOfTheWidenedBytes) {
  ModelOptions widen = keep_options(AbsorbMode::kFactored);
  widen.fp8_weights = Fp8Weights::kWiden;
  const auto wide = DeepseekModel::load(test::model_dir(kModel), widen);
  const auto narrow =
      DeepseekModel::load(test::model_dir(kModel), keep_options(AbsorbMode::kFactored));
  std::cout << "v3_fp8 weights held: widened " << wide->weight_bytes() << " B, kept "
            << narrow->weight_bytes() << " B\n";
  // The tiny model's fp32 share is large: kv_b_proj (1,024 x 512 a layer) and the embeddings.
  EXPECT_LT(narrow->weight_bytes(), wide->weight_bytes() * 6 / 10);
}

// Kept fp8 weights compute what transformers computes when every fp8 product quantises its
// input per row and 128 columns first (golden_fp8act: transformers' FP8Linear numerics,
// kv_b_proj in fp32 as here): the same greedy tokens, logits within kFp8ActTolerance. The two
// sum in different orders, so an activation that lands within fp32 rounding of an e4m3
// rounding boundary may round the other way and move a step's logits by about 1 %: seen once
// (naive form, prompt 0, last step, 1.1 %; naive and factored mlaserve runs differ there alone,
// by the same amount, while their widened runs agree to 1e-6 at every step), so one step per
// run may differ by up to kFlipTolerance. Against the plain golden data (fp32 activations) the
// quantisation's own error shows: printed here, quoted in docs/BENCHMARKS.md, bounded loosely
// (kMedianBound, kWorstBound). In premerged form the merged query and output matrices are fp32
// (built from the widened weights), so fewer products quantise: its tokens are held to neither
// golden exactly.
constexpr double kFp8ActTolerance = 1e-3, kFlipTolerance = 0.03;
constexpr double kMedianBound = 0.1, kWorstBound = 0.3;

using KeptParam = std::tuple<AbsorbMode, test::Pattern>;
class Fp8WeightsModel : public testing::TestWithParam<KeptParam> {};

TEST_P(Fp8WeightsModel, ReproducesTransformersWithFp8Activations) {
  const auto& [mode, pattern] = GetParam();
  const test::Golden& g = test::golden(kModel, "golden_fp8act");
  const test::CpuGoldenRun run = test::run_cpu_golden(kModel, keep_options(mode), g, pattern);
  test::expect_reproduces(run.outputs, g, run.vocab, kFp8ActTolerance, 1, kFlipTolerance);
}

INSTANTIATE_TEST_SUITE_P(
    Golden, Fp8WeightsModel,
    testing::Combine(testing::Values(AbsorbMode::kNaive, AbsorbMode::kFactored, AbsorbMode::kAuto),
                     testing::Values(test::Pattern::kUnbatched, test::Pattern::kBatched,
                                     test::Pattern::kChunkedPrefill)),
    [](const auto& info) {
      return std::string(to_string(std::get<0>(info.param))) + "_" +
             test::pattern_name(std::get<1>(info.param));
    });

TEST(Fp8Weights, QuantisationErrorAgainstFp32Activations) {
  const test::Golden& g = test::golden(kModel);
  for (const AbsorbMode mode : {AbsorbMode::kFactored, AbsorbMode::kPremerged}) {
    const test::CpuGoldenRun run = test::run_cpu_golden(kModel, keep_options(mode), g);
    const test::Closeness c = test::closeness(run.outputs, g, run.vocab);
    std::cout << kModel << " " << to_string(mode) << ": fp8 weights kept, " << c << "\n";
    EXPECT_LT(c.median, kMedianBound) << to_string(mode);
    EXPECT_LT(c.worst, kWorstBound) << to_string(mode);
    EXPECT_GT(c.median, 1e-4) << to_string(mode) << ": no product was quantised";
  }
}

// Both fp8 options at once, as an fp8 deployment of V3 would run: kept weights on an fp8 latent
// cache. Once the cache's rounding has moved the activations, their own quantisation no longer
// rounds as golden_fp8act's did, so the run is held, like kept weights alone against fp32
// activations, to the quantisation's loose bounds (kMedianBound, kWorstBound) against
// transformers' fp32 forward. Measured: median 0.065, worst 0.084 from `golden` (kept weights
// alone: 0.063, 0.082), and median 0.079 from golden_fp8act, where the cache alone (widened
// weights) is 0.024 from `golden` and kept weights alone < 1e-3 from golden_fp8act.
TEST(Fp8Weights, RunOnAnFp8Cache) {
  const test::Golden& g = test::golden(kModel);
  ModelOptions o = keep_options(AbsorbMode::kAuto);
  o.cache_dtype = CacheDType::kFp8;
  const test::CpuGoldenRun run = test::run_cpu_golden(kModel, o, g);
  ASSERT_EQ(run.storage, CacheStorage::kHostFp8);
  const test::Closeness c = test::closeness(run.outputs, g, run.vocab);
  std::cout << kModel << ": fp8 weights kept on an fp8 cache, " << c << "\n";
  EXPECT_LT(c.median, kMedianBound);
  EXPECT_LT(c.worst, kWorstBound);
}

TEST(Fp8Weights, KeepNeedsAnFp8Checkpoint) {
  std::string message;
  EXPECT_EQ(
      test::code_of(
          [&] { DeepseekModel::load(test::model_dir("v3"), keep_options(AbsorbMode::kAuto)); },
          &message),
      ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("fp8_weights keep"), std::string::npos) << message;
}

TEST(Fp8Weights, NamesParse) {
  EXPECT_EQ(fp8_weights_from_string("keep", "fp8_weights"), Fp8Weights::kKeep);
  EXPECT_EQ(fp8_weights_from_string("widen", "fp8_weights"), Fp8Weights::kWiden);
  std::string message;
  EXPECT_EQ(test::code_of([] { fp8_weights_from_string("fp4", "--fp8-weights"); }, &message),
            ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("--fp8-weights"), std::string::npos) << message;
}

}  // namespace
}  // namespace mla
