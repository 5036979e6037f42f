// Migration policy: where a running request moves, and which request rebalancing moves
// (docs/ARCHITECTURE.md section 8). Pure logic over snapshots, like rpc/routing.h, so the
// coordinator (admin Migrate without a target, drain, rebalancing, prefill -> decode hand-off)
// and `mlaserve simulate` make the same decisions. Stateless; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mla {

// A worker group as a migration target sees it; a snapshot taken by the caller.
struct MigrationPeer {
  std::string id;
  // It may take the request: alive, not draining, not the source, not a prefill-only group.
  bool eligible = true;
  bool decode = false;      // a decode-role group (preferred: that is what it is for)
  int32_t free_pages = 0;   // latent cache pages free, as last heartbeated
  int32_t total_pages = 0;  // 0: unknown
  int32_t in_flight = 0;    // requests the coordinator routed there and not seen finish
};

// The index of the target for a request leaving its worker: decode groups first, then the
// most free pages, then the fewest requests in flight, then the first in `peers`; -1 when no
// peer is eligible. Whether the target has room for the request is its own check (it refuses
// before any copy).
int migration_target(const std::vector<MigrationPeer>& peers);

// CoordinatorOptions' rebalancing thresholds, as fractions of a worker's pages.
struct RebalanceThresholds {
  double low_free = 0.1;   // a worker with fewer free is short of cache
  double high_free = 0.3;  // a target needs at least this many free
};

// A request running on a worker short of cache, as the coordinator knows it.
struct MovableRequest {
  int32_t context_tokens = 0;  // prompt plus the tokens streamed so far
  int32_t tokens_left = 0;     // tokens it may still generate (up to max_tokens)
};

// Whether a worker's heartbeat shows cache pressure: fewer than thresholds.low_free of its
// pages free, or a preemption since its previous heartbeat (`preempted` > 0). False when
// total_pages is unknown (<= 0).
bool short_of_cache(int32_t free_pages, int32_t total_pages, int64_t preempted,
                    const RebalanceThresholds& thresholds);

// Which of `requests` rebalancing moves from a worker short of cache to `target` (pages of
// `block_size` tokens): the one that will hold the most pages until it ends (context plus the
// tokens it may still generate), unless it has less than a page left to generate (it is about
// to end and free its pages anyway). -1 when the target has fewer than thresholds.high_free of
// its pages free, when no request qualifies, or when the chosen one's final size does not fit
// the target's free pages.
int rebalance_choice(const std::vector<MovableRequest>& requests, const MigrationPeer& target,
                     int32_t block_size, const RebalanceThresholds& thresholds);

}  // namespace mla
