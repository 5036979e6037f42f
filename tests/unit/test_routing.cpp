// Routing policies (rpc/routing.h), table-driven: one snapshot of workers per case.
#include <gtest/gtest.h>

#include <map>
#include <numeric>

#include "kernels/error.h"
#include "rpc/routing.h"
#include "runtime/prefix_index.h"

namespace mla {
namespace {

WorkerView worker(std::string id, int32_t free_pages, int32_t total_pages, int32_t waiting,
                  int32_t in_flight, bool routable = true) {
  return {.id = std::move(id),
          .routable = routable,
          .free_pages = free_pages,
          .total_pages = total_pages,
          .running = 0,
          .waiting = waiting,
          .in_flight = in_flight};
}

std::vector<int32_t> prompt_of(int32_t first, int32_t length) {
  std::vector<int32_t> p(length);
  std::iota(p.begin(), p.end(), first);
  return p;
}

TEST(Routing, PolicyFromString) {
  EXPECT_EQ(routing_policy_from_string("least-loaded"), RoutingPolicy::kLeastLoaded);
  EXPECT_EQ(routing_policy_from_string("round-robin"), RoutingPolicy::kRoundRobin);
  EXPECT_EQ(routing_policy_from_string("prefix-affinity"), RoutingPolicy::kPrefixAffinity);
  EXPECT_EQ(routing_policy_from_string("cache-aware"), RoutingPolicy::kCacheAware);
  for (const char* bad : {"", "random", "Least-Loaded", "least_loaded"}) {
    try {
      routing_policy_from_string(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("least-loaded"), std::string::npos) << e.what();
    }
  }
  for (RoutingPolicy p : {RoutingPolicy::kLeastLoaded, RoutingPolicy::kRoundRobin,
                          RoutingPolicy::kPrefixAffinity, RoutingPolicy::kCacheAware}) {
    EXPECT_EQ(routing_policy_from_string(routing_policy_name(p)), p);
  }
}

TEST(Routing, RejectsBadOptions) {
  EXPECT_THROW(Router(RouterOptions{.affinity_block = 0}), Error);
  EXPECT_THROW(Router(RouterOptions{.affinity_capacity = 0}), Error);
  EXPECT_THROW(Router(RouterOptions{.page_weight = -1}), Error);
  EXPECT_THROW(Router(RouterOptions{.affinity_slack = -1}), Error);
  EXPECT_THROW(Router(RouterOptions{.cache_weight = -1}), Error);
}

// cache-aware: a prompt goes where the longest run of its leading pages was sent before,
// unless the load there outweighs the pages it would not have to compute; a prompt that
// diverges after a shared prefix still goes where that prefix is (prefix-affinity hashes only
// the first block); a forgotten worker holds nothing.
TEST(Routing, CacheAwareWeighsCachedPagesAgainstLoad) {
  Router router(RouterOptions{
      .policy = RoutingPolicy::kCacheAware, .affinity_block = 4, .cache_weight = 0.5});
  std::vector<WorkerView> ws = {worker("a", 100, 100, 0, 0), worker("b", 100, 100, 0, 0)};
  std::vector<int32_t> system = prompt_of(0, 16);  // 4 pages
  EXPECT_EQ(router.pick(ws, system), "a");         // a tie: by id
  // b is lighter by one queued request, but a holds all 4 pages (2 requests' worth).
  ws[0].in_flight = 1;
  std::vector<int32_t> turn2 = system;
  for (int32_t t : {90, 91, 92, 93, 94}) turn2.push_back(t);
  EXPECT_EQ(router.pick(ws, turn2), "a");
  // A prompt sharing only the first page of it: a holds 1 page (0.5), b is 1 request lighter.
  std::vector<int32_t> other = prompt_of(0, 4);
  for (int32_t t = 200; t < 212; ++t) other.push_back(t);
  EXPECT_EQ(router.pick(ws, other), "b");
  // turn2's pages (5 full pages now remembered on a) against a queue 3 deeper on a: b.
  ws[0].in_flight = 4;
  EXPECT_EQ(router.pick(ws, turn2), "b");
  router.forget("a");
  router.forget("b");
  ws[0].in_flight = 0;
  EXPECT_EQ(router.pick(ws, turn2), "a") << "nothing remembered: the tie goes by id";
}

// cache-aware with workers that report the prefix units they keep: what they report counts,
// not what the router sent them (which they may have evicted), in units of any size (here 8
// tokens, a TP2 group's two pages of 4).
TEST(Routing, CacheAwareBelievesTheUnitsWorkersReport) {
  Router router(RouterOptions{
      .policy = RoutingPolicy::kCacheAware, .affinity_block = 4, .cache_weight = 0.5});
  std::vector<WorkerView> ws = {worker("a", 100, 100, 0, 0), worker("b", 100, 100, 0, 0)};
  const std::vector<int32_t> system = prompt_of(0, 16);  // 2 units of 8, 4 pages of 4
  const std::vector<uint64_t> units = prefix_unit_keys(system, 8);
  ASSERT_EQ(units.size(), 2u);
  // A heartbeat's report: the units kept, and a new epoch.
  auto report = [](WorkerView& w, std::vector<uint64_t> keys) {
    w.cached_units = std::make_shared<const std::unordered_set<uint64_t>>(keys.begin(), keys.end());
    ++w.units_epoch;
  };
  for (WorkerView& w : ws) w.unit_tokens = 8;
  report(ws[0], {});
  report(ws[1], units);
  ws[1].in_flight = 1;  // 1 request deeper, but it keeps 4 pages (2 requests' worth)
  EXPECT_EQ(router.pick(ws, system), "b");
  // Only the first unit reported: 2 pages (1 request's worth) against 1 request, a tie in
  // cost, which goes to the worker holding more.
  report(ws[1], {units[0]});
  EXPECT_EQ(router.pick(ws, system), "b");
  // Its next heartbeat: still only the first unit (the pick above counts no longer), and 2 deep.
  report(ws[1], {units[0]});
  ws[1].in_flight = 2;
  EXPECT_EQ(router.pick(ws, system), "a");
  // The second unit without the first is no prefix (and a's next heartbeat keeps nothing).
  report(ws[0], {});
  report(ws[1], {units[1]});
  ws[1].in_flight = 0;
  ws[0].in_flight = 1;
  EXPECT_EQ(router.pick(ws, system), "b") << "lighter";
  // The router sent `system` to a before, but a reports nothing kept: it holds nothing.
  ws[0].in_flight = 0;
  ws[1].in_flight = 1;
  report(ws[1], units);
  EXPECT_EQ(router.pick(ws, system), "b");
  report(ws[1], {});
  EXPECT_EQ(router.pick(ws, system), "a");
}

// cache-aware with reports: what the router sent a worker since its last report counts as held
// (the report cannot list it yet), until the next report says otherwise.
TEST(Routing, CacheAwareCountsWhatItSentSinceTheLastReport) {
  Router router(RouterOptions{
      .policy = RoutingPolicy::kCacheAware, .affinity_block = 4, .cache_weight = 0.5});
  std::vector<WorkerView> ws = {worker("a", 100, 100, 0, 0), worker("b", 100, 100, 0, 0)};
  const std::vector<int32_t> system = prompt_of(0, 16);  // 4 pages: 2 requests' worth
  for (WorkerView& w : ws) {
    w.unit_tokens = 8;
    w.cached_units = std::make_shared<const std::unordered_set<uint64_t>>();
    w.units_epoch = 1;
  }
  EXPECT_EQ(router.pick(ws, system), "a");  // a tie: by id
  ws[0].in_flight = 1;
  EXPECT_EQ(router.pick(ws, system), "a") << "sent to a since its report";
  std::vector<int32_t> longer = system;
  for (int32_t t = 100; t < 108; ++t) longer.push_back(t);
  ws[0].in_flight = 2;  // 2 deeper, but holds 4 of the 6 pages since the report
  EXPECT_EQ(router.pick(ws, longer), "a");
  ws[0].units_epoch = 2;  // a's next heartbeat reports nothing kept
  EXPECT_EQ(router.pick(ws, system), "b");
}

struct LeastLoadedCase {
  const char* name;
  std::vector<WorkerView> workers;
  std::optional<std::string> expected;
};

TEST(Routing, LeastLoaded) {
  const std::vector<LeastLoadedCase> cases = {
      {"no workers", {}, std::nullopt},
      {"none routable",
       {worker("a", 10, 10, 0, 0, false), worker("b", 10, 10, 0, 0, false)},
       std::nullopt},
      {"tie goes to the smallest id", {worker("b", 5, 10, 1, 1), worker("a", 5, 10, 1, 1)}, "a"},
      {"more free pages", {worker("a", 1, 10, 0, 0), worker("b", 9, 10, 0, 0)}, "b"},
      {"free fraction, not count", {worker("a", 50, 1000, 0, 0), worker("b", 9, 10, 0, 0)}, "b"},
      {"shorter queue", {worker("a", 10, 10, 3, 0), worker("b", 10, 10, 1, 1)}, "b"},
      {"in flight counts as queue", {worker("a", 10, 10, 0, 5), worker("b", 10, 10, 0, 2)}, "b"},
      // a: 2 queued + full cache (4) = 6; b: 4 queued + empty cache = 4.
      {"full cache weighs like 4 queued",
       {worker("a", 0, 10, 2, 0), worker("b", 10, 10, 3, 1)},
       "b"},
      {"skips non-routable even if idle",
       {worker("a", 10, 10, 0, 0, false), worker("b", 0, 10, 9, 9)},
       "b"},
      {"unknown page count ranks as half full",
       {worker("a", 0, 0, 0, 0), worker("b", 4, 10, 0, 0)},
       "a"},
  };
  for (const auto& c : cases) {
    Router router({.policy = RoutingPolicy::kLeastLoaded});
    EXPECT_EQ(router.pick(c.workers, {1, 2, 3}), c.expected) << c.name;
  }
}

TEST(Routing, RoundRobinCyclesInIdOrderAndSkipsUnroutable) {
  Router router({.policy = RoutingPolicy::kRoundRobin});
  std::vector<WorkerView> workers = {worker("c", 1, 10, 0, 0), worker("a", 1, 10, 0, 0),
                                     worker("b", 1, 10, 9, 9)};
  std::vector<std::string> picks;
  for (int i = 0; i < 6; ++i) picks.push_back(*router.pick(workers, {1}));
  EXPECT_EQ(picks, (std::vector<std::string>{"a", "b", "c", "a", "b", "c"}));

  workers[2].routable = false;  // b
  picks.clear();
  for (int i = 0; i < 4; ++i) picks.push_back(*router.pick(workers, {1}));
  EXPECT_EQ(picks, (std::vector<std::string>{"a", "c", "a", "c"}));

  // A worker joins between a and c: the rotation goes on from the last pick (c).
  workers.push_back(worker("bb", 1, 10, 0, 0));
  picks.clear();
  for (int i = 0; i < 4; ++i) picks.push_back(*router.pick(workers, {1}));
  EXPECT_EQ(picks, (std::vector<std::string>{"a", "bb", "c", "a"}));

  for (auto& w : workers) w.routable = false;
  EXPECT_EQ(router.pick(workers, {1}), std::nullopt);
}

struct AffinityStep {
  const char* name;
  std::vector<int32_t> prompt;
  std::vector<WorkerView> workers;
  std::string expected;
};

TEST(Routing, PrefixAffinity) {
  Router router(
      {.policy = RoutingPolicy::kPrefixAffinity, .affinity_block = 4, .affinity_slack = 2});
  const auto idle = [](std::string id) { return worker(std::move(id), 10, 10, 0, 0); };
  // Steps run in order against one router: later ones see earlier assignments.
  const std::vector<AffinityStep> steps = {
      {"new prefix: least loaded", {1, 2, 3, 4, 5}, {worker("a", 10, 10, 1, 0), idle("b")}, "b"},
      {"same first block, other tail: stays",
       {1, 2, 3, 4, 99},
       {idle("a"), worker("b", 10, 10, 1, 1)},
       "b"},
      {"other first block: least loaded",
       {7, 2, 3, 4, 5},
       {idle("a"), worker("b", 10, 10, 1, 0)},
       "a"},
      {"short prompt is its own key", {1, 2}, {worker("a", 10, 10, 1, 0), idle("b")}, "b"},
      {"short prompt remembered", {1, 2}, {idle("a"), worker("b", 10, 10, 2, 0)}, "b"},
      {"owner over the slack: least loaded",
       {1, 2, 3, 4},
       {idle("a"), worker("b", 10, 10, 3, 0)},
       "a"},
      {"reassigned to the new owner", {1, 2, 3, 4}, {worker("a", 10, 10, 2, 0), idle("b")}, "a"},
      {"owner with a full cache: least loaded",
       {1, 2, 3, 4},
       {worker("a", 0, 10, 0, 0), worker("b", 5, 10, 0, 0)},
       "b"},
      {"owner not routable: least loaded",
       {1, 2, 3, 4},
       {idle("a"), worker("b", 10, 10, 0, 0, false)},
       "a"},
      {"owner gone from the list: least loaded", {7, 2, 3, 4}, {idle("b"), idle("c")}, "b"},
  };
  for (const auto& s : steps) {
    EXPECT_EQ(router.pick(s.workers, s.prompt), s.expected) << s.name;
  }
  EXPECT_EQ(router.pick({worker("a", 1, 1, 0, 0, false)}, {1, 2, 3, 4}), std::nullopt);
}

TEST(Routing, PrefixAffinityLruIsBoundedAndForgets) {
  Router router({.policy = RoutingPolicy::kPrefixAffinity,
                 .affinity_block = 2,
                 .affinity_capacity = 3,
                 .affinity_slack = 100});
  std::vector<WorkerView> workers = {worker("a", 10, 10, 0, 0), worker("b", 10, 10, 0, 0)};
  // Keys 0..2 go to a (least loaded); the router remembers them.
  for (int k = 0; k < 3; ++k) EXPECT_EQ(router.pick(workers, prompt_of(10 * k, 2)), "a");
  EXPECT_EQ(router.affinity_size(), 3u);
  // Touch key 0 so key 1 is the least recently used, then add key 3 (to b): key 1 goes.
  workers[0].in_flight = 5;
  EXPECT_EQ(router.pick(workers, prompt_of(0, 2)), "a");
  EXPECT_EQ(router.pick(workers, prompt_of(30, 2)), "b");
  EXPECT_EQ(router.affinity_size(), 3u);
  workers[0].in_flight = 0;
  workers[1].in_flight = 5;
  EXPECT_EQ(router.pick(workers, prompt_of(0, 2)), "a");   // remembered
  EXPECT_EQ(router.pick(workers, prompt_of(30, 2)), "b");  // remembered, within slack
  EXPECT_EQ(router.pick(workers, prompt_of(20, 2)), "a");  // remembered
  workers[0].in_flight = 9;
  workers[1].in_flight = 0;
  EXPECT_EQ(router.pick(workers, prompt_of(10, 2)), "b");  // forgotten: least loaded now

  router.forget("b");
  EXPECT_EQ(router.affinity_size(), 1u);  // only key 20 -> a is left (key 0 was evicted)
  workers[0].in_flight = 0;
  workers[1].in_flight = 1;
  EXPECT_EQ(router.pick(workers, prompt_of(30, 2)), "a");
}

TEST(Routing, LoadScore) {
  const WorkerView w = worker("a", 5, 10, 2, 3);
  EXPECT_DOUBLE_EQ(w.free_fraction(), 0.5);
  EXPECT_DOUBLE_EQ(load_score(w, 4.0), 5 + 2.0);
  EXPECT_DOUBLE_EQ(load_score(w, 0.0), 5);
  const std::vector<WorkerView> ws = {worker("b", 0, 10, 0, 0), worker("a", 10, 10, 4, 0)};
  EXPECT_EQ(least_loaded(ws, 4.0)->id, "a");  // 4 == 4: tie to the smaller id
  EXPECT_EQ(least_loaded(ws, 1.0)->id, "b");
}

}  // namespace
}  // namespace mla
