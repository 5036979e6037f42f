// Live migration on a real cluster of two TP1 groups (two mpirun jobs, or one job whose groups
// move latents over its MPI): an operator's
// Migrate (C++ admin client and `mlaserve admin migrate`), migrations every 100 ms under 64
// streams, drain and SIGTERM moving a worker's requests, and the failure cases (a target
// without room, a target or source that dies mid-migration, a client that cancels during
// one); and between groups of different TP sizes and cache layouts. The workers and the
// offline engine run --deterministic: a request's batch differs on every worker, and only
// batch-invariant products make its seeded samples identical bit for bit. Every stream must carry
// exactly the offline engine's tokens (greedy and seeded), and every cache page must come back free
// on both sides.
#include <signal.h>

#include <fstream>
#include <future>

#include "kernels/cpu/fp8_latent.h"
#include "rpc/shared_secret.h"
#include "tests/e2e/cluster_fixture.h"

namespace mla::e2e {
namespace {

// Token identity across workers is exact only with batch-invariant products (a request's
// batch differs on every worker): the workers run --deterministic and the offline engine too.
constexpr bool kDeterministic = true;

class MigrationTest : public ClusterTest {
 protected:
  void SetUp() override {
    ClusterTest::SetUp();
    tp_ = 1;
    deterministic_ = kDeterministic;
  }

  AdminClient admin_client() {
    return AdminClient(control_address(), SharedSecret::load(""), nullptr, 60s);
  }

  // The job whose group serves `worker_id`.
  WorkerJob& job_of(const std::string& worker_id) {
    for (WorkerJob& job : jobs_) {
      if (worker_id_of(job, 0) == worker_id) return job;
    }
    throw std::runtime_error("no job serves " + worker_id);
  }
  // The pid of a job's group leader (world rank `rank`: 0 for its first group).
  pid_t leader_of(const WorkerJob& job, int rank = 0) {
    const auto leader = mpi_rank_process(job.process->pid(), rank, 5s);
    if (!leader) {
      throw std::runtime_error("no rank " + std::to_string(rank) + " under " +
                               job.process->command_line());
    }
    return leader->pid;
  }
  // Both groups' leaders: rank 0 of each job, or ranks 0 and tp of the one job.
  std::vector<pid_t> group_leaders() {
    if (jobs_.size() == 1) return {leader_of(jobs_[0]), leader_of(jobs_[0], tp_)};
    return {leader_of(jobs_[0]), leader_of(jobs_[1])};
  }
  // The other worker of the two.
  std::string other_than(const std::string& worker_id) const {
    return worker_ids_[0] == worker_id ? worker_ids_[1] : worker_ids_[0];
  }

  // Latent bytes per token on the wire: every layer's d_c + d_r values in fp32 (CPU), or its
  // packed fp8 row with --cache-dtype fp8.
  int64_t token_bytes() const {
    const ModelConfig& c = offline_model()->config();
    if (cache_dtype_ == CacheDType::kFp8)
      return c.num_layers * cpu::Fp8LatentRow{c.kv_lora_rank, c.qk_rope_head_dim}.bytes();
    return c.num_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4;
  }

  // Every page free on both workers and nothing in flight, in a heartbeat after `since`.
  void expect_no_pages_held(Clock::time_point since) {
    v1::ListWorkersResponse last;
    EXPECT_TRUE(wait_for_idle_cache(since, 5s, &last)) << "pages or requests left behind:\n"
                                                       << format_cluster_status(last);
  }

