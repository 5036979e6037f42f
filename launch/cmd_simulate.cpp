// `mlaserve profile`: a model's forward-step times on this machine (CPU or GPU, one group),
// over a grid of prefill chunk sizes and decode batches x contexts, written as JSON with the
// step-time model fit on them (launch/bench/simulator.h). With --emulate, one process measures
// rank 0's share of a --tp group larger than the machine and adds its collectives' time from a
// link model (launch/bench/link_model.h).
//
// `mlaserve simulate`: `mlaserve bench`'s workloads and schedules run against simulated
// worker groups (the real Scheduler and Router; step times from a profile), writing bench's
// result table, BENCH line and JSON.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "kernels/error.h"
#include "launch/bench/link_model.h"
#include "launch/bench/report.h"
#include "launch/bench/simulator.h"
#include "launch/bench/workload.h"
#include "launch/bench_options.h"
#include "launch/commands.h"
#include "launch/deploy_flags.h"
#include "launch/group_runtime.h"
#include "runtime/engine.h"

namespace mla::launch {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<int32_t> parse_list(const std::string& s, const char* flag) {
  std::vector<int32_t> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t comma = s.find(',', start);
    if (comma == std::string::npos) comma = s.size();
    const std::string item = s.substr(start, comma - start);
    start = comma + 1;
    if (item.empty()) continue;
    try {
      out.push_back(std::stoi(item));
    } catch (const std::exception&) {
      MLA_THROW(kInvalidArgument, "{}: '{}' is not a number", flag, item);
    }
    MLA_REQUIRE(out.back() >= 1, "{}: {} must be >= 1", flag, out.back());
  }
  MLA_REQUIRE(!out.empty(), "{}: no values", flag);
  return out;
}

struct ProfileArgs {
  DeployFlags deploy;
  std::string prefill = "16,64,256";
  std::string batch = "1,4,16";
  std::string context = "64,256,1024";
  int32_t repeats = 5;
  std::string out = "profile.json";
  uint64_t seed = 0;
  bool emulate = false;  // one process as rank 0 of the --tp group; collectives from `link`
  bench::LinkModel link;
};

// A step's forward time, and what its collectives moved.
struct TimedStep {
  double ms = 0;
  CommStats comm;
};

