// Routing: which worker group a new request goes to (docs/ARCHITECTURE.md section 8).
//
// Pure logic over a snapshot of the workers (WorkerView), so the coordinator can test it
// without a network. Four policies:
// - least-loaded: the lowest load score, where the score is the queue depth (requests the
//   worker reports waiting plus requests the coordinator has routed there and not seen
//   finish) plus page pressure (1 - free page fraction) weighted by
//   RouterOptions::page_weight. Ties go to the smallest id, so the choice is deterministic.
// - round-robin: the routable workers in id order, one after the other.
// - prefix-affinity: the first block of the prompt (RouterOptions::affinity_block tokens, or
//   the whole prompt when shorter) is hashed; a prompt whose key was routed before goes to
//   the same worker, which may still hold those pages, unless that worker is no longer
//   routable or is overloaded; otherwise least-loaded, and the new choice is remembered.
//   Assignments live in an LRU map of RouterOptions::affinity_capacity keys.
// - cache-aware: for workers with prefix caching. A new prompt's cost on a worker is its load
//   score plus RouterOptions::cache_weight for every full page (affinity_block tokens) of the
//   prompt that the worker is not known to hold from the start (the prefill it must do); the
//   cheapest routable worker wins (then the one holding more, then by id). What a worker
//   holds: the units it reported keeping in its last heartbeat (WorkerView::cached_units, the
//   leading units of the prompt found there), extended by the pages of prompts the router sent
//   there since that report (which the worker cannot have listed yet: on a GPU a heartbeat
//   interval sees many requests of one prefix, and without this each would look uncached and
//   spread over the workers), when it reports them; otherwise the router's own record of the
//   pages (keyed by a hash chained over the prompt so far) of the prompts it sent there, an
//   estimate that cannot see evictions (LRU, at most affinity_capacity (page, worker) entries,
//   kept for every pick, with the worker's units_epoch at the pick).
// A worker with routable == false (dead, draining, or excluded by the caller, e.g. after a
// failover) is never picked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "runtime/routing_policy.h"

namespace mla {

// One worker as the router sees it; a snapshot taken by the caller.
struct WorkerView {
  std::string id;
  bool routable = true;     // alive and accepting new requests
  int32_t free_pages = 0;   // latent cache pages free, as last heartbeated
  int32_t total_pages = 0;  // 0: unknown (the page term then counts as half full)
  int32_t running = 0;      // sequences the worker is running, as last heartbeated
  int32_t waiting = 0;      // sequences queued on the worker, as last heartbeated
  int32_t in_flight = 0;    // requests the coordinator routed there and not seen finish
  // The keys of the prefix units the worker reported keeping (WorkerLoad.cached_units), each
  // of unit_tokens tokens; null when it reports none (no prefix caching, or not yet).
  std::shared_ptr<const std::unordered_set<uint64_t>> cached_units;
  int32_t unit_tokens = 0;
  // Changes with every report of cached_units (the caller counts them): pages routed there
  // under the current value were sent after the report.
  uint64_t units_epoch = 0;

  int32_t queue_depth() const { return waiting + in_flight; }
  double free_fraction() const;
};

struct RouterOptions {
  RoutingPolicy policy = RoutingPolicy::kLeastLoaded;  // Default: least-loaded.
  // A full cache ranks like this many extra queued requests. Default: 4.
  double page_weight = 4.0;
  // Prefix-affinity key length in tokens (the cache block size). Default: 64.
  int32_t affinity_block = 64;
  // Prefix keys remembered (LRU). Default: 65536.
  size_t affinity_capacity = 65536;
  // The remembered worker is overloaded, and skipped, when its cache is full or its queue
  // depth exceeds the least-loaded worker's by more than this. Default: 4.
  int32_t affinity_slack = 4;
  // cache-aware: what one prompt page the worker must compute costs, in queued requests (a
  // full cache costs page_weight). Default: 0.25.
  double cache_weight = 0.25;
};

// Load score used by least-loaded; lower is better.
double load_score(const WorkerView& w, double page_weight);

// Thread-safe: pick() and forget() may be called concurrently (one internal mutex).
class Router {
 public:
  // Throws mla::Error(kInvalidArgument) on a non-positive affinity_block or capacity or a
  // negative page_weight or slack.
  explicit Router(RouterOptions options = {});

  // The id of the worker to route `prompt` to, or nullopt when no worker is routable.
  std::optional<std::string> pick(const std::vector<WorkerView>& workers,
                                  const std::vector<int32_t>& prompt);
  // Drops every prefix assignment to `worker_id` (it died, and its cache with it).
  void forget(const std::string& worker_id);

  const RouterOptions& options() const { return options_; }
  // Prefix keys currently remembered.
  size_t affinity_size() const;

 private:
  struct Assignment {
    uint64_t key;
    std::string worker_id;
    uint64_t epoch;  // cache-aware: the worker's units_epoch when it was picked
  };
  using Lru = std::list<Assignment>;  // front = most recent

  uint64_t prefix_key(const std::vector<int32_t>& prompt) const;
  std::optional<std::string> pick_cache_aware(const std::vector<WorkerView>& workers,
                                              const std::vector<int32_t>& prompt);
  void remember(uint64_t key, const std::string& worker_id, uint64_t epoch = 0);

  RouterOptions options_;
  mutable std::mutex mu_;
  std::string last_round_robin_;  // id of the last round-robin pick
  // prefix-affinity: first-block key -> worker; cache-aware: (page key, worker) pair keys.
  Lru lru_;
  std::unordered_map<uint64_t, Lru::iterator> affinity_;
};

// The least-loaded routable worker (by load_score, then id), or nullptr when none.
const WorkerView* least_loaded(const std::vector<WorkerView>& workers, double page_weight);

}  // namespace mla
