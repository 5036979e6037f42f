// The discrete-event run behind simulate() (launch/bench/simulator.h): G worker groups, each
// the project's real Scheduler over an accounting-only LatentCache, and the coordinator's real
// Router, migration target and rebalancing choice, advanced event by event. Each method of
// Simulation is one thing that happens (a request arrives, reaches its worker, a step ends, a
// group fails, drains or heartbeats, a migration copies or lands); run() dispatches the events
// in time order.
#include <fmt/format.h>

#include <algorithm>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "kernels/error.h"
#include "launch/bench/simulator.h"
#include "rpc/routing.h"
#include "runtime/latent_cache.h"

namespace mla::bench {

namespace {

constexpr size_t kReportedUnits = 4096;  // as a worker reports at most

struct Group {
  std::string id;
  std::unique_ptr<LatentCache> cache;
  std::unique_ptr<Scheduler> scheduler;
  std::vector<std::unique_ptr<Sequence>> sequences;  // the live ones
  std::vector<size_t> item_of;                       // parallel to sequences
  bool busy = false;                                 // a step is under way
  // Of the step under way: the milliseconds of work left (its time alone on the device), and
  // its number, which its step-done event carries (a step rescheduled by a change in how its
  // device is shared leaves stale events behind).
  double work_ms = 0;
  uint64_t step_seq = 0;
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
  uint64_t step_seq = 0;  // a step's end: Group::step_seq when it was scheduled
  bool operator>(const Event& o) const { return t != o.t ? t > o.t : order > o.order; }
};

// A migration under way: the request's sequence, its pages reserved at the target; while a
// live pre-copy runs, the source group and sequence it copies from (compared, never read).
struct Migration {
  size_t to;
  std::unique_ptr<Sequence> seq;
  size_t from = 0;
  const Sequence* source = nullptr;
};

struct Simulation {
  // The groups, and the schedule of arrivals, failures, drains and the first heartbeat.
  Simulation(const std::vector<WorkItem>& items_in, const StepTimeModel& model_in,
             const SimOptions& options)
      : items(items_in),
        model(model_in),
        o(options),
        router(RouterOptions{.policy = o.routing, .affinity_block = o.block_size}),
        free_slots(o.max_concurrency),
        routed_to(items.size()),
        prompts(items.size()),
        to_generate(items.size()) {
    result.records.resize(items.size());
    groups.resize(static_cast<size_t>(o.groups));
    for (int32_t g = 0; g < o.groups; ++g) {
      Group& group = groups[static_cast<size_t>(g)];
      group.id = fmt::format("sim-{}", g);
      group.cache =
          std::make_unique<LatentCache>(CacheGeometry{1, o.block_size, 1, 0}, o.num_pages,
                                        ShardPlan(o.tp, 0, o.tp, o.kv_shard), CacheStorage::kNone);
      if (o.prefix_caching) group.cache->enable_prefix_caching();
      group.scheduler = std::make_unique<Scheduler>(o.scheduler, *group.cache);
    }
    devices.resize((static_cast<size_t>(o.groups) + static_cast<size_t>(o.groups_per_device) - 1) /
                   static_cast<size_t>(o.groups_per_device));
    for (size_t i = 0; i < items.size(); ++i) {
      events.push({items[i].arrival_s, order++, Event::kArrival, i});
    }
    group_events(o.failures, Event::kGroupFails, "failure");
    group_events(o.drains, Event::kGroupDrains, "drain");
    if (o.rebalance || o.prefix_caching) {
      events.push({o.heartbeat_ms / 1000.0, order++, Event::kHeartbeat, 0});
    }
  }

  void group_events(const std::vector<GroupEvent>& list, Event::Kind kind, const char* what) {
    for (const GroupEvent& f : list) {
      MLA_REQUIRE(f.group >= 0 && f.group < o.groups && f.at_s >= 0,
                  "a {} of group {} at {} s: groups are 0 to {}, times >= 0", what, f.group, f.at_s,
                  o.groups - 1);
      events.push({f.at_s, order++, kind, static_cast<size_t>(f.group)});
    }
  }

  // Whether a live pre-copy of `seq`, or from group g, is under way.
  bool precopying(const Sequence* seq) const {
    return std::any_of(precopies.begin(), precopies.end(), [&](const auto& entry) {
      return migrations.at(entry.second).source == seq;
    });
  }

  bool copying_from(size_t g) const {
    return std::any_of(precopies.begin(), precopies.end(),
                       [&](const auto& entry) { return migrations.at(entry.second).from == g; });
  }