nlohmann::ordered_json comm_json(const CommStats& c) {
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  for (int op = 0; op < kNumCommOps; ++op) {
    if (c.calls[op] == 0) continue;
    out[to_string(static_cast<CommOp>(op))] = {{"bytes", c.bytes[op]}, {"calls", c.calls[op]}};
  }
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int run_profile(const ProfileArgs& a) {
  DeployConfig d = a.deploy.resolve();
  const std::vector<int32_t> prefills = parse_list(a.prefill, "--prefill");
  const std::vector<int32_t> batches = parse_list(a.batch, "--batch");
  const std::vector<int32_t> contexts = parse_list(a.context, "--context");
  MLA_REQUIRE(a.repeats >= 1, "--repeats must be >= 1");
  MLA_REQUIRE(a.emulate || (a.link.busbw_gbps == 0 && a.link.latency_us == 0),
              "--link-busbw-gbps and --link-latency-us model an emulated group: add --emulate");
  if (a.emulate) {
    MLA_REQUIRE(d.parallel.tp > 1, "--emulate stands in for a group: give its size with --tp");
    a.link.validate();
  }
  // Every prefill of the grid in one chunk, beside any decode batch of it (mixed steps).
  auto& sched = d.engine.scheduler;
  const int32_t max_prefill = *std::max_element(prefills.begin(), prefills.end());
  sched.max_batch_tokens = std::max(
      sched.max_batch_tokens, max_prefill + *std::max_element(batches.begin(), batches.end()));
  sched.max_running =
      std::max(sched.max_running, *std::max_element(batches.begin(), batches.end()) + 1);
  auto rt = a.emulate ? GroupRuntime::emulate_rank0(d) : GroupRuntime::start(d);
  Engine& engine = *rt->engine;
  if (!engine.is_leader()) {
    engine.follow();
    return 0;
  }
  FollowerRelease release(engine);
  const int32_t vocab = rt->model->config().vocab_size;
  std::mt19937_64 rng(a.seed);
  auto prompt = [&](int32_t n) {
    std::uniform_int_distribution<int32_t> id(1, vocab - 1);
    std::vector<int32_t> p(static_cast<size_t>(n));
    for (auto& x : p) x = id(rng);
    return p;
  };
  // One step, timed; emulated, the time its collectives would take on the links is added. The
  // collectives are the engine's count, which includes those replayed in CUDA graphs (a
  // communicator sees a captured collective only once).
  Communicator* comm = rt->data;
  auto timed_step = [&] {
    const CommStats before = engine.stats().work.comm;
    const Clock::time_point t0 = Clock::now();
    engine.step();
    TimedStep t;
    t.ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    t.comm = engine.stats().work.comm - before;
    if (a.emulate) t.ms += a.link.ms(t.comm, d.parallel.tp);
    return t;
  };
  std::vector<bench::StepSample> samples;
  std::vector<CommStats> sample_comm;  // the last timed step's collectives, per sample
  auto add_sample = [&](bench::StepSample s, const std::vector<TimedStep>& steps) {
    std::vector<double> times;
    for (const auto& t : steps) times.push_back(t.ms);
    s.step_ms = median(times);
    samples.push_back(s);
    sample_comm.push_back(steps.back().comm);
  };
  // Prefill: one request whose whole prompt is one step.
  for (const int32_t p : prefills) {
    std::vector<TimedStep> steps;
    for (int32_t r = 0; r <= a.repeats; ++r) {  // the first is warm-up
      Request req;
      req.prompt = prompt(p);
      req.max_tokens = 1;
      req.ignore_eos = true;
      engine.add_request(req);
      const TimedStep t = timed_step();
      while (engine.has_work()) engine.step();
      if (r > 0) steps.push_back(t);
    }
    add_sample({p, 0, 0, int64_t{p} * (p / 2)}, steps);
    spdlog::info("profile: prefill {} tokens: {:.3f} ms", p, samples.back().step_ms);
  }
  // Decode: b requests of context c, prefilled, then `repeats` decode steps timed; at the middle
  // context, for every prefill size of the grid, `repeats` more steps each with a new prompt of
  // that size beside the decodes (mixed steps, as continuous batching makes them: what a chunk
  // adds beside decodes depends on its size).
  const int32_t mixed_context = contexts[contexts.size() / 2];
  const auto mixed_sizes = static_cast<int32_t>(prefills.size());
  for (const int32_t b : batches) {
    for (const int32_t c : contexts) {
      const bool mixed = c == mixed_context;
      // Enough for the timed steps after the last prompt's prefill: the first prompts decode
      // while the later ones still prefill (at most one step per chunk of the budget).
      const int32_t max_tokens = (2 + (mixed ? mixed_sizes : 0)) * a.repeats + 2 + b +
                                 (b * (c + 1)) / sched.max_batch_tokens + 1;
      // A point whose sequences do not fit the cache would preempt: it is no decode batch.
      const int64_t pages = int64_t{b} * engine.cache().pages_for(c + max_tokens) +
                            (mixed ? engine.cache().pages_for(max_prefill + 1) : 0);
      if (pages > engine.cache().pool().num_pages()) {
        spdlog::warn("profile: batch {} x context {} needs {} cache pages of {}: skipped", b, c,
                     pages, engine.cache().pool().num_pages());
        continue;
      }
      for (int32_t i = 0; i < b; ++i) {
        Request req;
        req.prompt = prompt(c);
        req.max_tokens = max_tokens;
        req.ignore_eos = true;
        engine.add_request(req);
      }
      // Prefill all of them (and their first tokens): until every one has a token. (Counting
      // tokens instead would stop early: a prompt done first decodes while later ones still
      // prefill, and the "decode" steps timed next would carry prefill chunks.)
      std::set<RequestId> started;
      while (static_cast<int32_t>(started.size()) < b) {
        for (const auto& o : engine.step()) {
          if (o.token >= 0) started.insert(o.id);
        }
      }
      std::vector<TimedStep> times;
      for (int32_t r = 0; r < a.repeats; ++r) {
        const int64_t before = engine.stats().computed_tokens;
        times.push_back(timed_step());
        // A decode point holds b decodes and nothing else.
        MLA_CHECK(engine.stats().computed_tokens - before == b,
                  "profile: a decode step of batch {} computed {} tokens", b,
                  engine.stats().computed_tokens - before);
      }
      add_sample({0, b, int64_t{b} * (c + 1 + a.repeats / 2), 0}, times);
      spdlog::info("profile: decode batch {} context {}: {:.3f} ms", b, c, samples.back().step_ms);
      int32_t decoded = a.repeats;  // steps the batch has decoded since its prefill
      for (int32_t k = 0; mixed && k < mixed_sizes; ++k) {
        const int32_t p = prefills[static_cast<size_t>(k)];
        std::vector<TimedStep> mixed_times;
        for (int32_t r = 0; r < a.repeats; ++r) {
          Request req;
          req.prompt = prompt(p);
          req.max_tokens = 1;
          req.ignore_eos = true;
          engine.add_request(req);
          const int64_t before = engine.stats().computed_tokens;
          mixed_times.push_back(timed_step());
          MLA_CHECK(engine.stats().computed_tokens - before == b + p,
                    "profile: a mixed step of batch {} and prefill {} computed {} tokens", b, p,
                    engine.stats().computed_tokens - before);
        }
        add_sample({p, b, int64_t{b} * (c + 1 + decoded + a.repeats / 2), int64_t{p} * (p / 2)},
                   mixed_times);
        decoded += a.repeats;
        spdlog::info("profile: decode batch {} context {} + prefill {}: {:.3f} ms", b, c, p,
                     samples.back().step_ms);
      }
      while (engine.has_work()) engine.step();
    }
  }
  const bench::StepTimeModel fit = bench::StepTimeModel::fit(samples);
  nlohmann::ordered_json out;
  out["model"] = d.model_dir;
  out["model_family"] = rt->model->config().family_name();
  out["device"] = rt->model->cuda_device() >= 0 ? "cuda" : "cpu";
  out["tp"] = d.parallel.tp;
  out["kv_shard"] = d.parallel.kv_shard == KvShard::kReplicate ? "replicate" : "sequence";
  out["block_size"] = d.engine.block_size;
  if (a.emulate) {
    // Step times are rank 0's compute measured here plus the collectives' modelled time.
    out["emulated"] = true;
    out["link"] = a.link.to_json();
  }
  // What a migration moves per token: every layer's latent row in the cache's dtype.
  const ModelConfig& mc = rt->model->config();
  // The layers measured, and how many of them are dense (tests/bench/profile_layers.py
  // extrapolates two profiles of one shape to more layers).
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < mc.num_layers; ++l) moe_layers += mc.is_moe_layer(l) ? 1 : 0;
  out["num_layers"] = mc.num_layers;
  out["moe_layers"] = moe_layers;
  out["latent_bytes_per_token"] = int64_t{mc.num_layers} * engine.cache().row_width() *
                                  static_cast<int64_t>(dtype_size(engine.cache().row_dtype()));
  out["samples"] = nlohmann::ordered_json::array();
  for (size_t i = 0; i < samples.size(); ++i) {
    const auto& s = samples[i];
    nlohmann::ordered_json row = {{"prefill_tokens", s.prefill_tokens},
                                  {"decode_seqs", s.decode_seqs},
                                  {"context_tokens", s.context_tokens},
                                  {"prefill_pairs", s.prefill_pairs},
                                  {"step_ms", s.step_ms}};
    if (comm != nullptr) row["collectives"] = comm_json(sample_comm[i]);
    if (a.emulate) row["collectives_ms"] = a.link.ms(sample_comm[i], d.parallel.tp);
    out["samples"].push_back(row);
  }
  out["fit"] = fit.to_json();
  std::ofstream(a.out) << out.dump(2) << "\n";
  const auto& c = fit.coefficients();
  std::cout << fmt::format(
      "profile: {} steps measured; step ms = {:.4f} + {:.6f} x prefill tokens + {:.5f} x "
      "decoding sequences + {:.8f} x context tokens + {:.9f} x prefill pairs (largest error "
      "{:.1f} %) -> {}\n",
      samples.size(), c[0], c[1], c[2], c[3], c[4], 100 * fit.max_relative_error(), a.out);
  return 0;
}

