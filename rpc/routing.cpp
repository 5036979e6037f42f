#include "rpc/routing.h"

#include <algorithm>
#include <functional>

#include "kernels/error.h"
#include "runtime/prefix_index.h"
#include "runtime/splitmix.h"

namespace mla {

double WorkerView::free_fraction() const {
  if (total_pages <= 0) return 0.5;
  return std::clamp(static_cast<double>(free_pages) / total_pages, 0.0, 1.0);
}

double load_score(const WorkerView& w, double page_weight) {
  return w.queue_depth() + page_weight * (1.0 - w.free_fraction());
}

const WorkerView* least_loaded(const std::vector<WorkerView>& workers, double page_weight) {
  const WorkerView* best = nullptr;
  double best_score = 0;
  for (const WorkerView& w : workers) {
    if (!w.routable) continue;
    const double score = load_score(w, page_weight);
    if (!best || score < best_score || (score == best_score && w.id < best->id)) {
      best = &w;
      best_score = score;
    }
  }
  return best;
}

Router::Router(RouterOptions options) : options_(options) {
  MLA_REQUIRE(options_.affinity_block > 0, "router: affinity_block must be > 0, got {}",
              options_.affinity_block);
  MLA_REQUIRE(options_.affinity_capacity > 0, "router: affinity_capacity must be > 0");
  MLA_REQUIRE(options_.page_weight >= 0, "router: page_weight must be >= 0, got {}",
              options_.page_weight);
  MLA_REQUIRE(options_.affinity_slack >= 0, "router: affinity_slack must be >= 0, got {}",
              options_.affinity_slack);
  MLA_REQUIRE(options_.cache_weight >= 0, "router: cache_weight must be >= 0, got {}",
              options_.cache_weight);
}

namespace {

// Keys of the prompt's full pages of `block` tokens, each chained over the ones before.
std::vector<uint64_t> page_keys(const std::vector<int32_t>& prompt, int32_t block) {
  std::vector<uint64_t> keys;
  uint64_t h = 0;
  for (size_t end = block; end <= prompt.size(); end += block) {
    for (size_t i = end - block; i < end; ++i) h = splitmix64(h ^ static_cast<uint32_t>(prompt[i]));
    keys.push_back(h);
  }
  return keys;
}

uint64_t pair_key(uint64_t page, const std::string& worker_id) {
  return splitmix64(page ^ std::hash<std::string>{}(worker_id));
}

}  // namespace

std::optional<std::string> Router::pick_cache_aware(const std::vector<WorkerView>& workers,
                                                    const std::vector<int32_t>& prompt) {
  const std::vector<uint64_t> keys = page_keys(prompt, options_.affinity_block);
  std::vector<std::pair<int32_t, std::vector<uint64_t>>> unit_keys;  // by unit size
  const WorkerView* best = nullptr;
  double best_cost = 0;
  size_t best_held = 0;
  for (const WorkerView& w : workers) {
    if (!w.routable) continue;
    size_t held = 0;
    if (w.cached_units && w.unit_tokens > 0) {
      // The leading units of the prompt the worker keeps, in pages of affinity_block.
      const std::vector<uint64_t>* units = nullptr;
      for (const auto& [size, k] : unit_keys) {
        if (size == w.unit_tokens) units = &k;
      }
      if (units == nullptr) {
        unit_keys.emplace_back(w.unit_tokens, prefix_unit_keys(prompt, w.unit_tokens));
        units = &unit_keys.back().second;
      }
      size_t units_held = 0;
      while (units_held < units->size() && w.cached_units->contains((*units)[units_held])) {
        ++units_held;
      }
      held = std::min(keys.size(), units_held * static_cast<size_t>(w.unit_tokens) /
                                       static_cast<size_t>(options_.affinity_block));
      // Pages sent there since the report: past what it reported, or from the start.
      const auto sent_since = [&](size_t page) {
        const auto it = affinity_.find(pair_key(keys[page], w.id));
        return it != affinity_.end() && it->second->epoch == w.units_epoch;
      };
      size_t recent = 0;
      while (recent < keys.size() && sent_since(recent)) ++recent;
      while (held < keys.size() && sent_since(held)) ++held;
      held = std::max(held, recent);
    } else {
      while (held < keys.size() && affinity_.count(pair_key(keys[held], w.id)) != 0) ++held;
    }
    const double cost = load_score(w, options_.page_weight) +
                        options_.cache_weight * static_cast<double>(keys.size() - held);
    if (!best || cost < best_cost ||
        (cost == best_cost && (held > best_held || (held == best_held && w.id < best->id)))) {
      best = &w;
      best_cost = cost;
      best_held = held;
    }
  }
  if (!best) return std::nullopt;
  // The first pages last, so they are the most recent (evicted last, like the worker's).
  for (auto it = keys.rbegin(); it != keys.rend(); ++it)
    remember(pair_key(*it, best->id), best->id, best->units_epoch);
  return best->id;
}

uint64_t Router::prefix_key(const std::vector<int32_t>& prompt) const {
  // FNV-1a over the first block's token ids.
  const size_t n = std::min(prompt.size(), static_cast<size_t>(options_.affinity_block));
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    auto v = static_cast<uint32_t>(prompt[i]);
    for (int b = 0; b < 4; ++b) {
      h ^= (v >> (8 * b)) & 0xff;
      h *= 1099511628211ull;
    }
  }
  return h;
}