  void start_step(size_t g) {
    Group& group = groups[g];
    if (group.busy) return;
    group.step = group.scheduler->schedule();
    result.preemptions += static_cast<int64_t>(group.step.preempted.size());
    group.preempted += static_cast<int64_t>(group.step.preempted.size());
    if (group.step.empty()) return;
    const StepShape shape = group.step.shape();
    const StepSample step{shape.prefill_tokens, shape.decode_seqs, shape.context_tokens,
                          shape.prefill_pairs, 0.0};
    const size_t d = g / static_cast<size_t>(o.groups_per_device);
    advance(d);
    group.busy = true;
    group.work_ms = o.step_scale.of(step) * model.step_ms(step);
    ++devices[d].busy;
    ++result.steps;
    reschedule(d);
  }

  // The steps under way on device d progressed since its last update, each at 1 / n of the
  // device while n shared it.
  void advance(size_t d) {
    Device& device = devices[d];
    if (device.busy > 0) {
      const double done_ms = (now - device.updated_s) * 1000.0 / device.busy;
      for (size_t g = first_group(d); g < first_group(d + 1); ++g) {
        if (groups[g].busy) groups[g].work_ms -= done_ms;
      }
    }
    device.updated_s = now;
  }

  // The ends of the steps under way on device d, at the share of it each has from now on.
  void reschedule(size_t d) {
    for (size_t g = first_group(d); g < first_group(d + 1); ++g) {
      Group& group = groups[g];
      if (!group.busy) continue;
      const double ms = std::max(group.work_ms, 0.0) * devices[d].busy;
      events.push({now + ms / 1000.0, order++, Event::kStepDone, g, ++group.step_seq});
    }
  }

  // A step's end: the device it ran on has one step fewer to share.
  void end_step(size_t g) {
    const size_t d = g / static_cast<size_t>(o.groups_per_device);
    advance(d);
    Group& group = groups[g];
    group.busy = false;
    group.work_ms = 0;
    ++group.step_seq;  // its pending end, if any, is void
    --devices[d].busy;
    reschedule(d);
  }

  size_t first_group(size_t d) const {
    return std::min(groups.size(), d * static_cast<size_t>(o.groups_per_device));
  }

  // Sends work item i to a live group, as routing picks it; false when none is left.
  bool route(size_t i) {
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
  }

  // Starts work item i (its client slot taken); false when the coordinator refuses it.
  bool start_request(size_t i) {
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
  }

  // Work item i reaches the group it was routed to.
  void reach_worker(size_t i) {
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
  }

  void release_slot() {
    ++free_slots;
    while (free_slots > 0 && !pending.empty()) {
      const size_t next = pending.front();
      pending.pop_front();
      if (start_request(next)) --free_slots;
    }
  }

  // Group g dies: every request it held goes back to the coordinator with what it streamed.
  void fail_group(size_t g) {
    Group& group = groups[g];
    if (!group.alive) return;
    group.alive = false;
    if (group.busy) end_step(g);  // a dead process frees its device at once
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
  }

  // The coordinator's migration target for a request leaving group g (-1: none).
  int target_for(size_t g) {
    std::vector<MigrationPeer> peers;
    for (size_t d = 0; d < groups.size(); ++d) {
      const Group& t = groups[d];
      peers.push_back({t.id, d != g && t.alive && !t.draining && !prefill_group(d),
                       o.prefill_groups > 0 && !prefill_group(d), t.cache->num_available(),
                       o.num_pages, t.in_flight});
    }
    return migration_target(peers);
  }

  // Sequence k of group g migrates with its cache to the coordinator's target, unless there
  // is none or it lacks room (it refuses): then it stays.
  bool migrate(size_t g, size_t k) {
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
  }

  // The migrations group g decided on (drain, rebalancing) start: at once when it is idle,
  // else when its step ends (a request leaves at a step boundary).
  void start_leaving(size_t g) {
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
  }

  // Live migrations whose pre-copy ended stop at group g's step boundary: the request leaves
  // the source with what it computed meanwhile, or stays (it ended, the target died or lacks
  // room for what it grew; its pages there are given back).
  void stop_precopied(size_t g) {
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
  }

  // A migration of work item i arrives: the request continues at its target.
  void arrive(size_t i) {
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
  }

  // Group g drains: no new requests, and every request it holds leaves.
  void drain_group(size_t g) {
    Group& group = groups[g];
    if (!group.alive || group.draining) return;
    group.draining = true;
    for (const auto& seq : group.sequences) group.leaving.push_back(seq.get());
    start_leaving(g);
    start_step(g);  // those that stayed (no target had room) run on
  }

  // A heartbeat from every group: the kept prefix units it reports (for cache-aware routing),
  // and the coordinator's rebalancing looks at it.
  void heartbeat() {
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
  }

