// Absorption (docs/ARCHITECTURE.md section 5): the form policy and its cost model, the work each
// form really does per decode step, and the agreement of every mode's logits.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/absorption.h"
#include "runtime/deepseek_model.h"
#include "runtime/latent_cache.h"
#include "runtime/model_config.h"
#include "runtime/tiny_checkpoint.h"
#include "tests/support/golden.h"

namespace mla {
namespace {

using test::rel_error;

namespace fs = std::filesystem;

const std::vector<AbsorbMode> kAllModes = {AbsorbMode::kNaive, AbsorbMode::kFactored,
                                           AbsorbMode::kPremerged, AbsorbMode::kAuto};

// DeepSeek-V3's shape (the cost model reads its attention dimensions).
ModelConfig v3_dims() { return model_preset("v3-full"); }

// ---------------------------------------------------------------------------------------
// (a) FormPolicy and CostModel

TEST(Absorption, ModeNamesRoundTrip) {
  for (AbsorbMode m : kAllModes) EXPECT_EQ(absorb_mode_from_string(to_string(m)), m);
  try {
    absorb_mode_from_string("absorbed");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.what(), testing::HasSubstr("absorbed"));
  }
}

TEST(Absorption, FixedModesAlwaysPickTheirForm) {
  const ModelConfig c = v3_dims();
  const std::vector<std::pair<int64_t, int64_t>> chunks = {
      {1, 1}, {1, 4096}, {1, 163840}, {2048, 2048}, {512, 100000}, {16384, 16384}};
  const std::map<AbsorbMode, AttnForm> want = {{AbsorbMode::kNaive, AttnForm::kDecompressed},
                                               {AbsorbMode::kFactored, AttnForm::kLatent},
                                               {AbsorbMode::kPremerged, AttnForm::kLatent}};
  for (const auto& [mode, form] : want) {
    const FormPolicy policy(c, mode, CostModel{});
    EXPECT_EQ(policy.mode(), mode);
    EXPECT_EQ(policy.needs_premerged(), mode == AbsorbMode::kPremerged);
    for (const auto& [n, ctx] : chunks) {
      EXPECT_EQ(policy.choose(n, ctx), form) << to_string(mode) << " n " << n << " ctx " << ctx;
    }
  }
}

TEST(Absorption, AutoPicksLatentForDecodeAndDecompressedForLongPrefillOnV3) {
  const ModelConfig c = v3_dims();
  const CostModel cpu;               // fp32 weights, CPU balance
  const CostModel h100{300.0, 2.0};  // bf16 weights, H100 balance
  for (const CostModel& cost : {cpu, h100}) {
    SCOPED_TRACE(testing::Message() << "flops_per_byte " << cost.flops_per_byte);
    const FormPolicy policy(c, AbsorbMode::kAuto, cost);
    // Premerged is never kept for V3: its weights are larger and it costs more per token.
    EXPECT_FALSE(policy.needs_premerged());
    for (int64_t ctx : {16, 1024, 4096, 32768, 163840}) {
      EXPECT_EQ(policy.choose(1, ctx), AttnForm::kLatent) << "decode, context " << ctx;
    }
    EXPECT_EQ(policy.choose(2048, 2048), AttnForm::kDecompressed);
    EXPECT_EQ(policy.choose(4096, 8192), AttnForm::kDecompressed);
  }
}

TEST(Absorption, PremergedCostsMoreThanFactoredForV3) {
  const ModelConfig c = v3_dims();
  const CostModel cost;
  // The merged query matrix alone is ~3x the factored pair (q_b nope rows plus W_UK).
  const double merged_q = 1536.0 * 128 * 512, factored_q = 1536.0 * 128 * 128 + 128.0 * 128 * 512;
  EXPECT_NEAR(merged_q / factored_q, 3.0, 0.01);
  EXPECT_GT(cost.weight_bytes(c, AttnPath::kLatentPremerged),
            cost.weight_bytes(c, AttnPath::kLatentFactored));
  for (int64_t ctx : {1, 4096, 163840}) {
    EXPECT_GT(cost.flops(c, AttnPath::kLatentPremerged, 1, ctx),
              cost.flops(c, AttnPath::kLatentFactored, 1, ctx));
    EXPECT_GT(cost.cost(c, AttnPath::kLatentPremerged, 1, ctx),
              cost.cost(c, AttnPath::kLatentFactored, 1, ctx));
  }
}

// A backend that cannot run the decompressed form for the model's shapes: auto picks the latent
// form even where decompressed would cost less, and naive (whose form it is) refuses, saying why.
TEST(Absorption, PolicyPicksOnlyFormsTheBackendRuns) {
  const ModelConfig c = v3_dims();
  const std::string why = "d_v 24 not a multiple of 16";
  const FormPolicy supported(c, AbsorbMode::kAuto, CostModel{});
  ASSERT_EQ(supported.choose(4096, 8192), AttnForm::kDecompressed);
  const FormPolicy unsupported(c, AbsorbMode::kAuto, CostModel{}, why);
  for (auto [n, ctx] : {std::pair<int64_t, int64_t>{1, 1}, {2048, 2048}, {4096, 8192}}) {
    EXPECT_EQ(unsupported.choose(n, ctx), AttnForm::kLatent) << n << " tokens at " << ctx;
  }
  EXPECT_EQ(FormPolicy(c, AbsorbMode::kFactored, CostModel{}, why).choose(4096, 8192),
            AttnForm::kLatent);
  try {
    FormPolicy(c, AbsorbMode::kNaive, CostModel{}, why);
    ADD_FAILURE() << "naive accepted a form the backend cannot run";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.what(), testing::HasSubstr(why));
    EXPECT_THAT(e.what(), testing::HasSubstr("naive"));
  }
}

