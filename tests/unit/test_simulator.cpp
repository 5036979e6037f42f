// `mlaserve simulate`'s model and event loop (launch/bench/simulator.h): the step-time model
// reproduces its measured points and fits a linear cost exactly; a lone request's timeline is
// request + prefill step + network, then one decode step per token; the real scheduler and
// router run underneath (requests spread over groups, a small cache preempts and still
// finishes everything, the admission limit refuses).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>

#include "kernels/error.h"
#include "launch/bench/simulator.h"

namespace mla::bench {
namespace {

// Steps that cost 1 ms + 0.01 ms per prefill token + 0.1 ms per decoding sequence + 0.001 ms
// per context token.
std::vector<StepSample> linear_samples() {
  std::vector<StepSample> out;
  for (const int32_t p : {16, 64, 256})
    out.push_back({p, 0, 0, int64_t{p} * (p / 2), 1 + 0.01 * p});
  for (const int32_t b : {1, 8, 32}) {
    for (const int32_t c : {64, 512}) {
      out.push_back({0, b, int64_t{b} * c, 0, 1 + 0.1 * b + 0.001 * b * c});
    }
  }
  return out;
}

TEST(StepTimeModel, ReproducesItsPointsAndFitsALinearCost) {
  const StepTimeModel m = StepTimeModel::fit(linear_samples());
  for (const StepSample& s : linear_samples()) EXPECT_NEAR(m.step_ms(s), s.step_ms, 1e-9);
  EXPECT_NEAR(m.coefficients()[1], 0.01, 1e-6);
  EXPECT_NEAR(m.coefficients()[2], 0.1, 1e-6);
  EXPECT_NEAR(m.coefficients()[3], 0.001, 1e-8);
  EXPECT_LT(m.max_relative_error(), 1e-6);
  // Between points: linear in each axis; a mixed step adds its parts.
  EXPECT_NEAR(m.step_ms({160, 0, 0, 0, 0}), 1 + 0.01 * 160, 1e-9);
  EXPECT_NEAR(m.step_ms({0, 20, 20 * 288, 0, 0}), 1 + 0.1 * 20 + 0.001 * 20 * 288, 1e-9);
  EXPECT_NEAR(m.step_ms({64, 8, 8 * 64, 0, 0}), (1 + 0.64) + (1 + 0.8 + 0.512), 1e-9);
  EXPECT_THROW(StepTimeModel::fit({{16, 0, 0, 128, 1.0}}), Error);
}

// Mixed steps measured at two prefill sizes: beside decodes a 16-token chunk adds half of what
// it costs alone, a 256-token chunk all of it; between, the share is interpolated over the size.
TEST(StepTimeModel, AMixedStepsPrefillShareFollowsItsSize) {
  std::vector<StepSample> s = linear_samples();
  const auto prefill = [](int32_t p) { return 1 + 0.01 * p; };
  const auto decode = [](int32_t b, int64_t c) { return 1 + 0.1 * b + 0.001 * b * c; };
  for (const int32_t b : {1, 8}) {
    s.push_back({16, b, int64_t{b} * 64, 16 * 8, decode(b, 64) + 0.5 * prefill(16)});
    s.push_back({256, b, int64_t{b} * 64, 256 * 128, decode(b, 64) + 1.0 * prefill(256)});
  }
  const StepTimeModel m = StepTimeModel::fit(s);
  EXPECT_NEAR(m.mixed_weight(16), 0.5, 1e-9);
  EXPECT_NEAR(m.mixed_weight(256), 1.0, 1e-9);
  EXPECT_NEAR(m.mixed_weight(4), 0.5, 1e-9);
  EXPECT_NEAR(m.mixed_weight(136), 0.75, 1e-9);
  EXPECT_NEAR(m.mixed_weight(1000), 1.0, 1e-9) << "beyond the sizes measured: the nearest one's";
  EXPECT_NEAR(m.step_ms({136, 8, 8 * 64, 0, 0}), decode(8, 64) + 0.75 * prefill(136), 1e-9);
  // One share over all of them, weighted by the prefill part (the longer chunks count more).
  EXPECT_GT(m.mixed_weight(), 0.75);
  EXPECT_LT(m.mixed_weight(), 1.0);
}

// n requests of prompt_len tokens and output_len tokens each, all arriving at the start.
std::vector<WorkItem> same_items(size_t n, size_t prompt_len, int32_t output_len) {
  std::vector<WorkItem> items(n);
  for (WorkItem& w : items) {
    w.prompt_ids.assign(prompt_len, 1);
    w.output_len = output_len;
  }
  return items;
}

StepTimeModel constant_model(double prefill_ms, double decode_ms) {
  // Flat costs: every prefill step prefill_ms, every decode step decode_ms.
  std::vector<StepSample> s;
  for (const int32_t p : {1, 100, 1000}) s.push_back({p, 0, 0, 0, prefill_ms});
  for (const int32_t b : {1, 100}) {
    for (const int32_t c : {1, 10000}) s.push_back({0, b, int64_t{b} * c, 0, decode_ms});
  }
  return StepTimeModel::fit(s);
}

TEST(Simulator, ALoneRequestsTimelineIsItsSteps) {
  WorkItem w;
  w.prompt_ids.assign(100, 1);
  w.output_len = 5;
  SimOptions o;
  o.request_ms = 1.0;
  o.network_ms = 0.5;
  const SimResult r = simulate({w}, constant_model(10.0, 2.0), o);
  ASSERT_EQ(r.records.size(), 1u);
  const RequestRecord& rec = r.records[0];
  EXPECT_TRUE(rec.sent && rec.complete);
  EXPECT_EQ(rec.output_tokens, 5);
  EXPECT_NEAR(rec.ttft_ms, 1.0 + 10.0 + 0.5, 1e-9);  // request, prefill (samples), network
  EXPECT_NEAR(rec.e2el_ms, 11.5 + 4 * 2.0, 1e-9);    // then a decode step per token
  for (const double g : rec.itl_ms) EXPECT_NEAR(g, 2.0, 1e-9);
  EXPECT_EQ(r.steps, 5);

  // Calibrated: every step 1.5 times as long.
  o.step_scale = StepScale::parse("1.5", "--step-scale");
  const RequestRecord scaled = simulate({w}, constant_model(10.0, 2.0), o).records[0];
  EXPECT_NEAR(scaled.ttft_ms, 1.0 + 15.0 + 0.5, 1e-9);
  EXPECT_NEAR(scaled.e2el_ms, 16.5 + 4 * 3.0, 1e-9);
  // Per kind: the prompt's step (prefill only) x 2, the decodes x 1.25.
  o.step_scale = StepScale::parse("prefill=2,decode=1.25", "--step-scale");
  EXPECT_DOUBLE_EQ(o.step_scale.mixed, 1.0);
  const RequestRecord by_kind = simulate({w}, constant_model(10.0, 2.0), o).records[0];
  EXPECT_NEAR(by_kind.ttft_ms, 1.0 + 20.0 + 0.5, 1e-9);
  EXPECT_NEAR(by_kind.e2el_ms, 21.5 + 4 * 2.5, 1e-9);
  o.step_scale.decode = 0;
  EXPECT_THROW(simulate({w}, constant_model(10.0, 2.0), o), Error);
  for (const char* bad : {"0", "-1", "x", "decode=1,foo=2", "decode", "mixed=", "1.5,2"}) {
    EXPECT_THROW(StepScale::parse(bad, "--step-scale"), Error) << bad;
  }
  const StepScale k{1.1, 1.2, 1.3};
  EXPECT_DOUBLE_EQ(k.of({0, 4, 400, 0, 0}), 1.1);     // decode only
  EXPECT_DOUBLE_EQ(k.of({16, 0, 0, 136, 0}), 1.2);    // prefill only
  EXPECT_DOUBLE_EQ(k.of({16, 4, 400, 136, 0}), 1.3);  // both
}

// Groups on one device split it while their steps overlap: a prompt's step of 10 ms alone starts
// at 0 on group 0, another at 5 ms on group 1; the first has 5 ms left when they meet and ends
// at 15 ms (half speed), the second has done 5 ms by then and ends alone at 20 ms. On devices of
// their own both take 10 ms; a group dying mid-step gives its share back at once.
TEST(Simulator, GroupsSharingADeviceSplitItWhileTheirStepsOverlap) {
  std::vector<WorkItem> items = same_items(2, 100, 1);
  items[1].arrival_s = 0.005;
  SimOptions o;
  o.groups = 2;
  o.routing = RoutingPolicy::kRoundRobin;
  o.request_ms = 0;
  o.network_ms = 0;
  const StepTimeModel model = constant_model(10.0, 2.0);
  const SimResult apart = simulate(items, model, o);
  EXPECT_NEAR(apart.records[0].ttft_ms, 10.0, 1e-9);
  EXPECT_NEAR(apart.records[1].ttft_ms, 10.0, 1e-9);
  o.groups_per_device = 2;
  const SimResult shared = simulate(items, model, o);
  ASSERT_NE(shared.records[0].workers, shared.records[1].workers);
  EXPECT_NEAR(shared.records[0].ttft_ms, 15.0, 1e-9);
  EXPECT_NEAR(shared.records[1].ttft_ms, 15.0, 1e-9);  // from 5 ms to 20 ms
  // Three groups, two a device: the third request (round robin: group 2) is alone on the
  // second device.
  items.push_back(items[0]);
  items[2].arrival_s = 0.010;
  o.groups = 3;
  const SimResult three = simulate(items, model, o);
  EXPECT_NEAR(three.records[2].ttft_ms, 10.0, 1e-9);
  // Group 1 dies at 7 ms: group 0, sharing since 5 ms (4 ms left), then runs alone to 11 ms.
  items.pop_back();
  o.groups = 2;
  o.failures = {{1, 0.007}};
  const SimResult failed = simulate(items, model, o);
  EXPECT_NEAR(failed.records[0].ttft_ms, 11.0, 1e-9);
  o.groups_per_device = 0;
  EXPECT_THROW(simulate(items, model, o), Error);
}

TEST(Simulator, RunsTheRealSchedulerAndRouter) {
  const std::vector<WorkItem> items = same_items(40, 200, 30);
  SimOptions o;
  o.groups = 2;
  o.block_size = 16;
  o.num_pages = 40;  // 640 tokens per group: a few requests at a time, so some are preempted
  o.max_concurrency = 40;
  const SimResult r = simulate(items, constant_model(5.0, 1.0), o);
  int complete = 0;
  std::map<std::string, int> per_group;
  for (const RequestRecord& rec : r.records) {
    complete += rec.complete && rec.output_tokens == 30 ? 1 : 0;
    ++per_group[rec.workers.empty() ? "" : rec.workers.front()];
  }
  EXPECT_EQ(complete, 40) << "nothing lost";
  EXPECT_EQ(per_group.size(), 2u);
  EXPECT_GT(per_group["sim-0"], 10);
  EXPECT_GT(per_group["sim-1"], 10);
  EXPECT_GT(r.preemptions, 0) << "the small cache preempts";

  o.max_in_flight = 5;
  const SimResult limited = simulate(items, constant_model(5.0, 1.0), o);
  int refused = 0;
  for (const RequestRecord& rec : limited.records) refused += rec.code == "RESOURCE_EXHAUSTED";
  EXPECT_EQ(refused, 35) << "all 40 arrive at once; 5 are admitted";
}

// A group that dies mid-run: its requests fail over to the other group with the tokens they
// streamed (recomputed there, not repeated), and each still gets every token it asked for; a
// request whose groups all died fails with UNAVAILABLE.
TEST(Simulator, AFailedGroupsRequestsFailOverAndLoseNoToken) {
  const std::vector<WorkItem> items = same_items(8, 50, 40);
  SimOptions o;
  o.groups = 2;
  o.max_concurrency = 8;
  o.failures = {{0, 0.050}};  // after the prefill (10 ms) and ~20 decode steps (2 ms)
  const SimResult r = simulate(items, constant_model(10.0, 2.0), o);
  int moved = 0;
  for (const RequestRecord& rec : r.records) {
    EXPECT_TRUE(rec.complete);
    EXPECT_EQ(rec.output_tokens, 40) << "every token once";
    EXPECT_EQ(rec.workers.back(), "sim-1");
    if (rec.workers.size() == 2) {
      ++moved;
      EXPECT_EQ(rec.workers.front(), "sim-0");
      // The tokens after the failure came after the resubmission and the recompute.
      const auto first_after =
          std::find_if(rec.token_s.begin(), rec.token_s.end(), [](double t) { return t > 0.05; });
      ASSERT_NE(first_after, rec.token_s.end());
      EXPECT_GT(*first_after, 0.050 + (o.network_ms + o.request_ms + 10.0) / 1000.0 - 1e-9);
    }
  }
  EXPECT_EQ(moved, 4) << "least-loaded split them 4 and 4";

  o.failures = {{0, 0.050}, {1, 0.020}};
  const SimResult none_left = simulate(items, constant_model(10.0, 2.0), o);
  for (const RequestRecord& rec : none_left.records) {
    EXPECT_EQ(rec.code, "UNAVAILABLE");
    EXPECT_FALSE(rec.complete);
  }
  o.failures = {{2, 1.0}};
  EXPECT_THROW(simulate(items, constant_model(10.0, 2.0), o), Error);
}

// A TP4 group with a sequence-sharded cache holds about four times the context of one whose
// ranks replicate it (its leader stores every fourth page): about four times as many
// requests run at once, and with step times that do not grow with the batch (this model's)
// the same load ends far sooner (not 4x: the step's token budget paces the prefills).
TEST(Simulator, ASequenceShardedGroupHoldsTpTimesTheContext) {
  const std::vector<WorkItem> items = same_items(24, 300, 20);
  SimOptions o;
  o.tp = 4;
  o.block_size = 16;
  o.num_pages = 60;  // per rank: 960 tokens replicated, ~3,840 sharded
  o.max_concurrency = 24;
  o.kv_shard = KvShard::kReplicate;
  const SimResult replicated = simulate(items, constant_model(5.0, 1.0), o);
  o.kv_shard = KvShard::kSequence;
  const SimResult sharded = simulate(items, constant_model(5.0, 1.0), o);
  for (const SimResult* r : {&replicated, &sharded}) {
    for (const RequestRecord& rec : r->records) EXPECT_TRUE(rec.complete);
  }
  EXPECT_LT(sharded.duration_s, 0.6 * replicated.duration_s)
      << "replicated " << replicated.duration_s << " s, sharded " << sharded.duration_s << " s";
}

// Prefix caching in the simulated groups (the engine's PrefixIndex over the accounting-only
// cache): requests sharing a 3-page prefix prefill it once; the rest come sooner.
TEST(Simulator, PrefixCachingServesSharedPrefixesFromCachedPages) {
  std::vector<WorkItem> items(10);
  for (size_t i = 0; i < items.size(); ++i) {
    items[i].prompt_ids.assign(48, 7);  // 3 pages of 16 shared
    for (int32_t k = 0; k < 10; ++k)
      items[i].prompt_ids.push_back(static_cast<int32_t>(100 * i + k));
    items[i].output_len = 4;
    items[i].arrival_s = 0.05 * static_cast<double>(i);  // each after the previous one's prefill
  }
  SimOptions o;
  o.block_size = 16;
  const auto model = StepTimeModel::fit(linear_samples());
  const SimResult off = simulate(items, model, o);
  o.prefix_caching = true;
  const SimResult on = simulate(items, model, o);
  EXPECT_EQ(off.prefix_hit_tokens, 0);
  EXPECT_EQ(on.prefix_hit_tokens, 9 * 48);
  for (size_t i = 1; i < items.size(); ++i) {
    EXPECT_LT(on.records[i].ttft_ms, off.records[i].ttft_ms) << "request " << i;
    EXPECT_TRUE(on.records[i].complete);
  }
}

// Disaggregated prefill/decode: every request prefills on the prefill group, which hands it,
// with its cache, to the decode group after its first token; the hand-off's gap follows the
// cache's size; the decode group computes only decode tokens. A decode group without room for
// a cache leaves the request where it is.
TEST(Simulator, PrefillGroupsHandRequestsWithTheirCachesToDecodeGroups) {
  std::vector<WorkItem> items(6);
  for (size_t i = 0; i < items.size(); ++i) {
    items[i].prompt_ids.assign(100 + 50 * i, 1);
    items[i].output_len = 10;
    items[i].arrival_s = 0.1 * static_cast<double>(i);  // one at a time
  }
  SimOptions o;
  o.groups = 2;
  o.prefill_groups = 1;
  o.latent_bytes_per_token = 1'000'000;  // 1 MB a token at 1 GB/s: 1 ms a token
  o.migration_gbps = 1.0;
  o.migration_fixed_ms = 5.0;
  o.live_migration = false;  // blocking: live, these short requests would end before they move
  const SimResult r = simulate(items, constant_model(10.0, 2.0), o);
  for (size_t i = 0; i < items.size(); ++i) {
    const RequestRecord& rec = r.records[i];
    ASSERT_TRUE(rec.complete) << i;
    EXPECT_EQ(rec.output_tokens, 10);
    ASSERT_EQ(rec.workers, (std::vector<std::string>{"sim-0", "sim-1"})) << i;
    // Between the first token and the second: the hand-off (5 ms + the prompt's latents at
    // 1 ms a token) and the decode group's first step (2 ms).
    const double prompt = 100.0 + 50.0 * static_cast<double>(i);
    EXPECT_NEAR(rec.itl_ms.front(), 5.0 + prompt + 2.0, 1e-6) << i;
  }

  // With no decode group to take them (it died at the start) the requests decode where they
  // prefilled.
  o.failures = {{1, 0.0}};
  const SimResult stayed = simulate(items, constant_model(10.0, 2.0), o);
  for (const RequestRecord& rec : stayed.records) {
    EXPECT_TRUE(rec.complete);
    EXPECT_EQ(rec.workers, (std::vector<std::string>{"sim-0"}));
  }
  o.failures.clear();

  o.latent_bytes_per_token = 0;
  EXPECT_THROW(simulate(items, constant_model(10.0, 2.0), o), Error);
}

// Two groups, `concurrency` clients, group 0 drained at 40 ms; a migration takes 5 ms plus 1 ms
// a computed token (1 MB a token at 1 GB/s).
SimOptions draining_group_0(int32_t concurrency) {
  SimOptions o;
  o.groups = 2;
  o.max_concurrency = concurrency;
  o.drains = {{0, 0.040}};
  o.latent_bytes_per_token = 1'000'000;
  o.migration_gbps = 1.0;
  o.migration_fixed_ms = 5.0;
  return o;
}

// A group drained mid-run takes no new request from then on, and every request it held
// moves with its cache to the other group when its step ends: nothing is recomputed (the
// migration takes 5 ms + 1 ms a computed token here) and every token comes once.
TEST(Simulator, ADrainedGroupsRequestsMigrateWithTheirCaches) {
  std::vector<WorkItem> items = same_items(8, 50, 40);
  for (size_t i = 4; i < items.size(); ++i) items[i].arrival_s = 0.2;  // after the drain
  SimOptions o = draining_group_0(8);
  o.live_migration = false;  // the blocking stop-and-copy (the next test: live)
  const SimResult r = simulate(items, constant_model(10.0, 2.0), o);
  EXPECT_EQ(r.migrations, 2) << "least-loaded put two of the first four on group 0";
  EXPECT_EQ(r.rebalances, 0);
  int moved = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const RequestRecord& rec = r.records[i];
    ASSERT_TRUE(rec.complete) << i;
    EXPECT_EQ(rec.output_tokens, 40) << i;
    EXPECT_EQ(rec.workers.back(), "sim-1") << i;
    if (rec.workers.size() == 2) {
      ++moved;
      // The longest gap is the migration: its fixed part, the latents of the 50 + ~14
      // computed tokens, the target's step.
      const double gap = *std::max_element(rec.itl_ms.begin(), rec.itl_ms.end());
      EXPECT_GT(gap, 5.0 + 50.0) << i;
      EXPECT_LT(gap, 5.0 + 80.0 + 2.0 * 4) << i;
    }
  }
  EXPECT_EQ(moved, 2);