struct SimulateArgs {
  std::string profile;
  bench::SimOptions sim;
  std::string routing = "least-loaded";
  bench::WorkloadSpec workload;
  int32_t requests = 100;
  std::string request_rates = "inf";
  double burstiness = 1.0;
  int32_t vocab = 32000;
  uint64_t seed = 0;
  std::string percentiles = "50,90,99";
  std::string goodput;
  std::string result_file;
  bool save_detailed = false;
  std::vector<std::string> failures;  // "GROUP@SECONDS"
  std::vector<std::string> drains;    // "GROUP@SECONDS"
  int32_t tp = 0;                     // 0: the profile's
  std::string kv_shard;               // empty: the profile's
  std::vector<std::string> traces;    // --check-trace: workers' step traces
  bool blocking_migration = false;    // SimOptions::live_migration false
  std::string step_scale = "1";       // StepScale::parse
};

// --check-trace: holds the profile's step model against the steps a serving worker traced
// (workers.step_trace): per kind of step (decode only, prefill only, mixed) and over all, the
// traced time against the model's, as sums (busy time) and the median per-step ratio, for the
// engine's step and for the worker's whole loop iteration.
int check_traces(const bench::StepTimeModel& model, const std::vector<std::string>& traces) {
  for (const std::string& path : traces) {
    std::ifstream in(path);
    if (!in) MLA_THROW(kNotFound, "--check-trace: cannot read {}", path);
    struct Kind {
      int64_t steps = 0;
      double step = 0, loop = 0, model = 0;
      std::vector<double> step_ratio, loop_ratio;  // of the steps the model gives a time
    };
    std::map<std::string, Kind> kinds;
    int64_t line_no = 0;
    for (std::string line; std::getline(in, line);) {
      ++line_no;
      if (line.empty()) continue;
      const auto j = nlohmann::json::parse(line, nullptr, false);
      MLA_REQUIRE(!j.is_discarded() && j.contains("step_ms") && j.contains("loop_ms"),
                  "--check-trace: {} line {} is not a step trace line", path, line_no);
      const bench::StepSample s{j.value("prefill_tokens", 0), j.value("decode_seqs", 0),
                                j.value("context_tokens", int64_t{0}),
                                j.value("prefill_pairs", int64_t{0}), 0.0};
      const double predicted = model.step_ms(s);
      const std::string kind = bench::step_kind_name(bench::step_kind(s));
      for (const std::string& k : {kind, std::string("all")}) {
        Kind& t = kinds[k];
        ++t.steps;
        t.step += j["step_ms"].get<double>();
        t.loop += j["loop_ms"].get<double>();
        t.model += predicted;
        if (predicted <= 0) continue;  // an extrapolation below zero: no ratio
        t.step_ratio.push_back(j["step_ms"].get<double>() / predicted);
        t.loop_ratio.push_back(j["loop_ms"].get<double>() / predicted);
      }
    }
    MLA_REQUIRE(!kinds.empty(), "--check-trace: {} has no steps", path);
    for (auto& [kind, t] : kinds) {
      if (t.step_ratio.empty() || t.model <= 0) t.step_ratio = t.loop_ratio = {0.0};
      std::cout << fmt::format(
          "TRACE file={} kind={} steps={} traced_step_ms={:.1f} traced_loop_ms={:.1f} "
          "model_ms={:.1f} step_over_model={:.3f} loop_over_model={:.3f} "
          "median_step_over_model={:.3f} median_loop_over_model={:.3f}\n",
          path, kind, t.steps, t.step, t.loop, t.model, t.model > 0 ? t.step / t.model : 0.0,
          t.model > 0 ? t.loop / t.model : 0.0, median(t.step_ratio), median(t.loop_ratio));
    }
  }
  return 0;
}