// A model whose latent is narrow next to its heads: the merged matrices are the smaller
// ones, so auto keeps and uses them.
TEST(Absorption, AutoKeepsPremergedWhenItIsCheaper) {
  ModelConfig c = v3_dims();
  c.q_lora_rank = 0;
  c.hidden_size = 64;
  c.num_heads = 4;
  c.kv_lora_rank = 8;
  c.qk_rope_head_dim = 16;
  c.qk_nope_head_dim = 32;
  c.v_head_dim = 32;
  const FormPolicy policy(c, AbsorbMode::kAuto, CostModel{});
  EXPECT_TRUE(policy.needs_premerged());
  EXPECT_EQ(policy.latent_weights(), LatentWeights::kPremerged);
  EXPECT_EQ(policy.choose(1, 1000), AttnForm::kLatent);
  EXPECT_FALSE(FormPolicy(c, AbsorbMode::kFactored, CostModel{}).needs_premerged());
}

TEST(Absorption, CostModelFormulasOnAHandComputedCase) {
  ModelConfig c;
  c.hidden_size = 7;  // D; no q LoRA, so the query input is D wide
  c.num_heads = 2;
  c.kv_lora_rank = 4;
  c.qk_rope_head_dim = 2;
  c.qk_nope_head_dim = 3;
  c.v_head_dim = 5;
  // 3 new tokens ending at context 10: the rows see 8, 9 and 10 keys, 27 pairs.
  const CostModel cost;  // 8 FLOPs per byte, 4 bytes per weight
  // q projection 2*3*7*(2*5) = 420, latent up-projection 2*10*4*(2*8) = 1280,
  // scores and values 2*27*2*(5+5) = 1080, W_o 2*3*(2*5)*7 = 420.
  EXPECT_EQ(cost.flops(c, AttnPath::kDecompressed, 3, 10), 3200);
  // q projection 420, W_UK 2*3*2*3*4 = 144, scores and values 2*27*2*(4+2+4) = 1080,
  // W_UV 2*3*2*4*5 = 240, W_o 420.
  EXPECT_EQ(cost.flops(c, AttnPath::kLatentFactored, 3, 10), 2304);
  // W_Q' with rope rows 2*3*7*(2*6) = 504, scores and values 1080, W_O' 2*3*(2*4)*7 = 336.
  EXPECT_EQ(cost.flops(c, AttnPath::kLatentPremerged, 3, 10), 1920);
  // q_b 7*10 + kv_b 16*4 + o 7*10 = 204 elements; W_Q' 7*12 + W_O' 7*8 = 140 elements.
  EXPECT_EQ(cost.weight_bytes(c, AttnPath::kDecompressed), 816);
  EXPECT_EQ(cost.weight_bytes(c, AttnPath::kLatentFactored), 816);
  EXPECT_EQ(cost.weight_bytes(c, AttnPath::kLatentPremerged), 560);
  EXPECT_EQ(cost.cost(c, AttnPath::kLatentFactored, 3, 10), 2304 + 8 * 816);
  const CostModel bf16{300.0, 2.0};
  EXPECT_EQ(bf16.weight_bytes(c, AttnPath::kLatentPremerged), 280);
  EXPECT_EQ(bf16.cost(c, AttnPath::kLatentPremerged, 3, 10), 1920 + 300 * 280);
}