  // Streams `request` on a thread; `started` is set with the worker of its first token.
  struct Running {
    std::thread thread;
    Stream stream;
    std::promise<std::string> first_worker;
  };
  std::unique_ptr<Running> start_stream(const v1::GenerateRequest& request) {
    auto r = std::make_unique<Running>();
    r->thread = std::thread([this, request, run = r.get()] {
      bool first = true;
      run->stream = run_stream(client(), request, kStreamDeadline, [&](const auto& m) {
        if (first && m.token_ids_size() > 0) {
          first = false;
          run->first_worker.set_value(m.worker_id());
        }
      });
      if (first) run->first_worker.set_value("");
    });
    return r;
  }
  // Runs `load` and, while both groups' leaders are frozen, migrates request i for every i in
  // `which` with the admin client (its answer in (*moved)[i]) and runs `also`, each on its own
  // thread; then thaws them. The tiny model finishes a request in ~0.1 s: frozen, the workers
  // keep every request running until the migrations are under way (each takes a few ms once
  // they thaw). Every stream must carry its tokens, and every request that moved must have
  // moved once, to the other worker. On a busy machine a fast group can finish its requests
  // before the last first token brings the freeze; such a run is made again, up to three
  // times, until `enough` says the answers show what the test is about (by default: at least
  // half the requests moved).
  using Enough = std::function<bool(const std::vector<v1::MigrateResponse>&)>;
  // `also` gets the load as this run sends it (a run made again renames its requests, so no
  // id meets one the coordinator may still hold from the run before).
  using Also = std::function<void(const Load&)>;
  std::vector<Stream> run_migrating(
      const Load& load, const std::vector<size_t>& which, std::vector<v1::MigrateResponse>* moved,
      const Also& also = [](const Load&) {}, const Enough& enough = half_moved) {
    constexpr int kAttempts = 3;
    for (int attempt = 1;; ++attempt) {
      Load run = load;
      if (attempt > 1) {
        for (auto& r : run.requests)
          r.set_request_id(r.request_id() + "-run" + std::to_string(attempt));
      }
      std::vector<Stream> streams = run_migrating_once(run, which, moved, also);
      if (enough(*moved)) return streams;
      if (attempt == kAttempts) {
        ADD_FAILURE() << "in " << kAttempts << " runs, the migrations never found enough "
                      << "requests running: " << outcomes(*moved);
        return streams;
      }
      std::cout << "run " << attempt << ": too few requests were still running ("
                << outcomes(*moved) << "); again\n";
    }
  }
  static bool half_moved(const std::vector<v1::MigrateResponse>& moved) {
    int migrated = 0, tried = 0;
    for (const v1::MigrateResponse& m : moved) {
      tried += !m.outcome().empty();
      migrated += m.outcome() == "migrated";
    }
    return 2 * migrated >= tried;
  }
  static std::string outcomes(const std::vector<v1::MigrateResponse>& moved) {
    std::string out;
    for (const v1::MigrateResponse& m : moved) {
      out += (out.empty() ? "" : ", ") + (m.outcome().empty() ? "-" : m.outcome());
    }
    return out;
  }
  std::vector<Stream> run_migrating_once(const Load& load, const std::vector<size_t>& which,
                                         std::vector<v1::MigrateResponse>* moved,
                                         const Also& also) {
    moved->assign(load.requests.size(), {});
    // Found before the load starts: the freeze must follow the first tokens at once.
    const std::vector<pid_t> leaders = group_leaders();
    const std::vector<Stream> streams = run_load(client(), load, [&] {
      for (pid_t pid : leaders) ::kill(pid, SIGSTOP);
      std::vector<std::thread> migrations;
      for (size_t i : which) {
        migrations.emplace_back([&, i] {
          try {
            (*moved)[i] = admin_client().migrate(load.requests[i].request_id());
          } catch (const Error& e) {
            // On a busy machine a request may end before its export starts: NOT_FOUND at
            // the source, and it just finishes there.
            EXPECT_EQ(e.code(), ErrorCode::kNotFound) << e.what();
            (*moved)[i].set_outcome("ended");
          }
        });
      }
      migrations.emplace_back([&] { also(load); });
      std::this_thread::sleep_for(400ms);
      for (pid_t pid : leaders) ::kill(pid, SIGCONT);
      for (std::thread& t : migrations) t.join();
    });
    for (size_t i = 0; i < streams.size(); ++i) {
      const std::string what = "stream " + std::to_string(i);
      expect_complete(streams[i], load.requests[i], load.expected[i], what);
      if ((*moved)[i].outcome() != "migrated") continue;
      EXPECT_EQ(streams[i].result.worker_ids.size(), 2u) << what << " did not move";
      if (streams[i].result.worker_ids.size() == 2) {
        EXPECT_NE(streams[i].result.worker_ids[0], streams[i].result.worker_ids[1]) << what;
      }
    }
    return streams;
  }

  std::string transport_ = "grpc";              // how the latents are expected to move
  CacheDType cache_dtype_ = CacheDType::kAuto;  // the workers' --cache-dtype