// --fail-group's and --drain-group's "GROUP@SECONDS".
bench::GroupEvent parse_group_event(const std::string& spec, const char* flag) {
  const size_t at = spec.find('@');
  bench::GroupEvent f;
  try {
    MLA_REQUIRE(at != std::string::npos, "");
    size_t used = 0;
    f.group = std::stoi(spec.substr(0, at), &used);
    MLA_REQUIRE(used == at, "");
    f.at_s = std::stod(spec.substr(at + 1), &used);
    MLA_REQUIRE(used == spec.size() - at - 1, "");
  } catch (const std::exception&) {
    MLA_THROW(kInvalidArgument, "{}: '{}' is not GROUP@SECONDS (e.g. 1@30)", flag, spec);
  }
  return f;
}

int run_simulate(const SimulateArgs& a) {
  std::ifstream in(a.profile);
  if (!in) MLA_THROW(kNotFound, "--profile: cannot read {}", a.profile);
  const auto profile = nlohmann::json::parse(in, nullptr, false);
  MLA_REQUIRE(!profile.is_discarded(), "--profile: {} is not JSON", a.profile);
  const bench::StepTimeModel model = bench::StepTimeModel::from_profile(profile);
  if (!a.traces.empty()) return check_traces(model, a.traces);
  bench::SimOptions sim = a.sim;
  sim.step_scale = bench::StepScale::parse(a.step_scale, "--step-scale");
  sim.routing = routing_policy_from_string(a.routing, "--routing");
  sim.live_migration = !a.blocking_migration;
  for (const std::string& f : a.failures) {
    sim.failures.push_back(parse_group_event(f, "--fail-group"));
  }
  for (const std::string& f : a.drains) sim.drains.push_back(parse_group_event(f, "--drain-group"));
  // The group layout the profile measured, unless given.
  const int32_t profiled_tp = profile.value("tp", 1);
  const std::string profiled_shard = profile.value("kv_shard", std::string("sequence"));
  if (a.tp == 0) sim.tp = profiled_tp;
  sim.kv_shard =
      kv_shard_from_string(a.kv_shard.empty() ? profiled_shard : a.kv_shard, "--kv-shard");
  if (sim.tp != profiled_tp) {
    spdlog::warn("simulating tp {} with step times profiled at tp {}", sim.tp, profiled_tp);
  }
  if (sim.latent_bytes_per_token == 0) {
    sim.latent_bytes_per_token = profile.value("latent_bytes_per_token", int64_t{0});
  }
  bench::RunInfo info;
  info.backend = "mlaserve-simulated";
  info.target = fmt::format("{} group(s) from {}", sim.groups, a.profile);
  info.model_id = profile.value("model", std::string("?"));
  info.percentiles.clear();
  for (const int32_t p : parse_list(a.percentiles, "--percentiles")) info.percentiles.push_back(p);
  info.goodput = bench::Slo::parse(a.goodput);
  info.burstiness = a.burstiness;
  info.max_concurrency = sim.max_concurrency;
  info.save_detailed = a.save_detailed;
  std::string description;
  const std::vector<bench::WorkItem> base =
      bench::make_workload(a.workload, a.vocab, a.requests, a.seed, &description);
  info.workload = description;
  info.num_prompts = static_cast<int64_t>(base.size());
  const std::vector<double> rates = bench::parse_rates(a.request_rates);
  for (const double rate : rates) {
    std::vector<bench::WorkItem> items = base;
    if (a.workload.dataset != "trace") {
      const auto at =
          bench::arrival_times(static_cast<int64_t>(items.size()), rate, a.burstiness, a.seed);
      for (size_t i = 0; i < items.size(); ++i) items[i].arrival_s = at[i];
    }
    const Clock::time_point t0 = Clock::now();
    const bench::SimResult r = bench::simulate(items, model, sim);
    info.request_rate = a.workload.dataset == "trace" ? 0 : rate;
    info.duration_s = r.duration_s;
    auto result = bench::result_json(info, r.records);
    const double hit_rate =
        r.prefix_lookup_tokens > 0
            ? static_cast<double>(r.prefix_hit_tokens) / static_cast<double>(r.prefix_lookup_tokens)
            : 0.0;
    // What the simulated cluster did besides serving, beside bench's keys.
    result["simulation"] = {{"groups", sim.groups},
                            {"groups_per_device", sim.groups_per_device},
                            {"tp", sim.tp},
                            {"steps", r.steps},
                            {"preemptions", r.preemptions},
                            {"migrations", r.migrations},
                            {"rebalances", r.rebalances},
                            {"prefix_hit_rate", hit_rate},
                            {"step_scale",
                             {{"decode", sim.step_scale.decode},
                              {"prefill", sim.step_scale.prefill},
                              {"mixed", sim.step_scale.mixed}}}};
    std::cout << bench::result_table(result);
    std::cout << fmt::format(
        "SIM rate={} requests={} ok={} duration_s={:.3f} tokens_per_s={:.1f} ttft_p50_ms={:.3f} "
        "ttft_p99_ms={:.3f} tpot_p50_ms={:.3f} tpot_p99_ms={:.3f} steps={} preemptions={} "
        "prefix_hit_rate={:.3f} migrations={} rebalances={} wall_ms={:.1f}\n",
        rate > 0 ? fmt::format("{}", rate) : "inf", base.size(), result["completed"].get<int64_t>(),
        r.duration_s, result["output_throughput"].get<double>(),
        result.value("median_ttft_ms", 0.0), result.value("p99_ttft_ms", 0.0),
        result.value("median_tpot_ms", 0.0), result.value("p99_tpot_ms", 0.0), r.steps,
        r.preemptions, hit_rate, r.migrations, r.rebalances,
        std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    if (!a.result_file.empty()) {
      const std::string path = bench::result_path_for_rate(a.result_file, rate, rates.size() > 1);
      std::ofstream(path) << result.dump(2) << "\n";
    }
  }
  return 0;
}

}  // namespace