// ---------------------------------------------------------------------------------------
// Random tiny models, written once for the whole suite

class AbsorptionModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ =
        (fs::path(::testing::TempDir()) / fmt::format("mla_absorption_{}", ::getpid())).string();
    fs::remove_all(root_);
    uint64_t seed = 1234;
    for (const std::string preset : {"v3", "v2-lite"}) {
      write_random_checkpoint(model_preset(preset), root_ + "/" + preset, seed++);
    }
  }
  static void TearDownTestSuite() {
    models_.clear();
    fs::remove_all(root_);
  }

  static std::shared_ptr<DeepseekModel> model(const std::string& preset, AbsorbMode mode) {
    auto& m = models_[{preset, mode}];
    if (!m) m = DeepseekModel::load(root_ + "/" + preset, {mode, CostModel{}, false});
    return m;
  }

  static std::vector<int32_t> random_tokens(int64_t vocab, size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(vocab) - 1);
    std::vector<int32_t> t(n);
    for (auto& v : t) v = dist(rng);
    return t;
  }

  static std::string root_;
  static std::map<std::pair<std::string, AbsorbMode>, std::shared_ptr<DeepseekModel>> models_;
};

std::string AbsorptionModel::root_;
std::map<std::pair<std::string, AbsorbMode>, std::shared_ptr<DeepseekModel>>
    AbsorptionModel::models_;

// ---------------------------------------------------------------------------------------
// (b) Work per decode step

struct DecodeWork {
  int64_t context;
  WorkCounter work;
};

// Prefills context-1 tokens, then counts the work of one decode step at `context` keys.
DecodeWork decode_step_work(const DeepseekModel& m, int32_t context, unsigned seed) {
  const int64_t V = m.config().vocab_size;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(V) - 1);
  std::vector<int32_t> prompt(context - 1);
  for (auto& t : prompt) t = dist(rng);
  LatentCache cache(m.cache_geometry(16), (context + 15) / 16);
  BlockTable table;
  EXPECT_TRUE(cache.reserve(table, context));
  const auto runner = m.make_runner(cache);
  runner->forward({prompt, {{&table, 0, context - 1, true}}});
  DecodeWork out{context, {}};
  const Tensor logits = runner->forward({{dist(rng)}, {{&table, context - 1, 1, true}}}, &out.work);
  EXPECT_EQ(logits.dim(0), 1);
  return out;
}