  // `n` long requests (greedy and seeded) with their offline tokens, with ids PREFIX-i (for
  // Migrate).
  static Load named_load(int n, int32_t max_tokens, uint32_t seed, const std::string& prefix) {
    Load load = long_requests(n, max_tokens, seed, kDeterministic);
    for (size_t i = 0; i < load.requests.size(); ++i) {
      load.requests[i].set_request_id(prefix + "-" + std::to_string(i));
    }
    return load;
  }

  // Every stream of `load` carried its request's offline tokens and came from some worker;
  // `each(what, workers)` sees each stream's workers, in order.
  static void expect_all_complete(
      const std::vector<Stream>& streams, const Load& load,
      const std::function<void(const std::string&, const std::vector<std::string>&)>& each) {
    for (size_t i = 0; i < streams.size(); ++i) {
      const std::string what = "stream " + std::to_string(i);
      expect_complete(streams[i], load.requests[i], load.expected[i], what);
      ASSERT_FALSE(streams[i].result.worker_ids.empty()) << what;
      each(what, streams[i].result.worker_ids);
    }
  }

  // A migration of request i of `streams` carried its cache: every computed token's latents
  // and nothing else, from the worker of its first tokens to that of the rest.
  void expect_moved_with_cache(const v1::MigrateResponse& moved, const Stream& stream,
                               const v1::GenerateRequest& request) const {
    const v1::MigrationStats& s = moved.stats();
    EXPECT_EQ(moved.outcome(), "migrated");
    EXPECT_EQ(s.transport(), transport_);
    if (stream.result.worker_ids.size() == 2) {
      EXPECT_EQ(s.source_worker_id(), stream.result.worker_ids[0]);
      EXPECT_EQ(s.destination_worker_id(), stream.result.worker_ids[1]);
    }
    // Latents only, of every computed token: prompt plus the tokens generated so far.
    EXPECT_GE(s.tokens(), request.prompt_ids_size());
    EXPECT_EQ(s.bytes(), s.tokens() * token_bytes());
    EXPECT_GE(s.stages(), 1);
    std::cout << "moved " << s.tokens() << " tokens (" << s.bytes() << " bytes) from "
              << s.source_worker_id() << " to " << s.destination_worker_id() << " in " << s.chunks()
              << " chunks, " << s.stages() << " stages, " << s.duration_ms()
              << " ms; the source stopped " << s.stop_ms() << " ms\n";
  }
};

v1::GenerateRequest named(v1::GenerateRequest r, const std::string& id) {
  r.set_request_id(id);
  return r;
}

TEST_F(MigrationTest, AnOperatorMovesRunningRequestsWithTheirCachesAndTheTokensDoNotChange) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  const Load load = named_load(4, 200, 23, "moved");
  std::vector<v1::MigrateResponse> moved;
  CommandResult by_cli;
  const auto start = Clock::now();
  // The CLI's is a blocking stop-and-copy: one stage, the whole cache after the stop.
  const std::vector<Stream> streams = run_migrating(
      load, {1, 2, 3}, &moved,
      [&](const Load& run) {
        by_cli = admin({"migrate", "--stop-first", run.requests[0].request_id()}, kControlSecret);
      },
      [&](const auto& answers) { return half_moved(answers) && by_cli.exit == "exit 0"; });
  EXPECT_EQ(by_cli.exit, "exit 0") << by_cli.output;
  EXPECT_THAT(by_cli.output, HasSubstr("migrated from")) << by_cli.output;
  EXPECT_THAT(by_cli.output, HasSubstr("over grpc")) << by_cli.output;
  EXPECT_THAT(by_cli.output, HasSubstr(" 1 stages")) << by_cli.output;
  for (size_t i = 1; i < moved.size(); ++i) {
    if (moved[i].outcome() != "ended")
      expect_moved_with_cache(moved[i], streams[i], load.requests[i]);
  }
  std::cout << by_cli.output;
  expect_no_pages_held(start);
}

// Workers with fp8 caches (--cache-dtype fp8): a migration moves the packed rows as they are
// (the bytes of d_c e4m3 values, their scales and d_r bf16 values per token and layer, 68 for
// the tiny model against 192 in fp32), and every stream carries the tokens of the offline
// engine on an fp8 cache.
TEST_F(MigrationTest, Fp8CachesMoveTheirPackedRowsAsTheyAre) {
  cache_dtype_ = CacheDType::kFp8;
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs, {"--cache-dtype", "fp8"}));
  Load load = long_requests(4, 200, 29, kDeterministic, CacheDType::kFp8);
  for (size_t i = 0; i < load.requests.size(); ++i)
    load.requests[i].set_request_id("fp8-" + std::to_string(i));
  std::vector<v1::MigrateResponse> moved;
  const auto start = Clock::now();
  const std::vector<Stream> streams = run_migrating(load, {0, 1, 2, 3}, &moved);
  int migrated = 0;
  for (size_t i = 0; i < moved.size(); ++i) {
    if (moved[i].outcome() != "migrated") continue;
    ++migrated;
    expect_moved_with_cache(moved[i], streams[i], load.requests[i]);
  }
  EXPECT_GT(migrated, 0);
  expect_no_pages_held(start);
}

