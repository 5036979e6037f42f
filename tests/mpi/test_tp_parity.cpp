// Tensor parallelism on the CPU under mpirun: every world size splits into groups, each
// group's leader drives an Engine and its followers follow; results must reproduce the
// transformers golden data (fp32 tolerance) in both kv_shard modes and every absorption
// mode, each rank's cache must hold only its pages, requests migrate in and out of a group
// with their caches, and prefix caching gives the outputs of a group without it.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "parallel/mpi_communicator.h"
#include "parallel/process_groups.h"
#include "runtime/deepseek_model.h"
#include "runtime/engine.h"
#include "runtime/safetensors.h"
#include "tests/support/golden.h"
#include "tests/support/golden_run.h"
#include "tests/support/staged_migration.h"

namespace mla {
namespace {

constexpr double kTolerance = 1e-4;

using test::Golden;
using test::golden;
using test::model_dir;
using test::rel_error;

int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

// One tensor-parallel layout of the world, kept for the whole test run.
struct Group {
  ProcessGroups pg;
  std::unique_ptr<MpiCommunicator> comm;
};

Group& group(int tp_size) {
  static std::map<int, std::unique_ptr<Group>> groups;
  auto& g = groups[tp_size];
  if (!g) {
    g = std::make_unique<Group>();
    g->pg = split_tp_groups(tp_size);
    g->comm = std::make_unique<MpiCommunicator>(
        g->pg.tp_comm.get(), std::chrono::milliseconds(120'000), g->pg.tp_label());
  }
  return *g;
}

std::shared_ptr<DeepseekModel> model(const std::string& name, AbsorbMode mode, KvShard kv,
                                     const Group& g, Fp8Weights fp8 = Fp8Weights::kWiden) {
  static std::map<std::tuple<std::string, AbsorbMode, KvShard, int, Fp8Weights>,
                  std::shared_ptr<DeepseekModel>>
      cache;
  auto& m = cache[{name, mode, kv, g.pg.tp_size, fp8}];
  if (!m) {
    ModelOptions o;
    o.absorb = mode;
    o.fp8_weights = fp8;
    o.show_progress = false;
    o.tp_size = g.pg.tp_size;
    o.tp_rank = g.pg.tp_rank;
    o.kv_shard = kv;
    m = DeepseekModel::load(model_dir(name), o);
  }
  return m;
}

using test::Pattern;

using Param = std::tuple<std::string, AbsorbMode, KvShard, int32_t, Pattern>;
class TpEngineParity : public testing::TestWithParam<Param> {};

// The whole world is one group (P = world size): the leader checks every step's logits
// and greedy tokens against transformers.
TEST_P(TpEngineParity, ReproducesTransformers) {
  const auto& [name, mode, kv, block_size, pattern] = GetParam();
  Group& g = group(world_size());
  const Golden& gold = golden(name);
  auto m = model(name, mode, kv, g);
  const EngineOptions opts = test::pattern_options(pattern, block_size);
  Engine engine(m, opts, g.comm.get());
  test::lead_or_follow(engine, [&] {
    const int64_t V = m->config().vocab_size;
    const auto outputs = test::run_golden(engine, gold, pattern, /*join_steps=*/2);
    for (size_t p = 0; p < outputs.size(); ++p) {
      const auto& outs = outputs[p];
      ASSERT_EQ(static_cast<int>(outs.size()), gold.steps);
      for (int s = 0; s < gold.steps; ++s) {
        EXPECT_EQ(outs[s].token, gold.greedy[p][s]) << "prompt " << p << " step " << s;
        EXPECT_LT(rel_error(outs[s].logits.data(), gold.step_logits[p].f32() + s * V, V),
                  kTolerance)
            << "prompt " << p << " step " << s;
      }
    }
    EXPECT_EQ(engine.cache().pool().num_free(), opts.num_pages);
  });
}

std::string kv_name(KvShard kv) { return kv == KvShard::kSequence ? "sharded" : "replicated"; }

std::string engine_param_name(const testing::TestParamInfo<Param>& info) {
  const auto& [name, mode, kv, block, pattern] = info.param;
  return fmt::format("{}_{}_{}_b{}_{}", name, to_string(mode), kv_name(kv), block,
                     test::pattern_name(pattern));
}

INSTANTIATE_TEST_SUITE_P(
    Golden, TpEngineParity,
    testing::Combine(testing::Values(std::string("v3"), std::string("v3_plain"),
                                     std::string("v2_lite"), std::string("v2_group")),
                     testing::Values(AbsorbMode::kNaive, AbsorbMode::kFactored,
                                     AbsorbMode::kPremerged, AbsorbMode::kAuto),
                     testing::Values(KvShard::kSequence, KvShard::kReplicate),
                     testing::Values(1, 4, 64),
                     testing::Values(Pattern::kBatched, Pattern::kJoinMidRun,
                                     Pattern::kChunkedPrefill)),
    engine_param_name);

// Real MLA dimensions (d_c 512, d_r 64, d_n 128, d_v 128) with 8 heads and 8 experts: the
// checkpoint TP4 and TP8 can split (ctest mpi_np4 and mpi_np8).
INSTANTIATE_TEST_SUITE_P(RealDims, TpEngineParity,
                         testing::Combine(testing::Values(std::string("v3_mla_h8")),
                                          testing::Values(AbsorbMode::kNaive, AbsorbMode::kFactored,
                                                          AbsorbMode::kPremerged,
                                                          AbsorbMode::kAuto),
                                          testing::Values(KvShard::kSequence, KvShard::kReplicate),
                                          testing::Values(64),
                                          testing::Values(Pattern::kBatched, Pattern::kJoinMidRun,
                                                          Pattern::kChunkedPrefill)),
                         engine_param_name);

// fp8 weights kept (DeepSeek-V3's checkpoint format, tests/data/v3_fp8) in TP2 groups, whose
// shards all start on a scale block: transformers with fp8 activations, held as the single-rank
// run is (tests/unit/test_fp8_weights.cpp), in both cache layouts.
class TpFp8Weights : public testing::TestWithParam<KvShard> {};

TEST_P(TpFp8Weights, ReproduceTransformersWithFp8Activations) {
  if (world_size() % 2 != 0) GTEST_SKIP() << "needs TP2 groups";
  Group& g = group(2);
  const Golden& gold = golden("v3_fp8", "golden_fp8act");
  auto m = model("v3_fp8", AbsorbMode::kFactored, GetParam(), g, Fp8Weights::kKeep);
  const EngineOptions opts = test::pattern_options(Pattern::kBatched, 4);
  Engine engine(m, opts, g.comm.get());
  test::lead_or_follow(engine, [&] {
    const auto outputs = test::run_golden(engine, gold, Pattern::kBatched);
    test::expect_reproduces(outputs, gold, m->config().vocab_size, 1e-3, 1, 0.03);
    EXPECT_EQ(engine.cache().pool().num_free(), opts.num_pages);
  });
}

INSTANTIATE_TEST_SUITE_P(Layouts, TpFp8Weights,
                         testing::Values(KvShard::kSequence, KvShard::kReplicate),
                         [](const auto& info) { return kv_name(info.param); });

// Live migration in and out of a tensor-parallel group, in both cache layouts: a request moved
// in stages from the group (P = world size) to a single-rank engine, and one moved from a
// single-rank engine into the group, produce transformers' greedy tokens, recompute nothing
// at the destination, and leave every page of every rank free.
class TpMigration : public testing::TestWithParam<KvShard> {};

TEST_P(TpMigration, MovesInAndOutOfTheGroupWithItsCache) {
  Group& g = group(world_size());
  if (g.pg.tp_size < 2) GTEST_SKIP() << "needs a group of 2 or more ranks";
  const Golden& gold = golden("v3");
  EngineOptions opts;
  opts.block_size = 4;  // the 27 tokens span 7 pages, spread over every rank
  opts.num_pages = 64;
  Request request;
  request.prompt = gold.prompts[2];
  request.max_tokens = gold.steps;
  request.ignore_eos = true;
  std::shared_ptr<DeepseekModel> single;
  if (g.pg.tp_rank == 0) {
    ModelOptions o;
    o.show_progress = false;
    single = DeepseekModel::load(model_dir("v3"), o);
  }
  // With prefix caching too: an imported request's full units become the group's to reuse (its
  // followers keep their pages of them), and the same prompt then starts on them.
  for (const bool caching : {false, true}) {
    opts.prefix_caching = caching;
    for (const bool into_group : {false, true}) {
      Engine tp(model("v3", AbsorbMode::kAuto, GetParam(), g), opts, g.comm.get());
      const std::string what = std::string(into_group ? "into" : "out of") + " the group" +
                               (caching ? " with prefix caching" : "");
      int64_t kept = 0;
      test::lead_or_follow(tp, [&] {
        Engine one(single, opts);
        const std::vector<int32_t> tokens = into_group
                                                ? test::migrate_in_stages(one, tp, request, 2)
                                                : test::migrate_in_stages(tp, one, request, 2);
        EXPECT_EQ(tokens, gold.greedy[2]) << what;
        if (caching && into_group) {
          const RequestId again = tp.add_request(request);
          std::vector<int32_t> second;
          while (tp.has_work()) {
            for (const StepOutput& o : tp.step()) {
              if (o.id == again && o.token >= 0) second.push_back(o.token);
            }
          }
          EXPECT_EQ(second, gold.greedy[2]) << what << ", run again on its kept units";
          EXPECT_GT(tp.cache().prefix_index()->stats().hit_tokens, 0) << what;
        }
        if (caching) kept = tp.cache().prefix_index()->kept();
      });
      MPI_Bcast(&kept, 1, MPI_INT64_T, 0, g.pg.tp_comm.get());
      EXPECT_EQ(tp.cache().pool().num_free(), opts.num_pages - kept)
          << "rank " << g.pg.tp_rank << " (" << what << ")";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, TpMigration,
                         testing::Values(KvShard::kSequence, KvShard::kReplicate),
                         [](const auto& info) { return kv_name(info.param); });

// Prefix caching in a group, in both cache layouts (a sequence-sharded group keeps units of P
// pages; the leader's index decides and the followers make its changes to their own pages):
// requests that share prefixes, run one after another in a cache small enough to evict, give
// the tokens and logits of the same group without caching (deterministic model), reuse
// tokens, and leave every rank's pages free or kept by the leader's index alone. Then the
// same requests all at once, while earlier ones' units are kept.
class TpPrefixCaching : public testing::TestWithParam<KvShard> {};

TEST_P(TpPrefixCaching, SameTokensAndLogitsWithAndWithoutAndEveryPageAccountedFor) {
  Group& g = group(world_size());
  if (g.pg.tp_size < 2) GTEST_SKIP() << "needs a group of 2 or more ranks";
  ModelOptions mo;
  mo.show_progress = false;
  mo.deterministic = true;  // logits independent of how a prompt is cut into chunks
  mo.tp_size = g.pg.tp_size;
  mo.tp_rank = g.pg.tp_rank;
  mo.kv_shard = GetParam();
  const std::shared_ptr<DeepseekModel> m = DeepseekModel::load(model_dir("v3"), mo);
  std::vector<Request> requests;
  for (int p = 0; p < 4; ++p) {  // four 16-token prefixes, three questions each
    for (int q = 0; q < 3; ++q) {
      Request r;
      for (int t = 0; t < 16; ++t) r.prompt.push_back(1 + (p * 37 + t * 11) % 250);
      for (int t = 0; t < 3 + q; ++t) r.prompt.push_back(1 + (q * 53 + t * 7 + p) % 250);
      r.max_tokens = 6;
      r.ignore_eos = true;
      r.return_logits = true;
      if (q == 2) r.sampling = {.temperature = 0.8f, .top_k = 0, .top_p = 0.9f, .seed = 7u + p};
      requests.push_back(r);
    }
  }
  EngineOptions opts;
  opts.block_size = 4;
  // Short enough that kept units are evicted: a request takes up to 7 pages of 4 tokens,
  // spread over the ranks when sharded (at 4 ranks, 2 pages a rank and 1 kept unit a prefix).
  opts.num_pages = GetParam() == KvShard::kSequence && g.pg.tp_size > 2 ? 4 : 16;
  // Each request's outputs, run one after another (in_turn) or all added at once.
  auto run = [&](bool caching, bool in_turn, std::vector<std::vector<StepOutput>>* out,
                 PrefixStats* stats) {
    opts.prefix_caching = caching;
    Engine engine(m, opts, g.comm.get());
    int64_t kept = 0;
    test::lead_or_follow(engine, [&] {
      std::map<RequestId, size_t> index;
      out->assign(requests.size(), {});
      for (size_t i = 0; i < requests.size(); ++i) {
        index[engine.add_request(requests[i])] = i;
        while (in_turn && engine.has_work()) {
          for (StepOutput& o : engine.step()) (*out)[index.at(o.id)].push_back(std::move(o));
        }
      }
      while (engine.has_work()) {
        for (StepOutput& o : engine.step()) (*out)[index.at(o.id)].push_back(std::move(o));
      }
      if (caching) {
        *stats = engine.cache().prefix_index()->stats();
        kept = engine.cache().prefix_index()->kept();
      }
    });
    MPI_Bcast(&kept, 1, MPI_INT64_T, 0, g.pg.tp_comm.get());
    // Every rank keeps one page per kept unit, and nothing else.
    EXPECT_EQ(engine.cache().pool().num_free(), opts.num_pages - kept)
        << "rank " << g.pg.tp_rank << (caching ? " with" : " without") << " caching";
  };
  for (const bool in_turn : {true, false}) {
    std::vector<std::vector<StepOutput>> want, got;
    PrefixStats stats;
    run(false, in_turn, &want, nullptr);
    run(true, in_turn, &got, &stats);
    if (g.pg.tp_rank != 0) continue;
    const std::string how = in_turn ? "one after another" : "all at once";
    for (size_t i = 0; i < requests.size(); ++i) {
      ASSERT_EQ(got[i].size(), want[i].size()) << how << ", request " << i;
      for (size_t s = 0; s < want[i].size(); ++s) {
        EXPECT_EQ(got[i][s].token, want[i][s].token) << how << ", request " << i << " step " << s;
        EXPECT_EQ(got[i][s].logits, want[i][s].logits) << how << ", request " << i << " step " << s;
      }
    }
    EXPECT_GT(stats.hit_tokens, 0) << how;
    if (in_turn) {
      // The second and third questions on each prefix start on its kept units (16 tokens:
      // two units of 8 sharded, four pages of 4 replicated).
      EXPECT_EQ(stats.hit_tokens, 4 * 2 * 16) << how;
      EXPECT_GT(stats.evicted_pages, 0) << how << ": the cache is short";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, TpPrefixCaching,
                         testing::Values(KvShard::kSequence, KvShard::kReplicate),
                         [](const auto& info) { return kv_name(info.param); });

// Every rank runs the same prefill batch on its own cache shard (no leader): the logits of
// every rank match transformers, and the pages each rank holds add up as the plan says —
// sharded, the group holds each page once; replicated, P times.
class TpShardedPages : public testing::TestWithParam<std::tuple<KvShard, int32_t>> {};

TEST_P(TpShardedPages, EachRankHoldsOnlyItsPages) {
  const auto& [kv, block_size] = GetParam();
  Group& g = group(world_size());
  const int P = g.pg.tp_size;
  const Golden& gold = golden("v3");
  auto m = model("v3", AbsorbMode::kAuto, kv, g);
  LatentCache cache(m->cache_geometry(block_size), 256, m->shard());
  std::vector<BlockTable> tables(gold.prompts.size());
  ForwardBatch batch;
  int64_t sequence_pages = 0;
  for (size_t p = 0; p < gold.prompts.size(); ++p) {
    const auto n = static_cast<int32_t>(gold.prompts[p].size());
    ASSERT_TRUE(cache.reserve(tables[p], n));
    batch.tokens.insert(batch.tokens.end(), gold.prompts[p].begin(), gold.prompts[p].end());
    batch.seqs.push_back({&tables[p], 0, n, true});
    sequence_pages += (n + block_size - 1) / block_size;
  }
  Tensor logits = m->make_runner(cache, g.comm.get())->forward(batch);
  const int64_t V = m->config().vocab_size;
  for (size_t p = 0; p < gold.prompts.size(); ++p) {
    const int64_t last = static_cast<int64_t>(gold.prompts[p].size()) - 1;
    EXPECT_LT(rel_error(logits.f32() + p * V, gold.prompt_logits[p].f32() + last * V, V),
              kTolerance)
        << "prompt " << p << " on rank " << g.pg.tp_rank;
  }
  int64_t mine = cache.pool().num_pages() - cache.pool().num_free(), total = 0;
  MPI_Allreduce(&mine, &total, 1, MPI_INT64_T, MPI_SUM, g.pg.tp_comm.get());
  EXPECT_EQ(total, kv == KvShard::kSequence ? sequence_pages : P * sequence_pages);
  if (kv == KvShard::kSequence) {
    // Rank r stores sequence pages r, r + P, ...: at most one page more than any other.
    int64_t most = 0, least = 0;
    MPI_Allreduce(&mine, &most, 1, MPI_INT64_T, MPI_MAX, g.pg.tp_comm.get());
    MPI_Allreduce(&mine, &least, 1, MPI_INT64_T, MPI_MIN, g.pg.tp_comm.get());
    EXPECT_LE(most - least, static_cast<int64_t>(gold.prompts.size()));
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, TpShardedPages,
                         testing::Combine(testing::Values(KvShard::kSequence, KvShard::kReplicate),
                                          testing::Values(1, 4, 64)),
                         [](const auto& info) {
                           return fmt::format("{}_b{}", kv_name(std::get<0>(info.param)),
                                              std::get<1>(info.param));
                         });

// Sequences shorter than P pages: some ranks hold none of a sequence's keys (LSE = -inf
// for them) and the merge must still give transformers' logits, token by token.
TEST(TpShortSequences, RanksWithoutKeysContributeNothing) {
  Group& g = group(world_size());
  const Golden& gold = golden("v2_lite");
  auto m = model("v2_lite", AbsorbMode::kFactored, KvShard::kSequence, g);
  const int64_t V = m->config().vocab_size;
  LatentCache cache(m->cache_geometry(4), 64, m->shard());
  const auto runner = m->make_runner(cache, g.comm.get());
  BlockTable table;
  const auto& prompt = gold.prompts[0];  // 5 tokens: 2 pages of 4, fewer than P = 4 pages
  for (size_t i = 0; i < prompt.size(); ++i) {
    ASSERT_TRUE(cache.reserve(table, static_cast<int32_t>(i + 1)));
    ForwardBatch batch{{prompt[i]}, {{&table, static_cast<int32_t>(i), 1, true}}};
    Tensor logits = runner->forward(batch);
    EXPECT_LT(rel_error(logits.f32(), gold.prompt_logits[0].f32() + i * V, V), kTolerance)
        << "position " << i;
  }
}

// Two or more groups in one world run independent engines at once (N / P groups).
TEST(TpGroups, GroupsOfTwoRunIndependently) {
  if (world_size() % 2 != 0 || world_size() < 4) GTEST_SKIP() << "needs 4+ ranks";
  Group& g = group(2);
  const Golden& gold = golden("v3");
  auto m = model("v3", AbsorbMode::kAuto, KvShard::kSequence, g);
  Engine engine(m, {}, g.comm.get());
  if (!engine.is_leader()) {
    engine.follow();
    return;
  }
  // Each group serves a different prompt.
  const size_t p = g.pg.group_index % gold.prompts.size();
  Request r;
  r.prompt = gold.prompts[p];
  r.max_tokens = gold.steps;
  r.ignore_eos = true;
  engine.add_request(r);
  std::vector<int32_t> tokens;
  while (engine.has_work()) {
    for (const auto& o : engine.step()) tokens.push_back(o.token);
  }
  engine.shutdown();
  EXPECT_EQ(tokens, gold.greedy[p]);
}

// The bytes each collective moved in a step equal the model's prediction.
TEST(TpCommAccounting, DecodeStepMatchesPrediction) {
  Group& g = group(world_size());
  for (KvShard kv : {KvShard::kSequence, KvShard::kReplicate}) {
    auto m = model("v3", AbsorbMode::kFactored, kv, g);
    const ModelConfig& c = m->config();
    LatentCache cache(m->cache_geometry(4), 64, m->shard());
    const Golden& gold = golden("v3");
    std::vector<BlockTable> tables;
    const auto [prefill, decode] = test::prefill_then_decode(gold, cache, tables);
    const auto runner = m->make_runner(cache, g.comm.get());
    runner->forward(prefill);
    WorkCounter work;
    runner->forward(decode, &work);
    const int64_t T = static_cast<int64_t>(decode.tokens.size());
    const CommStats want = predicted_step_comm(c, g.pg.tp_size, kv, T);
    for (int op = 0; op < kNumCommOps; ++op) {
      EXPECT_EQ(work.comm.bytes[op], want.bytes[op]) << to_string(static_cast<CommOp>(op));
      EXPECT_EQ(work.comm.calls[op], want.calls[op]) << to_string(static_cast<CommOp>(op));
    }
    if (g.pg.tp_size > 1) {
      // The volumes of the sequence-sharded step (docs/ARCHITECTURE.md section 6): T x H x (d_c +
      // d_r) gathered, two all-reduces of T x D.
      const int64_t f = sizeof(float), L = c.num_layers;
      EXPECT_EQ(work.comm.bytes[static_cast<int>(CommOp::kAllReduce)],
                L * 2 * T * c.hidden_size * f);
      if (kv == KvShard::kSequence) {
        EXPECT_EQ(work.comm.bytes[static_cast<int>(CommOp::kAllGather)],
                  L * T * c.num_heads * c.latent_width() * f);
      }
    }
  }
}

}  // namespace
}  // namespace mla

namespace mla {
namespace {

// A follower that never follows (a dead rank): the leader's step fails with an error
// naming the rank and the collective instead of hanging. A dedicated communicator with a
// short timeout is used and then abandoned, so the other tests' traffic is untouched.
TEST(TpFailure, LeaderTimesOutWhenAFollowerIsGone) {
  if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Group& g = group(world_size());
  auto* comm = new MpiCommunicator(g.pg.tp_comm.get(), std::chrono::milliseconds(1500), "tp test");
  auto m = model("v3", AbsorbMode::kAuto, KvShard::kSequence, g);
  Engine engine(m, {}, comm);
  if (engine.is_leader()) {
    Request r;
    r.prompt = golden("v3").prompts[0];
    engine.add_request(r);
    try {
      engine.step();
      ADD_FAILURE() << "step() returned although no follower took part";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kDeadlineExceeded);
      EXPECT_THAT(e.what(), testing::HasSubstr("rank 0"));
      EXPECT_THAT(e.what(), testing::HasSubstr("did not finish within 1500 ms"));
    }
  }
  MPI_Barrier(g.pg.tp_comm.get());  // the "dead" followers wait here, then the test ends
}

// The leader leaving through an exception still releases its followers (the pattern the
// CLI uses: shutdown() from a scope guard).
TEST(TpFailure, FollowersReturnWhenTheLeaderBailsOut) {
  Group& g = group(world_size());
  auto m = model("v3", AbsorbMode::kAuto, KvShard::kSequence, g);
  Engine engine(m, {}, g.comm.get());
  if (!engine.is_leader()) {
    engine.follow();  // returns only after the leader's shutdown
    return;
  }
  struct Shutdown {
    Engine& e;
    ~Shutdown() { e.shutdown(); }
  };
  EXPECT_THROW(
      {
        Shutdown guard{engine};
        Request r;
        r.prompt = golden("v3").prompts[1];
        engine.add_request(r);
        engine.step();
        throw std::runtime_error("the leader fails mid-run");
      },
      std::runtime_error);
}

}  // namespace
}  // namespace mla
