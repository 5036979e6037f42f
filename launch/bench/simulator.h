// The discrete-event simulation behind `mlaserve simulate`: a coordinator and G worker groups
// served by the project's own scheduling and routing code (each group a real `Scheduler` on an
// accounting-only `LatentCache`: chunked prefill, page reservation, preemption by recompute;
// the coordinator's `Router` and its admission limit), with only the model's forward pass and
// the network replaced by time models. It takes the same workloads as `mlaserve bench` and
// gives the same RequestRecords, so its results are written and plotted the same way.
//
// Step time: a StepTimeModel on the steps `mlaserve profile` measured: a step's prefill part
// interpolated (piecewise linearly) between the measured prefill chunk sizes, its decode part
// bilinearly between the measured (batch, context per sequence) points, and a mixed step the
// decode part plus a share of the prefill part: the share is fit per prefill size on the
// profile's mixed steps (least squares over their batches) and interpolated over the size. The
// two parts share the weights' reads, so a short chunk beside decodes costs less than alone,
// while a long one costs about what it does alone (measured on an H100: 0.58 of a 128-token
// prefill, about all of a 512-token one; outside the sizes measured, the nearest one's); a
// profile with mixed steps at one size gives one share for all. Beyond
// the grid, the edge segments extended. (Measured step times are not smooth: the engine's
// `auto` absorption changes form with batch and context, so the points, not a formula, carry
// them.) A least-squares fit over the same samples,
//   t = c0 + c1 * prefill tokens + c2 * decoding sequences + c3 * context tokens read
//       + c4 * prefill attention pairs,
// is reported beside it (and fills in a part the profile did not measure); the context is
// summed over the decoding sequences, and a prefill chunk of n tokens from position s attends
// over n * (s + n / 2) (query, key) pairs.
// Network: a request reaches its worker `request_ms` after the client sends it, and every
// message from a worker reaches the client `network_ms` after its step ends.
// The client side is bench's: at most `max_concurrency` requests open, each started at its
// arrival or, when all are busy, when one ends.
//
// Group failures are modelled with the coordinator's failover (SimOptions::failures);
// migrations (disaggregated prefill/decode hand-offs, drains, rebalancing) with the
// coordinator's own policy (rpc/migration_policy.h) and a transfer time that follows the
// cache's size; prefix caching with the engine's own index (SimOptions::prefix_caching). Not
// modelled yet: several TP sizes in one run (every group has the same tp and cache layout).
#pragma once

#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "launch/bench/report.h"
#include "launch/bench/workload.h"
#include "parallel/shard_plan.h"
#include "rpc/migration_policy.h"
#include "runtime/routing_policy.h"
#include "runtime/scheduler.h"

namespace mla::bench {

struct StepSample {
  int32_t prefill_tokens = 0;  // prompt tokens computed in the step
  int32_t decode_seqs = 0;     // sequences that decoded one token
  int64_t context_tokens = 0;  // tokens those sequences attended to, summed
  int64_t prefill_pairs = 0;   // the prefill chunks' attention pairs, summed
  double step_ms = 0;
};

// What kind of step a sample is: decode only, prefill only, or both ("mixed").
enum class StepKind { kDecode, kPrefill, kMixed };
StepKind step_kind(const StepSample& step);
const char* step_kind_name(StepKind kind);  // "decode", "prefill", "mixed"

// A calibration for steps that run slower while serving than when profiled (host threads
// sharing the cores, the worker loop's own work, a GPU woken from idle): each kind of step
// takes its factor times what the step model says, as `mlaserve simulate --check-trace`
// measures it per kind on a worker's step trace (loop_over_model). Default: 1 for all.
struct StepScale {
  double decode = 1.0, prefill = 1.0, mixed = 1.0;
  double of(const StepSample& step) const;
  // "F" (every kind F) or "decode=F,prefill=F,mixed=F" (kinds left out keep 1); throws
  // kInvalidArgument naming `flag` on anything else or a factor that is not > 0.
  static StepScale parse(const std::string& spec, const char* flag);
};

class StepTimeModel {
 public:
  // Least squares over the samples (at least 5, spanning the terms); throws
  // kInvalidArgument otherwise. Negative coefficients are clamped to 0 and the rest refit.
  static StepTimeModel fit(const std::vector<StepSample>& samples);
  // From a profile's JSON ({"samples": [{prefill_tokens, decode_seqs, context_tokens,
  // prefill_pairs, step_ms}, ...]}), refit.
  static StepTimeModel from_profile(const nlohmann::json& profile);

  // The interpolated step time (see the top of this file).
  double step_ms(const StepSample& step) const;
  // The least-squares formula's.
  double fitted_ms(const StepSample& step) const;
  const std::array<double, 5>& coefficients() const { return c_; }
  // The formula's largest relative error over its samples.
  double max_relative_error() const { return max_rel_error_; }
  // What a prefill part adds to a step that also decodes, as a fraction of it alone: over all
  // the mixed samples, and for a prefill of `tokens` (interpolated between the sizes measured;
  // 1 without mixed samples).
  double mixed_weight() const { return mixed_weight_; }
  double mixed_weight(int32_t tokens) const;
  nlohmann::json to_json() const;

 private:
  double prefill_ms(int32_t tokens) const;
  double decode_ms(int32_t seqs, double context_per_seq) const;