// Both groups in one mpirun job (two TP2 groups, `mpirun -np 4`): the latents move over the
// job's own MPI, leader to leader (the control stays on gRPC), and the tokens are those of the
// requests never migrated; with --migration-transport grpc the same job streams them over gRPC.
TEST_F(MigrationTest, GroupsOfOneJobMoveTheLatentsOverTheJobsMpi) {
  tp_ = 2;
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kOneJob));
  transport_ = "mpi";
  const Load load = named_load(4, 200, 61, "in-job");
  std::vector<v1::MigrateResponse> moved;
  CommandResult by_cli;
  const auto start = Clock::now();
  const std::vector<Stream> streams = run_migrating(
      load, {1, 2, 3}, &moved,
      [&](const Load& run) {
        by_cli = admin({"migrate", run.requests[0].request_id()}, kControlSecret);
      },
      [&](const auto& answers) { return half_moved(answers) && by_cli.exit == "exit 0"; });
  EXPECT_EQ(by_cli.exit, "exit 0") << by_cli.output;
  EXPECT_THAT(by_cli.output, HasSubstr("over mpi")) << by_cli.output;
  for (size_t i = 1; i < moved.size(); ++i) {
    if (moved[i].outcome() != "ended") {
      expect_moved_with_cache(moved[i], streams[i], load.requests[i]);
    }
  }
  expect_no_pages_held(start);
  EXPECT_THAT(read_file(dir_ + "/workers-0.log"), HasSubstr("move latents over MPI"));
}

TEST_F(MigrationTest, GroupsOfOneJobCanBeToldToMoveTheLatentsOverGrpc) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kOneJob, {"--migration-transport", "grpc"}));
  const Load load = named_load(2, 200, 67, "grpc-in-job");
  std::vector<v1::MigrateResponse> moved;
  const auto start = Clock::now();
  const std::vector<Stream> streams = run_migrating(load, {0, 1}, &moved);
  for (size_t i = 0; i < moved.size(); ++i) {
    if (moved[i].outcome() != "ended") {
      expect_moved_with_cache(moved[i], streams[i], load.requests[i]);
    }
  }
  expect_no_pages_held(start);
}

// Rebalancing (coordinator.rebalance on): new requests start on the small worker (the big one
// is a decode group, which takes requests only by migration), whose cache holds one request
// at a time and keeps preempting; the coordinator moves requests off it, with their caches,
// to the big one, and every stream still carries its tokens.
TEST_F(MigrationTest, RebalancingMovesRequestsOffAWorkerShortOfPages) {
  const std::string config = dir_ + "/coordinator.yaml";
  std::ofstream(config) << "coordinator:\n  heartbeat_interval_ms: 200\n"
                        << "  rebalance: {enabled: true, interval_ms: 100}\n";
  coordinator_extra_ = {"--config", config};
  job_extra_ = {{"--num-pages", "20", "--block-size", "16"}, {"--role", "decode"}};
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  const std::string small = worker_id_of(jobs_[0], 0), big = worker_id_of(jobs_[1], 0);
  const Load load = long_requests(8, 200, 53, kDeterministic);
  const auto start = Clock::now();
  const std::vector<Stream> streams = run_load(client(), load, [] {});
  // A decode group takes new requests only when no other group can (the small one's cache
  // full at that moment, on a busy machine), and a request moved before its first token shows
  // only the big worker: the coordinator's log tells the moves.
  int on_big = 0;
  expect_all_complete(streams, load, [&](const std::string&, const std::vector<std::string>& w) {
    on_big += w.back() == big;
  });
  EXPECT_GT(on_big, 0) << "nothing ended on the big worker";
  const std::string log = read_file(dir_ + "/coordinator-0.log");
  EXPECT_THAT(log, HasSubstr("rebalancing: worker " + small + " is short of cache"));
  EXPECT_THAT(log, HasSubstr("migrated from " + small + " to " + big));
  std::cout << on_big << " of 8 requests ended on the big worker\n";
  expect_no_pages_held(start);
}