void add_simulate_commands(CLI::App& app, int& exit_code) {
  auto p = std::make_shared<ProfileArgs>();
  auto* profile = app.add_subcommand(
      "profile",
      "Measure a model's step times (prefill chunks, decode batches x contexts) for "
      "`mlaserve simulate`");
  p->deploy.add_to(*profile);
  profile->add_option("--prefill", p->prefill, "Prefill chunk sizes (tokens)")
      ->capture_default_str();
  profile->add_option("--batch", p->batch, "Decode batch sizes")->capture_default_str();
  profile->add_option("--context", p->context, "Decode contexts (tokens)")->capture_default_str();
  profile->add_option("--repeats", p->repeats, "Steps timed per point (the median is kept)")
      ->capture_default_str();
  profile->add_option("--out", p->out, "Where the profile JSON goes")->capture_default_str();
  profile->add_option("--seed", p->seed, "Seed of the random prompts")->capture_default_str();
  profile->add_flag("--emulate", p->emulate,
                    "One process measures rank 0's share of the --tp group (a group larger than "
                    "this machine); the collectives' time comes from --link-busbw-gbps and "
                    "--link-latency-us");
  profile->add_option("--link-busbw-gbps", p->link.busbw_gbps,
                      "With --emulate: the links' bus bandwidth, GB/s (as nccl-tests reports)");
  profile
      ->add_option("--link-latency-us", p->link.latency_us,
                   "With --emulate: a collective call's fixed latency, us")
      ->capture_default_str();
  profile->callback([p, &exit_code] { exit_code = run_profile(*p); });

  auto s = std::make_shared<SimulateArgs>();
  auto* sim = app.add_subcommand(
      "simulate",
      "Run bench's workloads against simulated worker groups (the real scheduler "
      "and router; step times from `mlaserve profile`)");
  sim->add_option("--profile", s->profile, "A profile written by `mlaserve profile`")->required();
  sim->add_option("--groups", s->sim.groups, "Worker groups")->capture_default_str();
  sim->add_option("--groups-per-device", s->sim.groups_per_device,
                  "Groups sharing one device (worker processes on one GPU): steps that overlap "
                  "split it evenly")
      ->capture_default_str();
  sim->add_option("--num-pages", s->sim.num_pages, "Cache pages per rank")->capture_default_str();
  sim->add_option("--block-size", s->sim.block_size, "Tokens per cache page")
      ->capture_default_str();
  sim->add_option("--max-batch-tokens", s->sim.scheduler.max_batch_tokens, "A step's token budget")
      ->capture_default_str();
  sim->add_option("--max-running", s->sim.scheduler.max_running, "Sequences in a step at most")
      ->capture_default_str();
  sim->add_option("--routing", s->routing,
                  "least-loaded, round-robin, prefix-affinity or cache-aware")
      ->capture_default_str();
  sim->add_option("--max-in-flight", s->sim.max_in_flight, "The coordinator's admission limit")
      ->capture_default_str();
  sim->add_option("--request-ms", s->sim.request_ms, "Client to worker, per request")
      ->capture_default_str();
  sim->add_option("--network-ms", s->sim.network_ms, "Worker to client, per message")
      ->capture_default_str();
  sim->add_option("--step-scale", s->step_scale,
                  "F, or decode=F,prefill=F,mixed=F: each kind of step takes this many times "
                  "the profile's time (a calibration: --check-trace's loop_over_model per kind "
                  "on a serving worker's trace)")
      ->capture_default_str();
  sim->add_option("--num-prompts,--requests", s->requests, "Requests per run")
      ->capture_default_str();
  sim->add_option("--max-concurrency,--concurrency", s->sim.max_concurrency,
                  "The client's streams open at once at most")
      ->capture_default_str();
  sim->add_option("--request-rate,--rate", s->request_rates, "As bench's (a list sweeps)")
      ->capture_default_str();
  sim->add_option("--burstiness", s->burstiness, "As bench's")->capture_default_str();
  add_workload_options(*sim, s->workload);
  sim->add_option("--vocab", s->vocab, "Prompt ids are drawn from [1, vocab)")
      ->capture_default_str();
  sim->add_option("--seed", s->seed, "As bench's: the same seed, the same schedule")
      ->capture_default_str();
  sim->add_option("--percentiles", s->percentiles, "Percentiles to report")->capture_default_str();
  sim->add_option("--goodput", s->goodput, "SLOs for goodput, as bench's");
  sim->add_option("--tp", s->tp, "Ranks per group (default: the profile's)");
  sim->add_option("--kv-shard", s->kv_shard,
                  "sequence or replicate: how a group's ranks hold the cache (default: the "
                  "profile's)");
  sim->add_option("--prefill-groups", s->sim.prefill_groups,
                  "The first N groups prefill and hand each request, with its cache, to a decode "
                  "group (the rest) after its first token; 0: all groups do both")
      ->capture_default_str();
  sim->add_option("--drain-group", s->drains,
                  "GROUP@SECONDS: that group drains then, and its requests migrate with their "
                  "caches (repeatable)");
  sim->add_flag("--rebalance", s->sim.rebalance,
                "The coordinator's rebalancing: a group short of cache moves a request to one "
                "with room");
  sim->add_option("--rebalance-low-free", s->sim.rebalance_thresholds.low_free,
                  "A group with fewer free pages (a fraction) is short of cache")
      ->capture_default_str();
  sim->add_option("--rebalance-high-free", s->sim.rebalance_thresholds.high_free,
                  "A target needs at least this fraction of its pages free")
      ->capture_default_str();
  sim->add_option("--rebalance-interval-ms", s->sim.rebalance_interval_ms,
                  "At most one rebalancing move per group in this time")
      ->capture_default_str();
  sim->add_option("--heartbeat-ms", s->sim.heartbeat_ms,
                  "Workers' heartbeat interval (when rebalancing looks)")
      ->capture_default_str();
  sim->add_option("--migration-gbps", s->sim.migration_gbps, "A migration's transfer rate")
      ->capture_default_str();
  sim->add_option("--migration-fixed-ms", s->sim.migration_fixed_ms,
                  "A migration's time besides the transfer")
      ->capture_default_str();
  sim->add_flag("--blocking-migration", s->blocking_migration,
                "Migrations stop the request for the whole copy (a blocking stop-and-copy), not "
                "the coordinator's live pre-copy");
  sim->add_option("--latent-bytes-per-token", s->sim.latent_bytes_per_token,
                  "Cache bytes per token, all layers (default: the profile's)");
  sim->add_flag("--prefix-caching", s->sim.prefix_caching,
                "Groups keep full pages for prompts with the same leading tokens");
  sim->add_option("--fail-group", s->failures,
                  "GROUP@SECONDS: that group dies then and its requests fail over (repeatable)");
  sim->add_option("--check-trace", s->traces,
                  "Instead of simulating: hold the profile's step model against a worker's "
                  "step trace (workers.step_trace; repeatable)");
  sim->add_option("--result-file", s->result_file, "Write the result JSON here, as bench does");
  sim->add_flag("--save-detailed", s->save_detailed, "Per-request arrays in the JSON");
  sim->callback([s, &exit_code] { exit_code = run_simulate(*s); });
}

}  // namespace mla::launch