TEST_F(AbsorptionModel, DecodeWorkGrowsWithContextOnlyInAttentionWhenAbsorbed) {
  const ModelConfig c = model("v3", AbsorbMode::kNaive)->config();
  const int64_t layers = c.num_layers, H = c.num_heads, dc = c.kv_lora_rank,
                dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim, dv = c.v_head_dim;
  const CostModel cost;
  std::map<AbsorbMode, std::vector<DecodeWork>> work;
  for (AbsorbMode mode : kAllModes) {
    SCOPED_TRACE(to_string(mode));
    auto m = model("v3", mode);
    for (int32_t ctx : {16, 64, 256}) work[mode].push_back(decode_step_work(*m, ctx, 99));
    const auto& w = work[mode];
    const AttnForm form = mode == AbsorbMode::kAuto ? m->forms().choose(1, 16)
                                                    : FormPolicy(c, mode, cost).choose(1, 16);
    for (const DecodeWork& d : w) {
      SCOPED_TRACE(testing::Message() << "context " << d.context);
      const int64_t L = d.context;
      // One sequence-step, in the mode's form.
      EXPECT_EQ(d.work.form_chunks[static_cast<int>(form)], 1);
      int64_t chunks = 0;
      for (int64_t n : d.work.form_chunks) chunks += n;
      EXPECT_EQ(chunks, 1);
      // Weight products do not depend on the context.
      EXPECT_EQ(d.work.weight_flops, w[0].work.weight_flops);
      if (form == AttnForm::kDecompressed) {
        // Every cached latent is up-projected to keys and values, in every layer.
        EXPECT_EQ(d.work.cache_upproj_flops, layers * 2 * L * dc * H * (dn + dv));
        EXPECT_EQ(d.work.attention_flops, layers * 2 * L * H * (dn + dr + dv));
      } else {
        EXPECT_EQ(d.work.cache_upproj_flops, 0);
        EXPECT_EQ(d.work.attention_flops, layers * 2 * L * H * (dc + dr + dc));
      }
    }
    // Linear in the context: 16x the keys, 16x the work that grows.
    EXPECT_EQ(w[2].work.attention_flops, 16 * w[0].work.attention_flops);
    EXPECT_EQ(w[2].work.cache_upproj_flops, 16 * w[0].work.cache_upproj_flops);
  }
  EXPECT_GT(work[AbsorbMode::kNaive][0].work.cache_upproj_flops, 0);
  // Auto decodes in a latent form: no up-projection of the cache on the default path.
  EXPECT_EQ(work[AbsorbMode::kAuto][2].work.cache_upproj_flops, 0);

  // The work the forms really do differs exactly as the cost model says.
  for (size_t i = 0; i < 3; ++i) {
    const int64_t L = work[AbsorbMode::kNaive][i].context;
    auto total = [&](AbsorbMode mode) {
      const WorkCounter& k = work[mode][i].work;
      return static_cast<double>(k.weight_flops + k.cache_upproj_flops + k.attention_flops);
    };
    for (auto [mode, path] : {std::pair{AbsorbMode::kFactored, AttnPath::kLatentFactored},
                              std::pair{AbsorbMode::kPremerged, AttnPath::kLatentPremerged}}) {
      EXPECT_EQ(total(mode) - total(AbsorbMode::kNaive),
                layers * (cost.flops(c, path, 1, L) - cost.flops(c, AttnPath::kDecompressed, 1, L)))
          << to_string(mode) << " context " << L;
    }
  }
}

// ---------------------------------------------------------------------------------------
// (c) Every mode gives the same logits

// Feeds `tokens` in chunks of the given sizes through one sequence; the logits of each
// chunk's last token, [chunks][V].
std::vector<std::vector<float>> run_chunks(const DeepseekModel& m, int32_t block_size,
                                           const std::vector<int32_t>& tokens,
                                           const std::vector<int32_t>& chunks) {
  const int64_t V = m.config().vocab_size;
  LatentCache cache(m.cache_geometry(block_size),
                    static_cast<int32_t>((tokens.size() + block_size - 1) / block_size));
  BlockTable table;
  std::vector<std::vector<float>> out;
  int32_t start = 0;
  for (int32_t n : chunks) {
    EXPECT_TRUE(cache.reserve(table, start + n));
    ForwardBatch batch{{tokens.begin() + start, tokens.begin() + start + n},
                       {{&table, start, n, true}}};
    const Tensor logits = m.make_runner(cache)->forward(batch);
    out.emplace_back(logits.f32(), logits.f32() + V);
    start += n;
  }
  EXPECT_EQ(start, static_cast<int32_t>(tokens.size()));
  return out;
}