// Groups of different TP sizes and cache layouts: a TP2 group with a sequence-sharded cache
// (page j on rank j mod 2) and a TP1 group, a TP2 group with a replicated cache, or another
// sharded TP2 group; and two TP2 groups with prefix caching. Requests migrate both ways (each to
// the group it did not start on): the source's ranks' pages are gathered, re-split as the
// destination lays them out, and the tokens are those of the request never migrated.
struct Regrouping {
  std::string name;
  int tp0;
  std::vector<std::string> extra0;
  int tp1;
  std::vector<std::string> extra1;
};

class ReshardingMigrationTest : public MigrationTest,
                                public testing::WithParamInterface<Regrouping> {};

TEST_P(ReshardingMigrationTest, RequestsMoveWithTheirCachesBothWays) {
  const Regrouping& r = GetParam();
  job_tp_ = {r.tp0, r.tp1};
  job_extra_ = {r.extra0, r.extra1};
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  const Load load = named_load(6, 200, 43, "regrouped");
  std::vector<v1::MigrateResponse> moved;
  const auto start = Clock::now();
  auto sources_of = [](const std::vector<v1::MigrateResponse>& answers) {
    std::set<std::string> sources;
    for (const v1::MigrateResponse& m : answers) {
      if (m.outcome() == "migrated") sources.insert(m.stats().source_worker_id());
    }
    return sources;
  };
  const std::vector<Stream> streams = run_migrating(
      load, {0, 1, 2, 3, 4, 5}, &moved, [](const Load&) {},
      [&](const auto& answers) { return sources_of(answers).size() == 2; });
  for (size_t i = 0; i < moved.size(); ++i) {
    if (moved[i].outcome() == "ended") continue;  // it finished before its turn
    expect_moved_with_cache(moved[i], streams[i], load.requests[i]);
  }
  EXPECT_EQ(sources_of(moved).size(), 2u) << "the requests did not move both ways";
  expect_no_pages_held(start);
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, ReshardingMigrationTest,
    testing::Values(
        Regrouping{"tp2_sharded_and_tp1", 2, {}, 1, {}},
        Regrouping{"tp2_sharded_and_tp2_replicated", 2, {}, 2, {"--kv-shard", "replicate"}},
        Regrouping{"tp2_sharded_and_tp2_sharded_block16", 2, {}, 2, {"--block-size", "16"}},
        // Imports into groups whose leaders' prefix indexes the followers follow.
        Regrouping{"tp2_sharded_and_tp2_replicated_prefix_caching",
                   2,
                   {"--prefix-caching"},
                   2,
                   {"--kv-shard", "replicate", "--prefix-caching"}}),
    [](const auto& info) { return info.param.name; });

TEST_F(MigrationTest, SixtyFourStreamsWithAMigrationEvery100MsLoseNothing) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  const Load load = named_load(64, 160, 29, "busy");
  std::atomic<bool> done{false};
  int migrated = 0, ended = 0, refused = 0;
  std::map<std::string, int> refusals;
  std::thread migrator;
  const auto start = Clock::now();
  const std::vector<Stream> streams = run_load(client(), load, [&] {
    migrator = std::thread([&] {
      AdminClient control = admin_client();
      std::mt19937 rng(31);
      while (!done) {
        const auto& r = load.requests[rng() % load.requests.size()];
        try {
          const v1::MigrateResponse m = control.migrate(r.request_id());
          (m.outcome() == "migrated" ? migrated : ended) += 1;
        } catch (const Error& e) {
          // Finished already, between workers, or already moving: refused, nothing moved.
          ++refused;
          ++refusals[error_code_name(e.code())];
          EXPECT_TRUE(e.code() == ErrorCode::kNotFound ||
                      e.code() == ErrorCode::kFailedPrecondition)
              << e.what();
        }
        std::this_thread::sleep_for(100ms);
      }
    });
  });
  done = true;
  migrator.join();
  int moved = 0;
  expect_all_complete(streams, load, [&](const std::string&, const std::vector<std::string>& w) {
    moved += w.size() > 1;
  });
  EXPECT_GT(migrated, 0);
  EXPECT_GT(moved, 0);
  std::cout << migrated << " migrations, " << ended << " requests ended first, " << refused
            << " refused (";
  for (const auto& [code, n] : refusals) std::cout << code << " " << n << " ";
  std::cout << "); " << moved << " of 64 streams moved\n";
  expect_no_pages_held(start);
}

