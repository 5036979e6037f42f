// The coordinator's migration policy (rpc/migration_policy.h), which `mlaserve simulate` shares:
// the target order (decode groups, free pages, requests in flight, first), which groups are
// short of cache, and which request rebalancing moves.
#include <gtest/gtest.h>

#include "rpc/migration_policy.h"

namespace mla {
namespace {

TEST(MigrationTarget, PrefersDecodeGroupsThenFreePagesThenFewerInFlight) {
  std::vector<MigrationPeer> peers = {
      {"a", true, false, 50, 100, 0},
      {"b", true, false, 80, 100, 5},
      {"c", true, false, 80, 100, 2},
      {"d", false, true, 100, 100, 0},  // not eligible (draining, dead, or the source)
  };
  EXPECT_EQ(migration_target(peers), 2) << "most free pages, then fewer in flight";
  peers[0].decode = true;
  EXPECT_EQ(migration_target(peers), 0) << "a decode group before any other";
  peers[0].eligible = false;
  peers[1].in_flight = 2;
  EXPECT_EQ(migration_target(peers), 1) << "a full tie goes to the first";
  for (MigrationPeer& p : peers) p.eligible = false;
  EXPECT_EQ(migration_target(peers), -1);
  EXPECT_EQ(migration_target({}), -1);
}

TEST(ShortOfCache, FewFreePagesOrAPreemption) {
  const RebalanceThresholds t{0.1, 0.3};
  EXPECT_TRUE(short_of_cache(9, 100, 0, t));
  EXPECT_FALSE(short_of_cache(10, 100, 0, t));
  EXPECT_TRUE(short_of_cache(90, 100, 1, t));
  EXPECT_FALSE(short_of_cache(0, 0, 5, t)) << "unknown size: no opinion";
}

TEST(RebalanceChoice, TheRequestThatWillHoldTheMostPagesIfTheTargetHasRoom) {
  const RebalanceThresholds t{0.1, 0.3};
  const MigrationPeer target{"t", true, false, 40, 100, 0};
  const std::vector<MovableRequest> running = {
      {100, 100},  // ends at 200 tokens: 4 pages of 64
      {500, 20},   // the largest now, but about to end: less than a page left
      {300, 200},  // ends at 500: 8 pages
  };
  EXPECT_EQ(rebalance_choice(running, target, 64, t), 2);
  EXPECT_EQ(rebalance_choice({running[0], running[1]}, target, 64, t), 0);
  EXPECT_EQ(rebalance_choice({running[1]}, target, 64, t), -1) << "nothing worth moving";
  MigrationPeer small = target;
  small.free_pages = 29;
  EXPECT_EQ(rebalance_choice(running, small, 64, t), -1) << "below high_free";
  small.total_pages = 30;
  small.free_pages = 9;
  EXPECT_EQ(rebalance_choice(running, small, 16, t), -1) << "its 32 pages do not fit";
  EXPECT_EQ(rebalance_choice({}, target, 64, t), -1);
}

}  // namespace
}  // namespace mla