TEST_F(AbsorptionModel, AllModesGiveTheSameLogits) {
  // A prefill in two chunks, then single-token decode steps.
  const std::vector<int32_t> chunks = {11, 6, 1, 1, 1, 1, 1};
  for (const std::string preset : {"v3", "v2-lite"}) {
    const auto reference_model = model(preset, AbsorbMode::kNaive);
    const auto tokens = random_tokens(reference_model->config().vocab_size, 22, 5);
    const auto want = run_chunks(*reference_model, 64, tokens, chunks);
    for (AbsorbMode mode : kAllModes) {
      for (int32_t block : {1, 64}) {
        const auto got = run_chunks(*model(preset, mode), block, tokens, chunks);
        ASSERT_EQ(got.size(), want.size());
        for (size_t s = 0; s < got.size(); ++s) {
          EXPECT_LT(rel_error(got[s].data(), want[s].data(), static_cast<int64_t>(want[s].size())),
                    1e-5)
              << preset << " " << to_string(mode) << " block " << block << " chunk " << s;
        }
      }
    }
  }
}

// One batch holding a prefill chunk of one sequence and a decode step of another (in auto
// mode: the decompressed and a latent form in the same forward) equals running them apart.
TEST_F(AbsorptionModel, MixedFormBatchEqualsSeparateSteps) {
  for (AbsorbMode mode : kAllModes) {
    SCOPED_TRACE(to_string(mode));
    auto m = model("v3", mode);
    const int64_t V = m->config().vocab_size;
    const auto a = random_tokens(V, 12, 21), b = random_tokens(V, 9, 22);
    const int32_t block = 4;

    // Apart: b's prompt (8 tokens) then its decode step; a's 12-token prefill.
    LatentCache apart(m->cache_geometry(block), 16);
    BlockTable ta, tb;
    ASSERT_TRUE(apart.reserve(tb, 9));
    const auto run_apart = m->make_runner(apart);
    run_apart->forward({{b.begin(), b.begin() + 8}, {{&tb, 0, 8, false}}});
    const Tensor b_alone = run_apart->forward({{b[8]}, {{&tb, 8, 1, true}}});
    ASSERT_TRUE(apart.reserve(ta, 12));
    const Tensor a_alone = run_apart->forward({a, {{&ta, 0, 12, true}}});

    // Together: b's prompt first, then a's prefill and b's decode in one batch.
    LatentCache together(m->cache_geometry(block), 16);
    BlockTable ua, ub;
    ASSERT_TRUE(together.reserve(ub, 9));
    ASSERT_TRUE(together.reserve(ua, 12));
    const auto run_together = m->make_runner(together);
    run_together->forward({{b.begin(), b.begin() + 8}, {{&ub, 0, 8, false}}});
    std::vector<int32_t> tokens(a);
    tokens.push_back(b[8]);
    WorkCounter work;
    const Tensor both =
        run_together->forward({tokens, {{&ua, 0, 12, true}, {&ub, 8, 1, true}}}, &work);
    ASSERT_EQ(both.dim(0), 2);
    EXPECT_LT(rel_error(both.f32(), a_alone.f32(), V), 1e-5);
    EXPECT_LT(rel_error(both.f32() + V, b_alone.f32(), V), 1e-5);
    if (mode == AbsorbMode::kAuto) {
      ASSERT_NE(m->forms().choose(12, 12), m->forms().choose(1, 9)) << "not a mixed batch";
      EXPECT_EQ(work.form_chunks[static_cast<int>(m->forms().choose(12, 12))], 1);
      EXPECT_EQ(work.form_chunks[static_cast<int>(m->forms().choose(1, 9))], 1);
    }
  }
}

}  // namespace
}  // namespace mla