// With --deterministic (batch-invariant products) a request's tokens do not depend on what it
// was batched with: 48 greedy and seeded streams, migrations every 100 ms, then one worker
// killed mid-run (its requests replay on the other) — every stream carries exactly the
// tokens the offline engine samples for the request alone.
TEST_F(MigrationTest, DeterministicStreamsSurviveMigrationsAndAFailoverBitForBit) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  const Load load = named_load(48, 200, 83, "exact");
  std::atomic<bool> done{false};
  std::atomic<int> migrated{0};
  std::thread migrator;
  const std::vector<Stream> streams = run_load(client(), load, [&] {
    migrator = std::thread([&] {
      AdminClient control = admin_client();
      std::mt19937 rng(89);
      while (!done) {
        try {
          const auto& r = load.requests[rng() % load.requests.size()];
          migrated += control.migrate(r.request_id()).outcome() == "migrated";
        } catch (const Error&) {
          // finished, between workers, or its worker is gone
        }
        std::this_thread::sleep_for(100ms);
      }
    });
    std::this_thread::sleep_for(300ms);
    jobs_[1].process->kill_tree();
  });
  done = true;
  migrator.join();
  int moved = 0;
  expect_all_complete(streams, load, [&](const std::string&, const std::vector<std::string>& w) {
    moved += w.size() > 1;
  });
  EXPECT_GT(migrated.load(), 0);
  std::cout << migrated << " migrations; " << moved << " of 48 streams changed worker\n";
}

TEST_F(MigrationTest, ATargetWithoutRoomRefusesBeforeAnyCopyAndTheRequestStays) {
  // The second worker's cache holds one page (64 tokens): too few for the request. A decode
  // group, it takes requests only by migration, so the request starts on the big worker.
  job_extra_ = {{}, {"--num-pages", "1", "--role", "decode"}};
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  const std::string small = worker_id_of(jobs_[1], 0);
  std::mt19937 rng(37);
  const v1::GenerateRequest r = named(make_request(random_prompt(rng, 90, 100), 150), "big");
  const Tokens expected = offline_tokens(r, kDeterministic);
  auto running = start_stream(r);
  const std::string source = running->first_worker.get_future().get();
  EXPECT_NE(source, small);
  // Frozen, the source keeps the request running while the migration is asked (the target
  // refuses without calling the source, so the freeze does not hold it up).
  const pid_t source_leader = leader_of(job_of(source));
  const auto start = Clock::now();
  ::kill(source_leader, SIGSTOP);
  const Failure refused = failure_of([&] { admin_client().migrate("big", small); });
  ::kill(source_leader, SIGCONT);
  running->thread.join();
  EXPECT_EQ(refused.code, ErrorCode::kResourceExhausted) << refused.message;
  EXPECT_THAT(refused.message, HasSubstr("no room")) << refused.message;
  expect_complete(running->stream, r, expected, "the request that could not move");
  EXPECT_EQ(running->stream.result.worker_ids, std::vector<std::string>{source});
  expect_no_pages_held(start);
}