  o.latent_bytes_per_token = 0;
  EXPECT_THROW(simulate(items, constant_model(10.0, 2.0), o), Error);
}

// Live migration (the coordinator's): a drained group's requests keep streaming from it while
// their caches are copied (64 MB at 1 GB/s), stop at a step boundary, and resume on the other
// group after the fixed part and the tail they computed meanwhile, so the stream's gap is far
// shorter than the blocking copy's; a source that dies mid-copy fails its requests over; a
// request that ends during its pre-copy just ends there.
TEST(Simulator, ALiveMigrationKeepsStreamingFromTheSourceUntilItsLastStage) {
  std::vector<WorkItem> items = same_items(4, 50, 200);
  SimOptions o = draining_group_0(4);
  const SimResult live = simulate(items, constant_model(10.0, 2.0), o);
  o.live_migration = false;
  const SimResult blocking = simulate(items, constant_model(10.0, 2.0), o);
  EXPECT_EQ(live.migrations, 2);
  EXPECT_EQ(blocking.migrations, 2);
  for (size_t i = 0; i < items.size(); ++i) {
    for (const SimResult* r : {&live, &blocking}) {
      const RequestRecord& rec = r->records[i];
      ASSERT_TRUE(rec.complete) << i;
      EXPECT_EQ(rec.output_tokens, 200) << i;
    }
    const RequestRecord& rec = live.records[i];
    if (rec.workers.size() < 2) continue;
    EXPECT_EQ(rec.workers, (std::vector<std::string>{"sim-0", "sim-1"}));
    const double gap = *std::max_element(rec.itl_ms.begin(), rec.itl_ms.end());
    const double blocking_gap =
        *std::max_element(blocking.records[i].itl_ms.begin(), blocking.records[i].itl_ms.end());
    // Live: 5 ms + the ~32 tokens computed during the 64 ms pre-copy (32 ms) + a step or two;
    // blocking: 5 ms + all ~64 tokens' 64 ms + a step.
    EXPECT_GT(gap, 5.0 + 20.0) << i;
    EXPECT_LT(gap, 5.0 + 45.0) << i;
    EXPECT_GT(blocking_gap, 5.0 + 60.0) << i;
    // It streamed from the source during the pre-copy: ~30 tokens between the drain (40 ms)
    // and the gap.
    const auto at_gap = static_cast<size_t>(std::max_element(rec.itl_ms.begin(), rec.itl_ms.end()) -
                                            rec.itl_ms.begin());
    const auto after_drain =
        std::count_if(rec.token_s.begin(), rec.token_s.begin() + static_cast<long>(at_gap) + 1,
                      [](double t) { return t > 0.041; });
    EXPECT_GT(after_drain, 20) << i;
  }

  // The source dies mid-copy (at 60 ms): the pre-copies end with it, the requests fail over
  // with what they streamed, and every token still comes once.
  o.live_migration = true;
  o.failures = {{0, 0.060}};
  const SimResult failed = simulate(items, constant_model(10.0, 2.0), o);
  EXPECT_EQ(failed.migrations, 0);
  for (const RequestRecord& rec : failed.records) {
    EXPECT_TRUE(rec.complete);
    EXPECT_EQ(rec.output_tokens, 200);
    EXPECT_EQ(rec.workers.back(), "sim-1");
  }
  o.failures.clear();

  // Short requests end during their pre-copy: nothing moves, nothing is lost.
  for (WorkItem& w : items) w.output_len = 20;
  const SimResult ended = simulate(items, constant_model(10.0, 2.0), o);
  EXPECT_EQ(ended.migrations, 0);
  for (const RequestRecord& rec : ended.records) {
    EXPECT_TRUE(rec.complete);
    EXPECT_EQ(rec.output_tokens, 20);
  }
}

// Rebalancing: least-loaded alternates the groups, so the two long requests land on group 0,
// whose cache holds one of them (16 pages of 16 tokens; each grows to 14 pages) and preempts,
// while group 1's short requests end at once. At a heartbeat the coordinator's policy sees
// group 0 short of cache and moves a long request to group 1: fewer preemptions, done sooner.
TEST(Simulator, RebalancingMovesARequestOffAGroupShortOfCache) {
  std::vector<WorkItem> items(4);
  for (size_t i = 0; i < items.size(); ++i) {
    const bool long_one = i % 2 == 0;
    items[i].prompt_ids.assign(long_one ? 64 : 16, 1);
    items[i].output_len = long_one ? 150 : 2;
    items[i].arrival_s = 0.0;
  }
  SimOptions o;
  o.groups = 2;
  o.num_pages = 16;
  o.block_size = 16;
  o.latent_bytes_per_token = 1000;
  const SimResult stuck = simulate(items, constant_model(10.0, 2.0), o);
  o.rebalance = true;
  o.heartbeat_ms = 20;
  o.rebalance_interval_ms = 100;
  const SimResult moved = simulate(items, constant_model(10.0, 2.0), o);
  for (const SimResult* r : {&stuck, &moved}) {
    for (const RequestRecord& rec : r->records) {
      EXPECT_TRUE(rec.complete);
      EXPECT_EQ(rec.output_tokens, rec.output_tokens > 2 ? 150 : 2) << "every token once";
    }
  }
  EXPECT_EQ(stuck.rebalances, 0);
  EXPECT_GT(stuck.preemptions, 0);
  EXPECT_EQ(moved.rebalances, 1) << "the other long request then fits group 0";
  EXPECT_EQ(moved.migrations, 1);
  EXPECT_LT(moved.preemptions, stuck.preemptions);
  EXPECT_LT(moved.duration_s, stuck.duration_s);
  int on_both = 0;
  for (const RequestRecord& rec : moved.records) {
    on_both += rec.workers == std::vector<std::string>{"sim-0", "sim-1"};
  }
  EXPECT_EQ(on_both, 1);

  o.rebalance_thresholds.low_free = 0.5;
  o.rebalance_thresholds.high_free = 0.4;
  EXPECT_THROW(simulate(items, constant_model(10.0, 2.0), o), Error);
}

}  // namespace
}  // namespace mla::bench