  // The coordinator's failover of work item i; with no live group left the request fails.
  void resubmit(size_t i) {
    if (route(i)) return;
    RequestRecord& r = result.records[i];
    r.code = "UNAVAILABLE";
    r.e2el_ms = (now - r.start_s) * 1000.0;
    --in_flight;
    release_slot();
  }

  bool prefill_group(size_t g) const { return static_cast<int32_t>(g) < o.prefill_groups; }

  // Group g's step ends: its tokens reach the clients, finished requests free their slots, and
  // the group starts what comes next.
  void step_done(size_t g) {
    Group& group = groups[g];
    end_step(g);
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
      } else if (prefill_group(g) && seq->num_generated() == 1) {
        migrate(g, k);
      }
    }
    stop_precopied(g);
    start_leaving(g);
    start_step(g);
  }

  // A pre-copy of live migration `id` has ended: the request leaves at its source's next step
  // boundary.
  void precopied(uint64_t id) {
    if (!precopies.contains(id)) return;  // its source failed meanwhile
    const size_t from = migrations.at(precopies.at(id)).from;
    groups[from].stopping.push_back(id);
    stop_precopied(from);
    start_step(from);
  }

  // Work item i arrives from its client: it starts if a client slot is free, else waits.
  void arrival(size_t i) {
    if (free_slots > 0) {
      if (start_request(i)) --free_slots;
    } else {
      pending.push_back(i);
    }
  }

  SimResult run() {
    while (!events.empty()) {
      const Event e = events.top();
      events.pop();
      now = e.t;
      switch (e.kind) {
        case Event::kArrival:
          arrival(e.index);
          break;
        case Event::kReachWorker:
          reach_worker(e.index);
          break;
        case Event::kStepDone:
          if (e.step_seq == groups[e.index].step_seq) step_done(e.index);
          break;
        case Event::kGroupFails:
          fail_group(e.index);
          break;
        case Event::kGroupDrains:
          drain_group(e.index);
          break;
        case Event::kResubmit:
          resubmit(e.index);
          break;
        case Event::kMigrated:
          arrive(e.index);
          break;
        case Event::kPreCopied:
          precopied(static_cast<uint64_t>(e.index));
          break;
        case Event::kHeartbeat:
          heartbeat();
          break;
      }
    }
    for (const Group& g : groups) {
      if (const PrefixIndex* prefix = g.cache->prefix_index()) {
        result.prefix_hit_tokens += prefix->stats().hit_tokens;
        result.prefix_lookup_tokens += prefix->stats().lookup_tokens;
      }
    }
    return std::move(result);
  }

  const std::vector<WorkItem>& items;
  const StepTimeModel& model;
  const SimOptions& o;
  SimResult result;
  std::vector<Group> groups;
  // Groups g share device g / SimOptions::groups_per_device.
  struct Device {
    int32_t busy = 0;      // of its groups, those in a step
    double updated_s = 0;  // when their work left was last brought up to date
  };
  std::vector<Device> devices;
  Router router;
  std::priority_queue<Event, std::vector<Event>, std::greater<>> events;
  uint64_t order = 0;  // of the events made, for ties
  double now = 0;
  int32_t free_slots;          // client slots (--max-concurrency) not in use
  std::deque<size_t> pending;  // arrived, waiting for a client slot
  int32_t in_flight = 0;       // requests the coordinator holds
  RequestId next_id = 1;
  std::vector<size_t> routed_to;
  std::vector<std::vector<int32_t>> prompts;  // what the worker gets to compute
  std::vector<int32_t> to_generate;           // the tokens still to come
  std::map<size_t, Migration> migrations;     // by work item
  // Live pre-copies under way, by their own id (an item failed over mid-copy may start another
  // migration before the first's pre-copy event comes): id -> item.
  std::map<uint64_t, size_t> precopies;
  uint64_t next_precopy = 0;
};

}  // namespace

SimResult simulate(const std::vector<WorkItem>& items, const StepTimeModel& model,
                   const SimOptions& o) {
  MLA_REQUIRE(o.groups >= 1, "--groups must be >= 1, got {}", o.groups);
  MLA_REQUIRE(o.tp >= 1, "--tp must be >= 1, got {}", o.tp);
  MLA_REQUIRE(o.groups_per_device >= 1, "--groups-per-device must be >= 1, got {}",
              o.groups_per_device);
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
  const StepScale& k = o.step_scale;
  MLA_REQUIRE(k.decode > 0 && k.prefill > 0 && k.mixed > 0,
              "--step-scale must be > 0 for every kind, got decode {} prefill {} mixed {}",
              k.decode, k.prefill, k.mixed);
  return Simulation(items, model, o).run();
}

}  // namespace mla::bench