  std::array<double, 5> c_{};
  double max_rel_error_ = 0;
  double mixed_weight_ = 1.0;
  std::vector<std::pair<double, double>> prefill_;  // (tokens, ms), sorted
  std::vector<std::pair<double, double>> mixed_;    // (prefill tokens, share), sorted
  std::vector<double> batches_, contexts_;          // the decode grid's axes, sorted
  std::vector<std::vector<double>> decode_;         // [batch][context] ms; < 0: not measured
};

// Something that happens to a worker group during a simulated run: it dies (a killed job) or
// it drains.
struct GroupEvent {
  int32_t group = 0;
  double at_s = 0;  // from the run's start
};

struct SimOptions {
  int32_t groups = 1;
  // Groups that share one device (the first this many on device 0, the next on device 1, ...),
  // as worker processes time-slicing one GPU: while n of a device's groups are in a step, each
  // of their steps progresses at 1 / n of its time alone (processor sharing; a dead group frees
  // its share at once). Default: 1 (every group its own devices).
  int32_t groups_per_device = 1;
  int32_t num_pages = 1024;  // cache pages per rank
  int32_t block_size = 64;
  // Ranks per group and how their caches hold a sequence: sequence-sharded (page j on rank
  // j mod tp; the leader's pages decide what fits, as in the engine, so a group holds about tp
  // times the context) or replicated (every rank holds every page). The step times must come
  // from a profile of the same layout. Defaults: 1, sequence.
  int32_t tp = 1;
  KvShard kv_shard = KvShard::kSequence;
  SchedulerOptions scheduler;
  RoutingPolicy routing = RoutingPolicy::kLeastLoaded;
  int32_t max_in_flight = 4096;  // the coordinator's admission limit
  int32_t max_concurrency = 64;  // the client's
  // Client -> coordinator -> worker, per request, and worker -> coordinator -> client, per
  // message. Defaults: the loopback figures of docs/BENCHMARKS.md's routing-overhead rows (a
  // 1-token request: 0.69 ms direct, 1.32 ms through the coordinator).
  double request_ms = 1.0;
  double network_ms = 0.3;
  // Each step takes its kind's factor times what the step model says (StepScale).
  StepScale step_scale;
  int32_t text_bytes_per_token = 4;  // a trace's text prompts, which are not tokenized here
  // Groups that die mid-run. The coordinator hears of it when each broken stream reaches it
  // (network_ms) and resubmits every request the group held to a live group, as its failover
  // does: the prompt plus the tokens already streamed, recomputed there (request_ms on the
  // way); with no live group left a request fails with UNAVAILABLE. Default: none.
  std::vector<GroupEvent> failures;
  // Every migration below goes to the coordinator's target (migration_target: decode groups
  // first, then the most free pages) among the live groups that are not draining and not
  // prefill groups; a target without room for the cache refuses, and the request stays. It
  // starts when the step under way on the source ends, and at the target the request continues
  // without recomputing. Live (live_migration, as the coordinator migrates): the request keeps
  // running at its source while its cache's bytes (latent_bytes_per_token per computed token)
  // move at migration_gbps, then stops at the next step boundary and reaches the target
  // migration_fixed_ms later, plus the bytes it computed meanwhile; it stays where it is if it
  // ends first, or the target dies or has no room for what it grew. Not live: it runs nowhere
  // for migration_fixed_ms plus all of its bytes (a blocking stop-and-copy).
  //
  // Disaggregated prefill/decode, as workers with role prefill and decode run it: the first
  // `prefill_groups` groups take new requests (and failovers) and hand each, with its cache,
  // to a decode group (the rest) once its first token is out. 0: every group does both.
  // Default: 0.
  int32_t prefill_groups = 0;
  // Groups that drain mid-run (`mlaserve admin drain`, SIGTERM on a worker): from then on the
  // group takes no new requests and, as the coordinator's migrate_on_drain does, every request
  // it holds migrates. Default: none.
  std::vector<GroupEvent> drains;
  // Rebalancing by migration (coordinator.rebalance): at every heartbeat, a group short of
  // cache (short_of_cache: free pages below rebalance.low_free, or a preemption since its last
  // heartbeat) moves the request rebalance_choice picks to the coordinator's target, at most
  // one per group every rebalance_interval_ms. Defaults: off; the coordinator's 0.1 and 0.3,
  // 1,000 ms, heartbeats every 500 ms.
  bool rebalance = false;
  RebalanceThresholds rebalance_thresholds;
  double rebalance_interval_ms = 1000.0;
  double heartbeat_ms = 500.0;
  // Defaults: the live-migration gap (10 ms on an H200, 3-14 ms on an H100) and the copy rate
  // measured over gRPC on an H100 at 16k-32k tokens (0.59-0.68 GB/s), docs/BENCHMARKS.md; live.
  double migration_fixed_ms = 10.0;
  double migration_gbps = 0.6;
  bool live_migration = true;
  int64_t latent_bytes_per_token = 0;  // required with any migration
  // Each group keeps full pages for reuse (cache.prefix_caching; the real PrefixIndex over
  // the accounting-only cache): a prompt starts on its cached prefix and only the rest is
  // prefilled. Each heartbeat (heartbeat_ms) reports the kept units to the router, as workers
  // do for cache-aware routing. Default: false.
  bool prefix_caching = false;
};

struct SimResult {
  std::vector<RequestRecord> records;  // [i] for work item i
  double duration_s = 0;
  int64_t steps = 0;
  int64_t preemptions = 0;
  int64_t prefix_hit_tokens = 0;     // prompt tokens served from cached pages, all groups
  int64_t prefix_lookup_tokens = 0;  // prompt tokens in full pages looked up
  int64_t migrations = 0;            // requests moved with their caches (any reason)
  int64_t rebalances = 0;            // of which rebalancing moved
};

SimResult simulate(const std::vector<WorkItem>& items, const StepTimeModel& model,
                   const SimOptions& options);

}  // namespace mla::bench