TEST_F(MigrationTest, ATargetThatDiesMidMigrationLeavesTheRequestRunningAtItsSource) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  std::mt19937 rng(41);
  const v1::GenerateRequest r = named(make_request(random_prompt(rng, 20, 30), 220, 43), "stays");
  const Tokens expected = offline_tokens(r, kDeterministic);
  auto running = start_stream(r);
  const std::string source = running->first_worker.get_future().get();
  const std::string target = other_than(source);
  WorkerJob& target_job = job_of(target);
  const auto leader = mpi_rank_process(target_job.process->pid(), 0, 5s);
  ASSERT_TRUE(leader.has_value());
  // Frozen, the target holds the Import call open; then it dies under it.
  ::kill(leader->pid, SIGSTOP);
  Failure failed;
  std::thread migrate(
      [&] { failed = failure_of([&] { admin_client().migrate("stays", target); }); });
  std::this_thread::sleep_for(300ms);
  target_job.process->kill_tree();
  migrate.join();
  running->thread.join();
  EXPECT_EQ(failed.code, ErrorCode::kUnavailable) << failed.message;
  expect_complete(running->stream, r, expected, "the request whose target died");
  EXPECT_EQ(running->stream.result.worker_ids, std::vector<std::string>{source});
  v1::ListWorkersResponse last;
  EXPECT_TRUE(wait_for_idle_cache(Clock::now(), 5s, &last)) << format_cluster_status(last);
}

TEST_F(MigrationTest, ASourceThatDiesMidMigrationFallsBackToReplayOnTheTarget) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  std::mt19937 rng(47);
  const v1::GenerateRequest r =
      named(make_request(random_prompt(rng, 20, 30), 220, 53), "replayed");
  const Tokens expected = offline_tokens(r, kDeterministic);
  auto running = start_stream(r);
  const std::string source = running->first_worker.get_future().get();
  const std::string target = other_than(source);
  WorkerJob& source_job = job_of(source);
  const auto leader = mpi_rank_process(source_job.process->pid(), 0, 5s);
  ASSERT_TRUE(leader.has_value());
  // Frozen, the source holds the target's Export call open; then it dies under it.
  ::kill(leader->pid, SIGSTOP);
  Failure failed;
  std::thread migrate(
      [&] { failed = failure_of([&] { admin_client().migrate("replayed", target); }); });
  std::this_thread::sleep_for(300ms);
  source_job.process->kill_tree();
  migrate.join();
  running->thread.join();
  EXPECT_TRUE(failed.code.has_value()) << "the migration from a dead source succeeded";
  expect_complete(running->stream, r, expected, "the request whose source died");
  EXPECT_EQ(running->stream.result.worker_ids, (std::vector<std::string>{source, target}));
  v1::ListWorkersResponse last;
  EXPECT_TRUE(wait_for_idle_cache(Clock::now(), 5s, &last)) << format_cluster_status(last);
}

TEST_F(MigrationTest, AClientThatCancelsDuringAMigrationLeavesNoPageOnEitherSide) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  std::mt19937 rng(59);
  const v1::GenerateRequest r = named(make_request(random_prompt(rng, 20, 30), 220), "cancelled");
  auto running = start_stream(r);
  const std::string source = running->first_worker.get_future().get();
  const std::string target = other_than(source);
  // Frozen, both workers hold the request and the migration until the client has cancelled.
  const std::vector<pid_t> leaders = {leader_of(job_of(source)), leader_of(job_of(target))};
  for (pid_t pid : leaders) ::kill(pid, SIGSTOP);
  v1::MigrateResponse response;
  Failure failed;
  std::thread migrate([&] {
    failed = failure_of([&] { response = admin_client().migrate("cancelled", target); });
  });
  std::this_thread::sleep_for(200ms);
  EXPECT_TRUE(client().cancel("cancelled"));
  running->thread.join();
  for (pid_t pid : leaders) ::kill(pid, SIGCONT);
  migrate.join();
  ASSERT_TRUE(running->stream.ok) << running->stream.error;
  EXPECT_EQ(running->stream.result.finish, v1::FINISH_REASON_CANCELLED);
  // Nothing was left to move: the migration ends without moving anything.
  EXPECT_TRUE(failed.code.has_value() || response.outcome() == "ended")
      << "outcome " << response.outcome();
  std::cout << "the migration: " << (failed.code ? failed.message : response.outcome()) << "\n";
  ASSERT_TRUE(wait_for_alive(2, 5s).has_value());
  v1::ListWorkersResponse last;
  EXPECT_TRUE(wait_for_idle_cache(Clock::now(), 5s, &last)) << format_cluster_status(last);
}

