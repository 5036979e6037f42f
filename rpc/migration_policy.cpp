#include "rpc/migration_policy.h"

#include <algorithm>

namespace mla {

int migration_target(const std::vector<MigrationPeer>& peers) {
  int best = -1;
  auto better = [](const MigrationPeer& w, const MigrationPeer& than) {
    if (w.decode != than.decode) return w.decode;
    if (w.free_pages != than.free_pages) return w.free_pages > than.free_pages;
    return w.in_flight < than.in_flight;
  };
  for (size_t i = 0; i < peers.size(); ++i) {
    if (!peers[i].eligible) continue;
    if (best < 0 || better(peers[i], peers[static_cast<size_t>(best)])) {
      best = static_cast<int>(i);
    }
  }
  return best;
}

bool short_of_cache(int32_t free_pages, int32_t total_pages, int64_t preempted,
                    const RebalanceThresholds& thresholds) {
  if (total_pages <= 0) return false;
  return free_pages < thresholds.low_free * total_pages || preempted > 0;
}

int rebalance_choice(const std::vector<MovableRequest>& requests, const MigrationPeer& target,
                     int32_t block_size, const RebalanceThresholds& thresholds) {
  if (target.free_pages < thresholds.high_free * target.total_pages) return -1;
  const int32_t block = std::max(1, block_size);
  int chosen = -1;
  int32_t chosen_final = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const MovableRequest& r = requests[i];
    if (r.tokens_left < block) continue;
    if (chosen < 0 || r.context_tokens + r.tokens_left > chosen_final) {
      chosen = static_cast<int>(i);
      chosen_final = r.context_tokens + r.tokens_left;
    }
  }
  if (chosen < 0 || (chosen_final + block - 1) / block > target.free_pages) return -1;
  return chosen;
}

}  // namespace mla
