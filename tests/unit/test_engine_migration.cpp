// Engine export and import: a request moved between engines of different block sizes and
// cache room, mid-prefill or mid-decode, gives the tokens of the request never moved and
// recomputes nothing; live migration in stages keeps the source decoding while its latents
// are copied.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/engine.h"
#include "tests/support/staged_migration.h"
#include "tests/unit/engine_fixture.h"

namespace mla {
namespace {

using namespace test_engine;  // NOLINT: the fixture's names are these tests' vocabulary
using test::code_of;

// ---------------------------------------------------------------------------------------
// Export / import

struct MoveCase {
  std::string name;
  int32_t a_max_batch_tokens;  // engine A's budget (small: export mid-prefill)
  int a_steps;                 // steps in A before the export
  int32_t b_block;
  int32_t b_pages;
  bool b_busy;  // B runs another request that leaves too few pages for the latents
};

const std::vector<MoveCase> kMoveCases = {
    {"same_block_size", 512, 3, 4, 32, false},      // after a prefill and 2 decodes
    {"block_size_1", 512, 3, 1, 128, false},        // B's pages are single tokens
    {"block_size_64", 512, 5, 64, 4, false},        // all latents land in one page of B
    {"mid_prefill", 8, 1, 4, 32, false},            // 8 of 11 prompt tokens computed
    {"never_scheduled", 512, 0, 4, 32, false},      // no latents at all
    {"full_cache_recomputes", 512, 3, 4, 8, true},  // B lacks pages: latents dropped
};

class EngineMove : public testing::TestWithParam<std::tuple<MoveCase, bool>> {};

TEST_P(EngineMove, ExportedRequestFinishesInAnotherEngineWithTheSameTokens) {
  const auto& [tc, sampled] = GetParam();
  const Golden& g = golden();
  auto model = golden_model();
  const Request request =
      make_request(g.prompts[1], 8, sampled ? std::optional<uint64_t>(77) : std::nullopt);
  const Tokens want = run_alone(model, request);

  Engine a(model, options(4, 32, tc.a_max_batch_tokens));
  const RequestId id_a = a.add_request(request);
  Outputs out_a;
  for (int i = 0; i < tc.a_steps; ++i) out_a.add(a.step());
  const Tokens before = out_a.tokens[id_a];
  ASSERT_LT(before.size(), 8u);

  const RequestSnapshot snap = a.export_request(id_a);
  EXPECT_FALSE(a.has_work());
  EXPECT_EQ(a.cache().pool().num_free(), 32) << "export must free the pages";
  Tokens expected_tokens = g.prompts[1];
  expected_tokens.insert(expected_tokens.end(), before.begin(), before.end());
  EXPECT_EQ(snap.tokens, expected_tokens);
  EXPECT_EQ(snap.prompt_len, static_cast<int32_t>(g.prompts[1].size()));
  const int64_t computed = std::min<int64_t>(int64_t{tc.a_max_batch_tokens} * tc.a_steps,
                                             static_cast<int64_t>(snap.tokens.size()) - 1);
  EXPECT_EQ(snap.latents.dim(1), computed);

  Engine b(model, options(tc.b_block, tc.b_pages));
  Outputs out_b;
  RequestId filler = 0;
  if (tc.b_busy) {
    filler = b.add_request(make_request(g.prompts[2], 8));  // 19 tokens: 5 of the 8 pages
    out_b.add(b.step());
    ASSERT_LT(b.cache().pool().num_free(), b.cache().pages_for(static_cast<int32_t>(computed)));
  }
  const int32_t free_before_import = b.cache().pool().num_free();
  const RequestId id_b = b.import_request(snap);
  if (tc.b_busy) {
    EXPECT_EQ(b.cache().pool().num_free(), free_before_import) << "latents did not fit";
  } else {
    EXPECT_EQ(b.cache().pool().num_free(),
              free_before_import - b.cache().pages_for(static_cast<int32_t>(computed)));
  }
  run_to_end(b, out_b);

  Tokens all = before;
  all.insert(all.end(), out_b.tokens[id_b].begin(), out_b.tokens[id_b].end());
  EXPECT_EQ(all, want);
  EXPECT_EQ(out_b.finish[id_b], FinishReason::kLength);
  if (!sampled) {
    EXPECT_EQ(all, g.greedy[1]);
  }
  if (tc.b_busy) {
    EXPECT_EQ(out_b.tokens[filler], g.greedy[2]);
  }
  EXPECT_EQ(b.cache().pool().num_free(), tc.b_pages);
}

INSTANTIATE_TEST_SUITE_P(Engine, EngineMove,
                         testing::Combine(testing::ValuesIn(kMoveCases), testing::Bool()),
                         [](const auto& info) {
                           return std::get<0>(info.param).name +
                                  (std::get<1>(info.param) ? "_sampled" : "_greedy");
                         });

TEST(Engine, ExportOfAnUnknownIdThrowsNotFound) {
  Engine engine(golden_model(), options(4, 8));
  EXPECT_EQ(code_of([&] { engine.export_request(3); }), ErrorCode::kNotFound);
}

// An import whose latents take the last free pages must not stall a running request that
// needs one more page: one of the two has to give way.
TEST(Engine, ImportTakingTheLastPagesDoesNotStallTheEngine) {
  const Golden& g = golden();
  auto model = golden_model();
  const Request moved = make_request(g.prompts[2], 8);
  Engine a(model, options(4, 32));
  const RequestId id_a = a.add_request(moved);
  Outputs out_a;
  for (int i = 0; i < 5; ++i) out_a.add(a.step());
  const RequestSnapshot snap = a.export_request(id_a);
  ASSERT_EQ(snap.latents.dim(1), 23);  // 6 pages of 4

  Engine b(model, options(4, 8));
  const Tokens filler_prompt(g.prompts[1].begin(), g.prompts[1].begin() + 8);
  const RequestId filler = b.add_request(make_request(filler_prompt, 8));
  Outputs out_b;
  out_b.add(b.step());  // 8 tokens computed: 2 pages; its 9th token needs a third
  const RequestId id_b = b.import_request(snap);
  ASSERT_EQ(b.cache().pool().num_free(), 0);

  run_to_end(b, out_b);
  Tokens all = out_a.tokens[id_a];
  all.insert(all.end(), out_b.tokens[id_b].begin(), out_b.tokens[id_b].end());
  EXPECT_EQ(all, g.greedy[2]);
  EXPECT_EQ(out_b.tokens[filler], run_alone(model, make_request(filler_prompt, 8)));
  EXPECT_EQ(b.cache().pool().num_free(), 8);
}

// ---------------------------------------------------------------------------------------
// Live migration in stages: the request keeps decoding at the source while its latents are
// copied, stops for the tail only, and the destination continues without recomputing.

// Migrates the request of `prompt` from a source engine (pages of `a_block`) to a destination
// (pages of `b_block`) after `first_steps` source steps, copying once more after two more;
// returns every token the request produced, from both engines.
Tokens migrate_live(const Request& request, int32_t a_block, int32_t b_block, int first_steps) {
  Engine a(golden_model(), options(a_block, 64)), b(golden_model(), options(b_block, 64));
  return test::migrate_in_stages(a, b, request, first_steps);
}

TEST(EngineMigration, LiveMigrationGivesTheTokensOfAnUnmigratedRun) {
  const Golden& g = golden();
  for (auto [a_block, b_block] : {std::pair{4, 4}, {4, 16}, {16, 4}}) {
    SCOPED_TRACE(testing::Message() << "pages of " << a_block << " then " << b_block);
    EXPECT_EQ(migrate_live(make_request(g.prompts[1], 8), a_block, b_block, 2), g.greedy[1]);
    const Request seeded = make_request(g.prompts[1], 8, 1003);
    EXPECT_EQ(migrate_live(seeded, a_block, b_block, 3), run_alone(golden_model(), seeded));
  }
}

TEST(EngineMigration, ADestinationWithoutRoomRefusesBeforeAnyCopyAndAbortFreesPages) {
  const Golden& g = golden();
  auto model = golden_model();
  Engine a(model, options(4, 64)), small(model, options(4, 2));
  const RequestId id = a.add_request(make_request(g.prompts[1], 8));
  Outputs out;
  out.add(a.step());
  int32_t end = 0;
  a.copy_latents(id, 0, &end);
  ASSERT_GT(small.cache().pages_for(end), 2);
  EXPECT_EQ(code_of([&] { small.begin_import(end); }), ErrorCode::kResourceExhausted);
  EXPECT_EQ(small.cache().pool().num_free(), 2);
  EXPECT_EQ(small.pending_imports(), 0u);
  // Started, then given up: the destination's pages come back; the source never stopped.
  Engine b(model, options(4, 64));
  const int64_t h = b.begin_import(end);
  b.write_import(h, 0, a.copy_latents(id, 0, &end));
  EXPECT_LT(b.cache().pool().num_free(), 64);
  EXPECT_EQ(code_of([&] { b.write_import(h, end + 1, a.copy_latents(id, end, &end)); }),
            ErrorCode::kInvalidArgument)
      << "a gap in the copied tokens";
  EXPECT_TRUE(b.abort_import(h));
  EXPECT_FALSE(b.abort_import(h));
  EXPECT_EQ(b.cache().pool().num_free(), 64);
  run_to_end(a, out);
  EXPECT_EQ(out.tokens[id], g.greedy[1]);
}

// The source preempts the migrating request after its first copy (two requests and 7 pages of
// 4 tokens, as EnginePreemption): what was copied stays valid, since latents depend only on
// the tokens, and the destination continues it with the unmigrated tokens.
TEST(EngineMigration, APreemptionAtTheSourceDoesNotSpoilWhatWasCopied) {
  const Golden& g = golden();
  auto model = golden_model();
  Engine a(model, options(4, 7)), b(model, options(4, 64));
  a.add_request(make_request(g.prompts[0], 8));
  const RequestId id = a.add_request(make_request(g.prompts[1], 8));
  Outputs out_a, out_b;
  out_a.add(a.step());
  int32_t end = 0;
  const Tensor first = a.copy_latents(id, 0, &end);
  ASSERT_EQ(end, static_cast<int32_t>(g.prompts[1].size()));
  const int64_t h = b.begin_import(end);
  b.write_import(h, 0, first);
  for (int step = 0; a.stats().preemptions == 0 && step < kMaxSteps; ++step) out_a.add(a.step());
  ASSERT_GT(a.stats().preemptions, 0) << "the source was meant to preempt";
  int32_t end2 = 0;
  b.write_import(h, end, a.copy_latents(id, end, &end2));
  const RequestId id_b = b.finish_import(h, a.export_request(id, end2));
  run_to_end(b, out_b);
  Tokens all = out_a.tokens[id];
  all.insert(all.end(), out_b.tokens[id_b].begin(), out_b.tokens[id_b].end());
  EXPECT_EQ(all, g.greedy[1]);
  EXPECT_EQ(b.cache().pool().num_free(), 64);
}

// A request that finishes, or is cancelled, while its latents are being copied just ends at
// the source; the half-done import is aborted and neither side keeps a page.
TEST(EngineMigration, ARequestThatEndsDuringTheCopyJustEnds) {
  const Golden& g = golden();
  auto model = golden_model();
  for (bool cancelled : {false, true}) {
    SCOPED_TRACE(cancelled ? "cancelled" : "finished");
    Engine a(model, options(4, 64)), b(model, options(4, 64));
    const RequestId id = a.add_request(make_request(g.prompts[1], 3));
    Outputs out;
    out.add(a.step());
    int32_t end = 0;
    const int64_t h = b.begin_import(static_cast<int32_t>(g.prompts[1].size()));
    b.write_import(h, 0, a.copy_latents(id, 0, &end));
    if (cancelled) {
      EXPECT_TRUE(a.cancel(id));
    } else {
      run_to_end(a, out);
      EXPECT_EQ(out.finish[id], FinishReason::kLength);
      EXPECT_EQ(out.tokens[id], Tokens(g.greedy[1].begin(), g.greedy[1].begin() + 3));
    }
    EXPECT_EQ(code_of([&] { a.copy_latents(id, end, &end); }), ErrorCode::kNotFound);
    EXPECT_EQ(code_of([&] { a.export_request(id, end); }), ErrorCode::kNotFound);
    EXPECT_TRUE(b.abort_import(h));
    EXPECT_EQ(a.cache().pool().num_free(), 64);
    EXPECT_EQ(b.cache().pool().num_free(), 64);
    EXPECT_FALSE(b.has_work());
  }
}

}  // namespace
}  // namespace mla
