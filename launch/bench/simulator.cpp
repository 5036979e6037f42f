#include "launch/bench/simulator.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <tuple>
#include <utility>

#include "kernels/error.h"
#include "rpc/routing.h"
#include "runtime/latent_cache.h"

namespace mla::bench {

namespace {

constexpr int kTerms = 5;
constexpr size_t kReportedUnits = 4096;  // as a worker reports at most

std::array<double, kTerms> features(const StepSample& s) {
  return {1.0, static_cast<double>(s.prefill_tokens), static_cast<double>(s.decode_seqs),
          static_cast<double>(s.context_tokens), static_cast<double>(s.prefill_pairs)};
}

// Least squares over the columns in `use` (the others fixed at 0): the normal equations,
// solved by Gaussian elimination with partial pivoting. False when they are singular.
bool solve(const std::vector<StepSample>& samples, const std::array<bool, kTerms>& use,
           std::array<double, kTerms>& c) {
  std::vector<int> cols;
  for (int j = 0; j < kTerms; ++j)
    if (use[j]) cols.push_back(j);
  const size_t n = cols.size();
  std::vector<std::vector<double>> a(n, std::vector<double>(n + 1, 0.0));
  // Rows weighted by 1/t: relative errors matter, not absolute ones.
  for (const StepSample& s : samples) {
    const auto f = features(s);
    const double w = 1.0 / std::max(s.step_ms, 1e-6);
    for (size_t i = 0; i < n; ++i) {
      for (size_t k = 0; k < n; ++k) a[i][k] += w * w * f[cols[i]] * f[cols[k]];
      a[i][n] += w * w * f[cols[i]] * s.step_ms;
    }
  }
  for (size_t i = 0; i < n; ++i) {
    size_t pivot = i;
    for (size_t r = i + 1; r < n; ++r)
      if (std::fabs(a[r][i]) > std::fabs(a[pivot][i])) pivot = r;
    if (std::fabs(a[pivot][i]) < 1e-12) return false;
    std::swap(a[i], a[pivot]);
    for (size_t r = 0; r < n; ++r) {
      if (r == i) continue;
      const double f = a[r][i] / a[i][i];
      for (size_t k = i; k <= n; ++k) a[r][k] -= f * a[i][k];
    }
  }
  c.fill(0.0);
  for (size_t i = 0; i < n; ++i) c[cols[i]] = a[i][n] / a[i][i];
  return true;
}

}  // namespace

StepTimeModel StepTimeModel::fit(const std::vector<StepSample>& samples) {
  MLA_REQUIRE(samples.size() >= kTerms, "profile: {} step samples; at least {} are needed",
              samples.size(), kTerms);
  std::array<bool, kTerms> use;
  use.fill(true);
  // A term the samples never exercise cannot be estimated: leave it out.
  for (int j = 1; j < kTerms; ++j) {
    use[j] = std::any_of(samples.begin(), samples.end(),
                         [j](const StepSample& s) { return features(s)[j] != 0; });
  }
  StepTimeModel m;
  for (int round = 0; round < kTerms; ++round) {
    MLA_REQUIRE(solve(samples, use, m.c_),
                "profile: the samples do not separate prefill, decode and context costs (vary "
                "all three)");
    bool changed = false;
    for (int j = 0; j < kTerms; ++j) {
      if (use[j] && m.c_[j] < 0) {
        use[j] = false;  // a cost cannot be negative: drop the term and refit
        changed = true;
      }
    }
    if (!changed) break;
  }
  for (double& c : m.c_) c = std::max(c, 0.0);
  for (const StepSample& s : samples) {
    const double t = m.fitted_ms(s);
    m.max_rel_error_ = std::max(m.max_rel_error_, std::fabs(t - s.step_ms) / s.step_ms);
  }
  // The interpolation's points: pure prefill steps, and pure decode steps on a grid.
  for (const StepSample& s : samples) {
    if (s.decode_seqs == 0 && s.prefill_tokens > 0)
      m.prefill_.emplace_back(s.prefill_tokens, s.step_ms);
    if (s.prefill_tokens == 0 && s.decode_seqs > 0) {
      m.batches_.push_back(s.decode_seqs);
      m.contexts_.push_back(static_cast<double>(s.context_tokens) / s.decode_seqs);
    }
  }
  std::sort(m.prefill_.begin(), m.prefill_.end());
  for (auto* axis : {&m.batches_, &m.contexts_}) {
    std::sort(axis->begin(), axis->end());
    axis->erase(std::unique(axis->begin(), axis->end()), axis->end());
  }
  m.decode_.assign(m.batches_.size(), std::vector<double>(m.contexts_.size(), -1.0));
  for (const StepSample& s : samples) {
    if (s.prefill_tokens != 0 || s.decode_seqs == 0) continue;
    const auto b =
        std::lower_bound(m.batches_.begin(), m.batches_.end(), s.decode_seqs) - m.batches_.begin();
    const auto c = std::lower_bound(m.contexts_.begin(), m.contexts_.end(),
                                    static_cast<double>(s.context_tokens) / s.decode_seqs) -
                   m.contexts_.begin();
    m.decode_[static_cast<size_t>(b)][static_cast<size_t>(c)] = s.step_ms;
  }
  // The mixed steps' prefill share: least squares of (t - decode part) on the prefill part,
  // over all of them and per prefill size.
  std::map<int32_t, std::pair<double, double>> by_size;  // tokens -> (num, den)
  double num = 0, den = 0;
  for (const StepSample& s : samples) {
    if (s.prefill_tokens == 0 || s.decode_seqs == 0) continue;
    const double d =
        m.decode_ms(s.decode_seqs, static_cast<double>(s.context_tokens) / s.decode_seqs);
    const double p = m.prefill_ms(s.prefill_tokens);
    num += (s.step_ms - d) * p;
    den += p * p;
    by_size[s.prefill_tokens].first += (s.step_ms - d) * p;
    by_size[s.prefill_tokens].second += p * p;
  }
  if (den > 0) m.mixed_weight_ = std::clamp(num / den, 0.0, 2.0);
  for (const auto& [tokens, nd] : by_size) {
    if (nd.second > 0) m.mixed_.emplace_back(tokens, std::clamp(nd.first / nd.second, 0.0, 2.0));
  }
  return m;
}

StepTimeModel StepTimeModel::from_profile(const nlohmann::json& profile) {
  MLA_REQUIRE(profile.contains("samples") && profile["samples"].is_array(),
              "profile: no \"samples\" list");
  std::vector<StepSample> samples;
  for (const auto& s : profile["samples"]) {
    samples.push_back({s.value("prefill_tokens", 0), s.value("decode_seqs", 0),
                       s.value("context_tokens", int64_t{0}), s.value("prefill_pairs", int64_t{0}),
                       s.value("step_ms", 0.0)});
    MLA_REQUIRE(samples.back().step_ms > 0, "profile: a sample with step_ms <= 0");
  }
  return fit(samples);
}

double StepTimeModel::fitted_ms(const StepSample& step) const {
  const auto f = features(step);
  double t = 0;
  for (int j = 0; j < kTerms; ++j) t += c_[j] * f[j];
  return t;
}

namespace {

// The bracketing indices of x on a sorted axis and its weight on the upper one (beyond the
// ends, the edge segment extended: weights below 0 or above 1).
std::tuple<size_t, size_t, double> bracket(const std::vector<double>& axis, double x) {
  if (axis.size() == 1) return {0, 0, 0.0};
  size_t hi = static_cast<size_t>(std::lower_bound(axis.begin(), axis.end(), x) - axis.begin());
  hi = std::clamp<size_t>(hi, 1, axis.size() - 1);
  const size_t lo = hi - 1;
  return {lo, hi, (x - axis[lo]) / (axis[hi] - axis[lo])};
}

}  // namespace

double StepTimeModel::prefill_ms(int32_t tokens) const {
  if (prefill_.empty()) return fitted_ms({tokens, 0, 0, int64_t{tokens} * (tokens / 2), 0});
  std::vector<double> axis;
  for (const auto& [x, _] : prefill_) axis.push_back(x);
  const auto [lo, hi, w] = bracket(axis, tokens);
  return std::max(0.0, prefill_[lo].second + w * (prefill_[hi].second - prefill_[lo].second));
}

double StepTimeModel::decode_ms(int32_t seqs, double context_per_seq) const {
  auto at = [&](size_t b, size_t c) {
    const double v = decode_[b][c];
    if (v >= 0) return v;
    const auto n = static_cast<int32_t>(batches_[b]);
    return fitted_ms({0, n, static_cast<int64_t>(n * contexts_[c]), 0, 0});
  };
  if (batches_.empty()) {
    return fitted_ms({0, seqs, static_cast<int64_t>(seqs * context_per_seq), 0, 0});
  }
  const auto [b0, b1, wb] = bracket(batches_, seqs);
  const auto [c0, c1, wc] = bracket(contexts_, context_per_seq);
  const double low = at(b0, c0) + wc * (at(b0, c1) - at(b0, c0));
  const double high = at(b1, c0) + wc * (at(b1, c1) - at(b1, c0));
  return std::max(0.0, low + wb * (high - low));
}

double StepTimeModel::mixed_weight(int32_t tokens) const {
  if (mixed_.empty()) return mixed_weight_;
  std::vector<double> axis;
  for (const auto& [x, _] : mixed_) axis.push_back(x);
  // Outside the sizes measured, the nearest one's share (a share is no cost to extrapolate).
  const auto [lo, hi, w] = bracket(axis, tokens);
  const double t = std::clamp(w, 0.0, 1.0);
  return mixed_[lo].second + t * (mixed_[hi].second - mixed_[lo].second);
}

double StepTimeModel::step_ms(const StepSample& step) const {
  double t = 0;
  if (step.decode_seqs > 0) {
    t += decode_ms(step.decode_seqs, static_cast<double>(step.context_tokens) / step.decode_seqs);
  }
  if (step.prefill_tokens > 0) {
    t += (step.decode_seqs > 0 ? mixed_weight(step.prefill_tokens) : 1.0) *
         prefill_ms(step.prefill_tokens);
  }
  return t;
}

nlohmann::json StepTimeModel::to_json() const {
  return {{"base_ms", c_[0]},
          {"per_prefill_token_ms", c_[1]},
          {"per_decode_seq_ms", c_[2]},
          {"per_context_token_ms", c_[3]},
          {"per_prefill_pair_ms", c_[4]},
          {"mixed_prefill_weight", mixed_weight_},
          {"mixed_prefill_weights", mixed_},
          {"max_relative_error", max_rel_error_}};
}

namespace {

struct Group {
  std::string id;
  std::unique_ptr<LatentCache> cache;
  std::unique_ptr<Scheduler> scheduler;
  std::vector<std::unique_ptr<Sequence>> sequences;  // the live ones
  std::vector<size_t> item_of;                       // parallel to sequences
  bool busy = false;
  bool alive = true;
  bool draining = false;
  Schedule step;
  int32_t in_flight = 0;
  std::vector<Sequence*> leaving;  // to migrate once the step under way ends
  std::vector<uint64_t> stopping;  // live pre-copies that ended: they stop at a step boundary
  int64_t preempted = 0;           // since the last heartbeat
  double last_rebalance_s = -1e300;
  // With prefix caching: the units its last heartbeat reported keeping (as a worker does).
  std::shared_ptr<const std::unordered_set<uint64_t>> reported_units;
  int64_t reported_version = -1;  // the index's inserts + evictions + lookups then
  uint64_t units_epoch = 0;       // heartbeats that reported units (WorkerView::units_epoch)
};

struct Event {
  double t;
  uint64_t order;  // ties in the order they were made
  enum Kind {
    kArrival,
    kReachWorker,
    kStepDone,
    kGroupFails,
    kGroupDrains,
    kResubmit,
    kMigrated,
    kPreCopied,
    kHeartbeat
  } kind;
  size_t index;  // the work item (arrival, reaching its worker, resubmission, migrated), the
                 // group, or a live pre-copy's id
  bool operator>(const Event& o) const { return t != o.t ? t > o.t : order > o.order; }
};

}  // namespace

SimResult simulate(const std::vector<WorkItem>& items, const StepTimeModel& model,
                   const SimOptions& o) {
  MLA_REQUIRE(o.groups >= 1, "--groups must be >= 1, got {}", o.groups);
  MLA_REQUIRE(o.tp >= 1, "--tp must be >= 1, got {}", o.tp);
  MLA_REQUIRE(o.prefill_groups >= 0 && o.prefill_groups < std::max(o.groups, 2),
              "--prefill-groups must leave a decode group: {} of {} groups", o.prefill_groups,
              o.groups);
  const bool migrates = o.prefill_groups > 0 || !o.drains.empty() || o.rebalance;
  MLA_REQUIRE(!migrates || (o.latent_bytes_per_token > 0 && o.migration_gbps > 0),
              "migrations (prefill groups, drains, rebalancing) move caches: latent bytes per "
              "token and migration GB/s must be > 0");
  const RebalanceThresholds& th = o.rebalance_thresholds;
  MLA_REQUIRE(
      !o.rebalance || (o.heartbeat_ms > 0 && o.rebalance_interval_ms >= 0 && 0 <= th.low_free &&
                       th.low_free <= th.high_free && th.high_free <= 1),
      "rebalancing needs --heartbeat-ms > 0, --rebalance-interval-ms >= 0 and 0 <= "
      "--rebalance-low-free <= --rebalance-high-free <= 1");
  MLA_REQUIRE(o.max_concurrency >= 1, "--max-concurrency must be >= 1");
  MLA_REQUIRE(o.heartbeat_ms > 0, "--heartbeat-ms must be > 0, got {}", o.heartbeat_ms);
  MLA_REQUIRE(o.step_scale > 0, "--step-scale must be > 0, got {}", o.step_scale);
  SimResult result;
  result.records.resize(items.size());
  std::vector<Group> groups(static_cast<size_t>(o.groups));
  for (int32_t g = 0; g < o.groups; ++g) {
    Group& group = groups[static_cast<size_t>(g)];
    group.id = fmt::format("sim-{}", g);
    group.cache =
        std::make_unique<LatentCache>(CacheGeometry{1, o.block_size, 1, 0}, o.num_pages,
                                      ShardPlan(o.tp, 0, o.tp, o.kv_shard), CacheStorage::kNone);
    if (o.prefix_caching) group.cache->enable_prefix_caching();
    group.scheduler = std::make_unique<Scheduler>(o.scheduler, *group.cache);
  }
  RouterOptions ro;
  ro.policy = o.routing;
  ro.affinity_block = o.block_size;
  Router router(ro);

  std::priority_queue<Event, std::vector<Event>, std::greater<>> events;
  uint64_t order = 0;
  for (size_t i = 0; i < items.size(); ++i)
    events.push({items[i].arrival_s, order++, Event::kArrival, i});
  auto group_events = [&](const std::vector<GroupEvent>& list, Event::Kind kind, const char* what) {
    for (const GroupEvent& f : list) {
      MLA_REQUIRE(f.group >= 0 && f.group < o.groups && f.at_s >= 0,
                  "a {} of group {} at {} s: groups are 0 to {}, times >= 0", what, f.group, f.at_s,
                  o.groups - 1);
      events.push({f.at_s, order++, kind, static_cast<size_t>(f.group)});
    }
  };
  group_events(o.failures, Event::kGroupFails, "failure");
  group_events(o.drains, Event::kGroupDrains, "drain");
  const bool heartbeats = o.rebalance || o.prefix_caching;
  if (heartbeats) events.push({o.heartbeat_ms / 1000.0, order++, Event::kHeartbeat, 0});
  int32_t free_slots = o.max_concurrency;
  std::deque<size_t> pending;  // arrived, waiting for a client slot
  int32_t in_flight = 0;
  RequestId next_id = 1;
  std::vector<size_t> routed_to(items.size());
  std::vector<std::vector<int32_t>> prompts(items.size());  // what the worker gets to compute
  std::vector<int32_t> to_generate(items.size());           // the tokens still to come
  // Migrations under way: the request's sequence, its pages reserved at the target; while a
  // live pre-copy runs, the source group and sequence it copies from (compared, never read).
  struct Migration {
    size_t to;
    std::unique_ptr<Sequence> seq;
    size_t from = 0;
    const Sequence* source = nullptr;
  };
  std::map<size_t, Migration> migrations;  // by work item
  // Live pre-copies under way, by their own id (an item failed over mid-copy may start another
  // migration before the first's pre-copy event comes): id -> item.
  std::map<uint64_t, size_t> precopies;
  uint64_t next_precopy = 0;
  // Whether a live pre-copy of `seq`, or from group g, is under way.
  const auto precopying = [&](const Sequence* seq) {
    return std::any_of(precopies.begin(), precopies.end(), [&](const auto& entry) {
      return migrations.at(entry.second).source == seq;
    });
  };
  const auto copying_from = [&](size_t g) {
    return std::any_of(precopies.begin(), precopies.end(),
                       [&](const auto& entry) { return migrations.at(entry.second).from == g; });
  };
  const auto prefill_group = [&](size_t g) { return static_cast<int32_t>(g) < o.prefill_groups; };
  double now = 0;

  auto start_step = [&](size_t g) {
    Group& group = groups[g];
    if (group.busy) return;
    group.step = group.scheduler->schedule();
    result.preemptions += static_cast<int64_t>(group.step.preempted.size());
    group.preempted += static_cast<int64_t>(group.step.preempted.size());
    if (group.step.empty()) return;
    const StepShape shape = group.step.shape();
    const StepSample step{shape.prefill_tokens, shape.decode_seqs, shape.context_tokens,
                          shape.prefill_pairs, 0.0};
    group.busy = true;
    ++result.steps;
    events.push({now + o.step_scale * model.step_ms(step) / 1000.0, order++, Event::kStepDone, g});
  };

  // Sends work item i to a live group, as routing picks it; false when none is left.
  auto route = [&](size_t i) {
    // With prefill groups, new requests go to them while any is alive.
    bool prefill_alive = false;
    for (size_t g = 0; g < groups.size(); ++g) prefill_alive |= prefill_group(g) && groups[g].alive;
    std::vector<WorkerView> views;
    for (size_t k = 0; k < groups.size(); ++k) {
      const Group& g = groups[k];
      views.push_back({g.id, g.alive && !g.draining && (!prefill_alive || prefill_group(k)),
                       g.cache->num_available(), o.num_pages, g.scheduler->num_running(),
                       g.scheduler->num_waiting(), g.in_flight, g.reported_units,
                       g.reported_units ? g.cache->prefix_unit_tokens() : 0, g.units_epoch});
    }
    const std::optional<std::string> picked = router.pick(views, prompts[i]);
    if (!picked) return false;
    const size_t g = static_cast<size_t>(std::stoi(picked->substr(4)));
    routed_to[i] = g;
    ++groups[g].in_flight;
    events.push({now + o.request_ms / 1000.0, order++, Event::kReachWorker, i});
    return true;
  };

  // Starts work item i (its client slot taken); false when the coordinator refuses it.
  auto start_request = [&](size_t i) {
    const WorkItem& w = items[i];
    RequestRecord& r = result.records[i];
    r.sent = true;
    r.start_s = now;
    r.start_lag_ms = (now - w.arrival_s) * 1000.0;
    std::vector<int32_t>& prompt = prompts[i];
    prompt = w.prompt_ids;
    if (prompt.empty()) {
      const size_t n =
          std::max<size_t>(1, w.prompt_text.size() / std::max(1, o.text_bytes_per_token));
      prompt.assign(n, 1);
    }
    r.input_tokens = static_cast<int32_t>(prompt.size());
    to_generate[i] = w.output_len;
    if (in_flight >= o.max_in_flight) {
      r.code = "RESOURCE_EXHAUSTED";
      return false;
    }
    if (!route(i)) {
      r.code = "UNAVAILABLE";
      return false;
    }
    ++in_flight;
    return true;
  };

  // Work item i reaches the group it was routed to.
  auto reach_worker = [&](size_t i) {
    const size_t g = routed_to[i];
    Group& group = groups[g];
    // It died on the way, or started draining (a draining worker refuses new requests): the
    // call fails at once and fails over.
    if (!group.alive || group.draining) {
      --group.in_flight;
      events.push({now, order++, Event::kResubmit, i});
      return;
    }
    const std::vector<int32_t>& prompt = prompts[i];
    auto seq = std::make_unique<Sequence>();
    seq->id = next_id++;
    seq->request.prompt = prompt;
    seq->request.max_tokens = to_generate[i];
    seq->tokens = prompt;
    seq->prompt_len = static_cast<int32_t>(prompt.size());
    group.scheduler->add(seq.get());
    group.sequences.push_back(std::move(seq));
    group.item_of.push_back(i);
    start_step(g);
  };

  auto release_slot = [&] {
    ++free_slots;
    while (free_slots > 0 && !pending.empty()) {
      const size_t next = pending.front();
      pending.pop_front();
      if (start_request(next)) --free_slots;
    }
  };

  // Group g dies: every request it held goes back to the coordinator with what it streamed.
  auto fail_group = [&](size_t g) {
    Group& group = groups[g];
    if (!group.alive) return;
    group.alive = false;
    for (size_t k = 0; k < group.sequences.size(); ++k) {
      const Sequence& seq = *group.sequences[k];
      const size_t i = group.item_of[k];
      const int32_t streamed = seq.num_generated();
      prompts[i].insert(prompts[i].end(), seq.tokens.end() - streamed, seq.tokens.end());
      to_generate[i] -= streamed;
      events.push({now + o.network_ms / 1000.0, order++, Event::kResubmit, i});
    }
    group.sequences.clear();
    group.item_of.clear();
    group.leaving.clear();
    group.in_flight = 0;
    // Its live pre-copies end with it: their pages at the targets are given back.
    for (auto it = precopies.begin(); it != precopies.end();) {
      auto m = migrations.find(it->second);
      if (m->second.from != g || m->second.source == nullptr) {
        ++it;
        continue;
      }
      groups[m->second.to].cache->release(m->second.seq->table);
      migrations.erase(m);
      it = precopies.erase(it);
    }
    group.stopping.clear();
  };

  // The coordinator's migration target for a request leaving group g (-1: none).
  auto target_for = [&](size_t g) {
    std::vector<MigrationPeer> peers;
    for (size_t d = 0; d < groups.size(); ++d) {
      const Group& t = groups[d];
      peers.push_back({t.id, d != g && t.alive && !t.draining && !prefill_group(d),
                       o.prefill_groups > 0 && !prefill_group(d), t.cache->num_available(),
                       o.num_pages, t.in_flight});
    }
    return migration_target(peers);
  };

  // Sequence k of group g migrates with its cache to the coordinator's target, unless there
  // is none or it lacks room (it refuses): then it stays.
  auto migrate = [&](size_t g, size_t k) {
    const int target = target_for(g);
    if (target < 0) return false;
    const auto to = static_cast<size_t>(target);
    Group& from = groups[g];
    Sequence& seq = *from.sequences[k];
    const auto n = static_cast<int32_t>(seq.tokens.size());
    auto moved = std::make_unique<Sequence>();
    moved->id = next_id++;
    moved->request = seq.request;
    moved->tokens = seq.tokens;
    moved->prompt_len = seq.prompt_len;
    if (!groups[to].cache->reserve(moved->table, n)) return false;
    // What the source computed moves; the last token runs again, as after an import.
    moved->num_computed = std::min(seq.num_computed, n - 1);
    const size_t i = from.item_of[k];
    if (o.live_migration) {
      // Pre-copy while the request runs on: the bytes computed so far.
      const double bytes =
          static_cast<double>(moved->num_computed) * static_cast<double>(o.latent_bytes_per_token);
      migrations[i] = {to, std::move(moved), g, &seq};
      precopies[next_precopy] = i;
      events.push(
          {now + bytes / (o.migration_gbps * 1e9), order++, Event::kPreCopied, next_precopy++});
      return true;
    }
    from.scheduler->remove(&seq);
    from.sequences.erase(from.sequences.begin() + static_cast<long>(k));
    from.item_of.erase(from.item_of.begin() + static_cast<long>(k));
    --from.in_flight;
    ++groups[to].in_flight;
    ++result.migrations;
    const double bytes =
        static_cast<double>(moved->num_computed) * static_cast<double>(o.latent_bytes_per_token);
    const double ms = o.migration_fixed_ms + bytes / (o.migration_gbps * 1e9) * 1000.0;
    migrations[i] = {to, std::move(moved)};
    events.push({now + ms / 1000.0, order++, Event::kMigrated, i});
    return true;
  };

  // The migrations group g decided on (drain, rebalancing) start: at once when it is idle,
  // else when its step ends (a request leaves at a step boundary).
  auto start_leaving = [&](size_t g) {
    Group& group = groups[g];
    if (group.busy || !group.alive) return;
    for (Sequence* seq : std::exchange(group.leaving, {})) {
      if (precopying(seq)) continue;  // already on its way
      for (size_t k = 0; k < group.sequences.size(); ++k) {
        if (group.sequences[k].get() == seq) {  // unless it ended meanwhile
          migrate(g, k);
          break;
        }
      }
    }
  };

  // Live migrations whose pre-copy ended stop at group g's step boundary: the request leaves
  // the source with what it computed meanwhile, or stays (it ended, the target died or lacks
  // room for what it grew; its pages there are given back).
  auto stop_precopied = [&](size_t g) {
    Group& group = groups[g];
    if (group.busy && group.alive) return;
    for (const uint64_t id : std::exchange(group.stopping, {})) {
      const size_t i = precopies.at(id);
      precopies.erase(id);
      auto it = migrations.find(i);
      Migration& m = it->second;
      size_t k = 0;
      while (k < group.sequences.size() &&
             (group.sequences[k].get() != m.source || group.item_of[k] != i)) {
        ++k;
      }
      Group& target = groups[m.to];
      Sequence* seq = k < group.sequences.size() ? group.sequences[k].get() : nullptr;
      const auto n = seq != nullptr ? static_cast<int32_t>(seq->tokens.size()) : 0;
      if (!group.alive || seq == nullptr || !target.alive ||
          !target.cache->reserve(m.seq->table, n)) {
        target.cache->release(m.seq->table);
        migrations.erase(it);
        continue;
      }
      const int32_t copied = m.seq->num_computed;
      m.seq->tokens = seq->tokens;
      m.seq->num_computed = std::min(seq->num_computed, n - 1);
      m.source = nullptr;
      group.scheduler->remove(seq);
      group.sequences.erase(group.sequences.begin() + static_cast<long>(k));
      group.item_of.erase(group.item_of.begin() + static_cast<long>(k));
      --group.in_flight;
      ++target.in_flight;
      ++result.migrations;
      const double tail = static_cast<double>(m.seq->num_computed - copied) *
                          static_cast<double>(o.latent_bytes_per_token);
      const double ms = o.migration_fixed_ms + tail / (o.migration_gbps * 1e9) * 1000.0;
      events.push({now + ms / 1000.0, order++, Event::kMigrated, i});
    }
  };

  // A migration of work item i arrives: the request continues at its target.
  auto arrive = [&](size_t i) {
    auto it = migrations.find(i);
    Migration m = std::move(it->second);
    migrations.erase(it);
    Group& group = groups[m.to];
    if (!group.alive) {  // the target died meanwhile: fail over with what was streamed
      const int32_t streamed = m.seq->num_generated();
      prompts[i].insert(prompts[i].end(), m.seq->tokens.end() - streamed, m.seq->tokens.end());
      to_generate[i] -= streamed;
      events.push({now, order++, Event::kResubmit, i});
      return;
    }
    group.scheduler->add(m.seq.get());
    group.sequences.push_back(std::move(m.seq));
    group.item_of.push_back(i);
    start_step(m.to);
  };

  // Group g drains: no new requests, and every request it holds leaves.
  auto drain_group = [&](size_t g) {
    Group& group = groups[g];
    if (!group.alive || group.draining) return;
    group.draining = true;
    for (const auto& seq : group.sequences) group.leaving.push_back(seq.get());
    start_leaving(g);
    start_step(g);  // those that stayed (no target had room) run on
  };

  // A heartbeat from every group: the kept prefix units it reports (for cache-aware routing),
  // and the coordinator's rebalancing looks at it.
  auto heartbeat = [&] {
    bool moved = false;
    for (size_t g = 0; g < groups.size(); ++g) {
      Group& group = groups[g];
      // As a worker does: listed again only when the index changed (worker_service.cpp).
      if (const PrefixIndex* prefix = group.cache->prefix_index(); prefix && group.alive) {
        const PrefixStats& st = prefix->stats();
        const int64_t version = st.inserted_pages + st.evicted_pages + st.lookups;
        if (version != group.reported_version) {
          group.reported_version = version;
          const std::vector<uint64_t> keys = prefix->recent_keys(kReportedUnits);
          group.reported_units =
              std::make_shared<const std::unordered_set<uint64_t>>(keys.begin(), keys.end());
        }
        ++group.units_epoch;
      }
      const int64_t preempted = std::exchange(group.preempted, 0);
      if (!o.rebalance || !group.alive || group.draining || !group.leaving.empty() ||
          copying_from(g)) {
        continue;
      }
      if (!short_of_cache(group.cache->num_available(), o.num_pages, preempted,
                          o.rebalance_thresholds) ||
          (now - group.last_rebalance_s) * 1000.0 < o.rebalance_interval_ms) {
        continue;
      }
      const int target = target_for(g);
      if (target < 0) continue;
      const Group& to = groups[static_cast<size_t>(target)];
      std::vector<MovableRequest> running;
      for (const auto& seq : group.sequences) {
        running.push_back({static_cast<int32_t>(seq->tokens.size()),
                           seq->request.max_tokens - seq->num_generated()});
      }
      const MigrationPeer view{
          to.id, true, o.prefill_groups > 0, to.cache->num_available(), o.num_pages, to.in_flight};
      const int chosen = rebalance_choice(running, view, o.block_size, o.rebalance_thresholds);
      if (chosen < 0) continue;
      group.last_rebalance_s = now;
      ++result.rebalances;
      moved = true;
      group.leaving.push_back(group.sequences[static_cast<size_t>(chosen)].get());
      start_leaving(g);
      start_step(g);  // what stayed may fit now
    }
    // Heartbeats go on while anything else can still happen (or rebalancing just moved a
    // request off a stuck group); a request that can never run does not keep the run going.
    if (!events.empty() || moved) {
      events.push({now + o.heartbeat_ms / 1000.0, order++, Event::kHeartbeat, 0});
    }
  };

  // The coordinator's failover of work item i; with no live group left the request fails.
  auto resubmit = [&](size_t i) {
    if (route(i)) return;
    RequestRecord& r = result.records[i];
    r.code = "UNAVAILABLE";
    r.e2el_ms = (now - r.start_s) * 1000.0;
    --in_flight;
    release_slot();
  };

  while (!events.empty()) {
    const Event e = events.top();
    events.pop();
    now = e.t;
    if (e.kind == Event::kReachWorker) {
      reach_worker(e.index);
      continue;
    }
    if (e.kind == Event::kGroupFails) {
      fail_group(e.index);
      continue;
    }
    if (e.kind == Event::kResubmit) {
      resubmit(e.index);
      continue;
    }
    if (e.kind == Event::kMigrated) {
      arrive(e.index);
      continue;
    }
    if (e.kind == Event::kPreCopied) {
      const auto id = static_cast<uint64_t>(e.index);
      if (!precopies.contains(id)) continue;  // its source failed meanwhile
      const size_t from = migrations.at(precopies.at(id)).from;
      groups[from].stopping.push_back(id);
      stop_precopied(from);
      start_step(from);
      continue;
    }
    if (e.kind == Event::kGroupDrains) {
      drain_group(e.index);
      continue;
    }
    if (e.kind == Event::kHeartbeat) {
      heartbeat();
      continue;
    }
    if (e.kind == Event::kArrival) {
      if (free_slots > 0) {
        if (start_request(e.index)) --free_slots;
      } else {
        pending.push_back(e.index);
      }
      continue;
    }
    Group& group = groups[e.index];
    group.busy = false;
    if (!group.alive) continue;                       // the step never finished
    const double seen = now + o.network_ms / 1000.0;  // when the client sees this step's tokens
    for (const ScheduledChunk& c : group.step.chunks) {
      group.scheduler->commit(c);
      if (!c.samples()) continue;
      Sequence* seq = c.seq;
      seq->tokens.push_back(1);
      size_t k = 0;
      while (group.sequences[k].get() != seq) ++k;
      const size_t item = group.item_of[k];
      RequestRecord& r = result.records[item];
      const double since_start_ms = (seen - r.start_s) * 1000.0;
      if (r.token_s.empty())
        r.ttft_ms = since_start_ms;
      else
        r.itl_ms.push_back((seen - r.token_s.back()) * 1000.0);
      r.token_s.push_back(seen);
      r.token_n.push_back(1);
      ++r.output_tokens;
      if (r.workers.empty() || r.workers.back() != group.id) r.workers.push_back(group.id);
      if (seq->num_generated() >= seq->request.max_tokens) {
        r.e2el_ms = since_start_ms;
        r.complete = true;
        group.scheduler->remove(seq);
        group.sequences.erase(group.sequences.begin() + static_cast<long>(k));
        group.item_of.erase(group.item_of.begin() + static_cast<long>(k));
        --group.in_flight;
        --in_flight;
        result.duration_s = std::max(result.duration_s, seen);
        release_slot();
      } else if (prefill_group(e.index) && seq->num_generated() == 1) {
        migrate(e.index, k);
      }
    }
    stop_precopied(e.index);
    start_leaving(e.index);
    start_step(e.index);
  }
  for (const Group& g : groups) {
    if (const PrefixIndex* prefix = g.cache->prefix_index()) {
      result.prefix_hit_tokens += prefix->stats().hit_tokens;
      result.prefix_lookup_tokens += prefix->stats().lookup_tokens;
    }
  }
  return result;
}

}  // namespace mla::bench