void Router::remember(uint64_t key, const std::string& worker_id, uint64_t epoch) {
  if (auto it = affinity_.find(key); it != affinity_.end()) {
    it->second->worker_id = worker_id;
    it->second->epoch = epoch;
    lru_.splice(lru_.begin(), lru_, it->second);
    return;
  }
  lru_.push_front({key, worker_id, epoch});
  affinity_[key] = lru_.begin();
  if (lru_.size() > options_.affinity_capacity) {
    affinity_.erase(lru_.back().key);
    lru_.pop_back();
  }
}

std::optional<std::string> Router::pick(const std::vector<WorkerView>& workers,
                                        const std::vector<int32_t>& prompt) {
  std::lock_guard lock(mu_);
  switch (options_.policy) {
    case RoutingPolicy::kLeastLoaded: {
      const WorkerView* best = least_loaded(workers, options_.page_weight);
      if (!best) return std::nullopt;
      return best->id;
    }
    case RoutingPolicy::kRoundRobin: {
      // The next routable id after the last pick, in id order (wrapping round), so workers
      // joining or leaving do not reset the rotation.
      const WorkerView* first = nullptr;
      const WorkerView* next = nullptr;
      for (const WorkerView& w : workers) {
        if (!w.routable) continue;
        if (!first || w.id < first->id) first = &w;
        if (w.id > last_round_robin_ && (!next || w.id < next->id)) next = &w;
      }
      const WorkerView* chosen = next ? next : first;
      if (!chosen) return std::nullopt;
      last_round_robin_ = chosen->id;
      return chosen->id;
    }
    case RoutingPolicy::kPrefixAffinity: {
      const WorkerView* best = least_loaded(workers, options_.page_weight);
      if (!best) return std::nullopt;
      const uint64_t key = prefix_key(prompt);
      if (auto it = affinity_.find(key); it != affinity_.end()) {
        const std::string& owner = it->second->worker_id;
        auto w = std::find_if(workers.begin(), workers.end(),
                              [&](const WorkerView& v) { return v.id == owner; });
        const bool cache_full = w != workers.end() && w->total_pages > 0 && w->free_pages <= 0;
        if (w != workers.end() && w->routable && !cache_full &&
            w->queue_depth() <= best->queue_depth() + options_.affinity_slack) {
          lru_.splice(lru_.begin(), lru_, it->second);
          return owner;
        }
      }
      remember(key, best->id);
      return best->id;
    }
    case RoutingPolicy::kCacheAware:
      return pick_cache_aware(workers, prompt);
  }
  return std::nullopt;
}

void Router::forget(const std::string& worker_id) {
  std::lock_guard lock(mu_);
  for (auto it = lru_.begin(); it != lru_.end();) {
    if (it->worker_id == worker_id) {
      affinity_.erase(it->key);
      it = lru_.erase(it);
    } else {
      ++it;
    }
  }
}

size_t Router::affinity_size() const {
  std::lock_guard lock(mu_);
  return affinity_.size();
}

}  // namespace mla
