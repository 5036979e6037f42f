// Prefix caching in the engine (EngineOptions::prefix_caching, the CPU model): requests that
// share a prompt prefix start on its cached full pages and compute only the rest, with the
// tokens and (deterministic) logits of a run without caching; a prefix that ends inside a
// page reuses only the whole pages; a cache short of pages evicts kept pages, never a page a
// running request holds, and loses nothing; a request cancelled while it prefills on a shared
// prefix leaves every reference count as it found it; after everything ends, every page is
// free or kept by the index alone.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <vector>

#include "kernels/error.h"
#include "runtime/deepseek_model.h"
#include "runtime/engine.h"
#include "tests/support/golden.h"

namespace mla {
namespace {

using Tokens = std::vector<int32_t>;

std::shared_ptr<const DeepseekModel> model() {
  static const auto m = [] {
    ModelOptions o;
    o.show_progress = false;
    o.deterministic = true;  // logits independent of how the prompt is cut into chunks
    return DeepseekModel::load(test::model_dir("v3"), o);
  }();
  return m;
}

EngineOptions options(bool caching, int32_t num_pages = 64) {
  EngineOptions o;
  o.block_size = 4;
  o.num_pages = num_pages;
  o.prefix_caching = caching;
  return o;
}

Request request(Tokens prompt, uint64_t seed) {
  Request r;
  r.prompt = std::move(prompt);
  r.max_tokens = 6;
  r.ignore_eos = true;
  r.return_logits = true;
  r.sampling = {.temperature = 0.8f, .top_k = 0, .top_p = 0.9f, .seed = seed};
  return r;
}

// Runs the requests one after another (each to its end), returning each one's steps.
std::vector<std::vector<StepOutput>> run_in_turn(Engine& engine, const std::vector<Request>& rs) {
  std::vector<std::vector<StepOutput>> out;
  for (const Request& r : rs) {
    const RequestId id = engine.add_request(r);
    out.emplace_back();
    while (engine.has_work()) {
      for (StepOutput& o : engine.step()) {
        if (o.id == id) out.back().push_back(std::move(o));
      }
    }
  }
  return out;
}

// Eight requests: a 14-token system prefix (three full pages of 4 and two tokens of a fourth)
// followed by different questions.
std::vector<Request> shared_prefix_requests() {
  const Tokens system = {5, 9, 14, 200, 31, 77, 8, 120, 66, 3, 250, 41, 17, 90};
  std::mt19937 rng(11);
  std::vector<Request> rs;
  for (int i = 0; i < 8; ++i) {
    Tokens p = system;
    for (int k = 0; k < 3 + i % 4; ++k) p.push_back(static_cast<int32_t>(rng() % 256));
    rs.push_back(request(p, 100 + i));
  }
  return rs;
}

TEST(PrefixCaching, SharedPrefixesAreComputedOnceAndTheOutputsDoNotChange) {
  const std::vector<Request> rs = shared_prefix_requests();
  Engine off(model(), options(false)), on(model(), options(true));
  const auto want = run_in_turn(off, rs);
  const auto got = run_in_turn(on, rs);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < rs.size(); ++i) {
    ASSERT_EQ(got[i].size(), want[i].size()) << "request " << i;
    for (size_t s = 0; s < want[i].size(); ++s) {
      EXPECT_EQ(got[i][s].token, want[i][s].token) << "request " << i << " step " << s;
      ASSERT_EQ(got[i][s].logits, want[i][s].logits) << "request " << i << " step " << s;
    }
  }
  // The first request computes its prompt; the seven others reuse the three full pages of
  // the system prefix (12 tokens each), the partial fourth page is computed again.
  const PrefixStats& stats = on.cache().prefix_index()->stats();
  EXPECT_EQ(stats.hit_tokens, 7 * 12);
  EXPECT_EQ(off.stats().computed_tokens - on.stats().computed_tokens, 7 * 12);
  // Everything ended: each page is free or held by the index alone.
  EXPECT_EQ(on.cache().num_available(), 64);
  EXPECT_EQ(on.cache().pool().num_free() + on.cache().prefix_index()->kept(), 64);
}

TEST(PrefixCaching, AShortCacheEvictsKeptPagesAndLosesNothing) {
  // 12 pages of 4 tokens: about two requests' worth; every request has its own prompt, so the
  // kept pages of earlier ones must be evicted for the later ones.
  Engine engine(model(), options(true, 12));
  std::mt19937 rng(5);
  std::vector<RequestId> ids;
  for (int i = 0; i < 10; ++i) {
    Tokens p(12 + i % 5);
    for (int32_t& t : p) t = static_cast<int32_t>(rng() % 256);
    ids.push_back(engine.add_request(request(p, i)));
  }
  std::map<RequestId, int> produced;
  for (int step = 0; engine.has_work(); ++step) {
    ASSERT_LT(step, 2000);
    for (const StepOutput& o : engine.step()) produced[o.id] += o.token >= 0 ? 1 : 0;
  }
  for (RequestId id : ids) EXPECT_EQ(produced[id], 6) << "request " << id;
  EXPECT_GT(engine.cache().prefix_index()->stats().evicted_pages, 0);
  EXPECT_EQ(engine.cache().num_available(), 12);
}

// A request that waits for pages is looked up at each step it tries, but counted once, when
// it is admitted: the hit rate is per request, not per try.
TEST(PrefixCaching, ALookupIsCountedOnceWhateverTheTriesBeforeAdmission) {
  const std::vector<Request> rs = shared_prefix_requests();
  Engine engine(model(), options(true, 6));  // one request at a time
  engine.add_request(rs[0]);
  engine.add_request(rs[1]);  // waits for rs[0]'s pages, trying at every step
  int steps = 0;
  while (engine.has_work()) {
    ASSERT_LT(steps++, 100);
    engine.step();
  }
  EXPECT_GT(steps, 6) << "the second request waited";
  const PrefixStats& stats = engine.cache().prefix_index()->stats();
  EXPECT_EQ(stats.lookups, 2);
  EXPECT_EQ(stats.lookup_tokens, 2 * 16) << "each prompt's four full pages";
  EXPECT_EQ(stats.hit_tokens, 12) << "the second reuses the system prefix's three";
}

TEST(PrefixCaching, ACancelDuringAPrefillOnASharedPrefixGivesBackItsReferences) {
  const std::vector<Request> rs = shared_prefix_requests();
  EngineOptions o = options(true);
  o.scheduler.max_batch_tokens = 2;  // prefill in chunks of two tokens
  Engine engine(model(), o);
  run_in_turn(engine, {rs[0]});
  const int32_t kept = engine.cache().prefix_index()->kept();
  const RequestId id = engine.add_request(rs[1]);
  engine.step();  // it starts on the three kept pages and computes two more tokens
  EXPECT_EQ(engine.cache().prefix_index()->evictable(), kept - 3) << "it holds the prefix";
  EXPECT_TRUE(engine.cancel(id));
  EXPECT_EQ(engine.cache().prefix_index()->evictable(), kept);
  EXPECT_EQ(engine.cache().num_available(), 64);
}

// A request migrated in leaves its full pages reusable at the destination: a new request
// with its prompt starts on them there.
TEST(PrefixCaching, AnImportedRequestsPagesAreReusableAtTheDestination) {
  const std::vector<Request> rs = shared_prefix_requests();
  Engine source(model(), options(false)), destination(model(), options(true));
  const RequestId id = source.add_request(rs[0]);
  source.step();  // its prompt (17 tokens) and first token
  const RequestSnapshot snap = source.export_request(id);
  destination.import_request(snap);
  EXPECT_EQ(destination.cache().prefix_index()->kept(), 4) << "17 computed tokens: 4 full pages";
  run_in_turn(destination, {rs[1]});
  EXPECT_EQ(destination.cache().prefix_index()->stats().hit_tokens, 12) << "the system pages";
  while (destination.has_work()) destination.step();
  EXPECT_EQ(destination.cache().num_available(), 64);
}

// A sequence-sharded group of two keeps units of two pages (one on each rank). The leader's
// index decides and records what it does; a follower that makes the same changes to its own
// pages reuses, for the same units, the pages it computed them in, frees what the leader
// evicts, and ends with every page free.
TEST(PrefixCaching, AShardedFollowerMakesItsLeadersChangesToItsOwnPages) {
  const CacheGeometry g{1, 4, 8, 0};
  LatentCache leader(g, 8, ShardPlan(2, 0, 2)), follower(g, 8, ShardPlan(2, 1, 2));
  leader.enable_prefix_caching(/*record_ops=*/true);
  EXPECT_EQ(leader.prefix_unit_tokens(), 8);
  std::map<int64_t, BlockTable> followed;  // the follower's tables, by owner
  auto follow = [&] {
    for (const PrefixOp& op : leader.take_prefix_ops()) {
      if (op.kind == PrefixOp::Kind::kDrop) {
        follower.release(followed[op.owner]);
        followed.erase(op.owner);
      } else {
        follower.apply_prefix_op(op,
                                 op.kind == PrefixOp::Kind::kEvict ? nullptr : &followed[op.owner]);
      }
    }
  };
  Tokens a(20);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<int32_t>(i);
  BlockTable ta{.owner = 1};
  ASSERT_TRUE(leader.reserve(ta, 20));             // sequence pages 0, 2, 4
  ASSERT_TRUE(follower.reserve(followed[1], 20));  // sequence pages 1, 3
  leader.keep_full_pages(ta, a, 20);  // units 0 and 1 (tokens 0-15); unit 2 is not full
  follow();
  const std::vector<int32_t> kept_on_follower = {followed[1].pages[0], followed[1].pages[1]};
  leader.release(ta);
  follow();
  EXPECT_TRUE(followed.empty());
  EXPECT_EQ(leader.pool().num_free(), 6) << "two units kept";
  EXPECT_EQ(follower.pool().num_free(), 6) << "the same two units, its own pages";

  // A prompt with the same first 16 tokens starts on both units, on both ranks.
  Tokens b(a.begin(), a.begin() + 16);
  b.insert(b.end(), {100, 101, 102});
  BlockTable tb{.owner = 2};
  EXPECT_EQ(leader.reuse_prefix(tb, b, static_cast<int32_t>(b.size()) - 1), 16);
  follow();
  EXPECT_EQ(followed[2].pages, kept_on_follower);
  EXPECT_EQ(followed[2].num_tokens, 16);
  ASSERT_TRUE(leader.reserve(tb, 19));
  ASSERT_TRUE(follower.reserve(followed[2], 19));
  EXPECT_EQ(follower.pool().num_free(), 6) << "rank 1 holds no page of tokens 16-18";
  leader.release(tb);
  follow();

  // A sequence that needs every page makes the leader evict both units, and the follower too.
  BlockTable tc{.owner = 3};
  ASSERT_TRUE(leader.reserve(tc, 64));
  follow();
  EXPECT_EQ(follower.pool().num_free(), 8) << "the evicted units' pages are free";
  ASSERT_TRUE(follower.reserve(followed[3], 64));
  leader.release(tc);
  follow();
  EXPECT_EQ(leader.pool().num_free(), 8);
  EXPECT_EQ(follower.pool().num_free(), 8);

  BlockTable td;
  EXPECT_THROW(follower.apply_prefix_op({PrefixOp::Kind::kReuse, 4, 0, 12345}, &td), Error)
      << "a unit the follower does not keep";
}

}  // namespace
}  // namespace mla