TEST_F(MigrationTest, DrainMovesEveryRunningRequestToTheOtherWorker) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  // 64 streams: each step runs a batch, so requests last long enough to be moved.
  const Load load = long_requests(64, 200, 61, kDeterministic);
  const std::string leaving = worker_ids_[0];
  CommandResult drained;
  const auto start = Clock::now();
  const std::vector<Stream> streams = run_load(client(), load, [&] {
    // Frozen while the drain is asked, the worker still runs every request it had.
    const pid_t leader = leader_of(job_of(leaving));
    ::kill(leader, SIGSTOP);
    drained = admin({"drain", leaving}, kControlSecret);
    ::kill(leader, SIGCONT);
  });
  // Four moves run at a time once the worker thaws, and it keeps decoding meanwhile: on a busy
  // machine a request may finish before its turn comes, and then just finishes there.
  int moved = 0, stayed = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    const std::string what = "stream " + std::to_string(i);
    expect_complete(streams[i], load.requests[i], load.expected[i], what);
    const auto& workers = streams[i].result.worker_ids;
    if (workers.front() != leaving) continue;
    ASSERT_LE(workers.size(), 2u) << what;
    if (workers.size() == 1) {
      ++stayed;
      continue;
    }
    EXPECT_EQ(workers.back(), other_than(leaving)) << what;
    ++moved;
  }
  EXPECT_EQ(drained.exit, "exit 0") << drained.output;
  EXPECT_THAT(drained.output, HasSubstr("moving")) << drained.output;
  EXPECT_GT(moved, stayed);
  std::cout << drained.output << moved << " streams moved off the drained worker, " << stayed
            << " finished there first\n";
  expect_no_pages_held(start);
}

TEST_F(MigrationTest, SigtermOnAWorkerMovesItsRequestsAndItExitsAtOnce) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs, {"--drain-timeout", "60"}));
  const Load load = long_requests(64, 200, 67, kDeterministic);
  const std::string leaving = worker_id_of(jobs_[0], 0);
  const auto leader = mpi_rank_process(jobs_[0].process->pid(), 0, 5s);
  ASSERT_TRUE(leader.has_value());
  Clock::time_point signalled;
  const std::vector<Stream> streams = run_load(client(), load, [&] {
    signalled = Clock::now();
    ::kill(leader->pid, SIGTERM);
  });
  // The coordinator hears of the drain in the worker's next heartbeat, sent at once; a
  // request that finishes before its turn to move just finishes.
  int moved = 0, stayed = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    expect_complete(streams[i], load.requests[i], load.expected[i], "stream " + std::to_string(i));
    if (streams[i].result.worker_ids.front() == leaving) {
      (streams[i].result.worker_ids.size() == 2 ? moved : stayed) += 1;
    }
  }
  EXPECT_GT(moved, 0);
  // Its requests gone elsewhere, the worker does not wait out its 60 s drain timeout.
  ASSERT_TRUE(jobs_[0].process->wait_for_exit(kStopGrace));
  EXPECT_EQ(jobs_[0].process->exit_description(), "exit 0");
  std::cout << moved << " streams moved off the SIGTERMed worker, " << stayed
            << " finished there first; its job exited " << seconds_since(signalled)
            << " s after the signal\n";
}

TEST_F(MigrationTest, APrefillGroupHandsEachRequestWithItsCacheToADecodeGroup) {
  job_extra_ = {{"--role", "prefill"}, {"--role", "decode"}};
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  const std::string prefill = worker_id_of(jobs_[0], 0), decode = worker_id_of(jobs_[1], 0);
  const auto listed = client().list_workers();
  for (const v1::WorkerStatus& w : listed.workers()) {
    EXPECT_EQ(w.role(), w.worker_id() == prefill ? "prefill" : "decode");
  }
  const Load load = long_requests(8, 200, 71, kDeterministic);
  const auto start = Clock::now();
  const std::vector<Stream> streams = run_load(client(), load, [] {});
  int handed_off = 0;
  expect_all_complete(streams, load, [&](const std::string& what, const auto& workers) {
    EXPECT_EQ(workers.front(), prefill) << what << " did not start on the prefill group";
    // The tiny model may finish a request before its hand-off comes round.
    if (workers.size() == 2 && workers.back() == decode) ++handed_off;
  });
  EXPECT_GT(handed_off, 0);
  std::cout << handed_off << " of 8 requests prefilled on " << prefill << " and decoded on "
            << decode << "\n";
  expect_no_pages_held(start);
}

}  // namespace
}  // namespace mla::e2e
