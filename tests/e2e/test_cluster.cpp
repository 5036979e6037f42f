// End-to-end tests of the serving cluster (tests/e2e/cluster_fixture.h): streams, early
// ends, bad input, killed groups and restarted coordinators.
#include <signal.h>

#include "tests/e2e/cluster_fixture.h"

namespace mla::e2e {
namespace {

using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------
// 1. Many concurrent streams

TEST_F(ClusterTest, SixtyFourConcurrentStreamsMatchTheOfflineEngineAndUseBothGroups) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kOneJob));

  constexpr int kStreams = 64;
  std::mt19937 rng(2024);
  std::vector<v1::GenerateRequest> requests;
  std::vector<Tokens> expected;
  for (int i = 0; i < kStreams; ++i) {
    // Prompts of 1..48 tokens; every other request samples (its own seed), every fourth
    // also with top-k.
    v1::GenerateRequest r = make_request(random_prompt(rng, 1, 48), 12 + i % 9,
                                         i % 2 == 1 ? std::optional<uint64_t>(i) : std::nullopt);
    if (i % 4 == 3) r.mutable_sampling()->set_top_k(40);
    expected.push_back(offline_tokens(r));
    ASSERT_EQ(expected.back().size(), static_cast<size_t>(r.max_tokens()));
    requests.push_back(std::move(r));
  }

  std::vector<Stream> streams(kStreams);
  Countdown ready(kStreams);
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  const auto start = Clock::now();
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      ready.count_down();
      while (!go.load()) std::this_thread::yield();
      streams[i] = run_stream(client(), requests[i]);
    });
  }
  ASSERT_TRUE(ready.wait_for(30s));
  go = true;
  for (std::thread& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  std::map<std::string, int> per_worker;
  for (int i = 0; i < kStreams; ++i) {
    expect_complete(streams[i], requests[i], expected[i], "stream " + std::to_string(i));
    EXPECT_EQ(streams[i].result.worker_ids.size(), 1u)
        << "stream " << i << " moved between workers";
    for (const std::string& w : streams[i].result.worker_ids) ++per_worker[w];
  }
  EXPECT_EQ(per_worker.size(), static_cast<size_t>(kGroups)) << "not every group served requests";
  for (const auto& [w, n] : per_worker) {
    EXPECT_THAT(worker_ids_, testing::Contains(w));
    std::cout << "worker " << w << ": " << n << " streams\n";
  }
  std::cout << kStreams << " streams in " << seconds << " s\n";

  v1::ListWorkersResponse last;
  EXPECT_TRUE(wait_for_idle_cache(Clock::now(), kPagesFreedWithin, &last))
      << format_cluster_status(last);
}

// ---------------------------------------------------------------------------------------
// 2. Ending a stream early frees the worker's pages at once

enum class EarlyEnd { kCancelRpc, kClientDeadline, kClientAbandons };

const char* name_of(EarlyEnd e) {
  switch (e) {
    case EarlyEnd::kCancelRpc:
      return "CancelRpc";
    case EarlyEnd::kClientDeadline:
      return "ClientDeadline";
    case EarlyEnd::kClientAbandons:
      return "ClientAbandons";
  }
  return "unknown";
}
void PrintTo(EarlyEnd e, std::ostream* os) { *os << name_of(e); }
std::string early_end_name(const testing::TestParamInfo<EarlyEnd>& info) {
  return name_of(info.param);
}

class EarlyEndTest : public ClusterTest, public testing::WithParamInterface<EarlyEnd> {};

TEST_P(EarlyEndTest, FreesTheWorkersPagesAndStopsGenerating) {
  // The workers' /metrics show how many tokens they generated: a request whose worker was
  // not told would run to max_tokens.
  const int metrics_base = pick_ports(kGroups);
  const std::string config = dir_ + "/workers.yaml";
  std::ofstream(config) << "model: " << model_dir()
                        << "\nworkers:\n  metrics_port_base: " << metrics_base << "\n";
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kOneJob, {"--config", config}));
  auto tokens_generated = [&] {
    double sum = 0;
    for (int g = 0; g < kGroups; ++g) {
      sum += scrape_metric(metrics_base + g, "mlaserve_tokens_generated_total");
    }
    return sum;
  };
  auto pages_used = [&] {
    double sum = 0;
    for (int g = 0; g < kGroups; ++g)
      sum += scrape_metric(metrics_base + g, "mlaserve_cache_pages_used");
    return sum;
  };
  const double generated_before = tokens_generated();

  // The whole context: hundreds of decode steps, far longer than ending it takes.
  std::mt19937 rng(7);
  constexpr int32_t kMaxTokens = kContext - 16;
  v1::GenerateRequest request = make_request(random_prompt(rng, 16, 16), kMaxTokens);
  request.set_request_id("end-me-early");
  const Tokens expected = offline_tokens(request);

  constexpr size_t kTokensBeforeEnd = 3;
  std::mutex mu;
  std::condition_variable cv;
  Tokens received;  // as the messages arrived, whatever the call's outcome
  Stream stream;
  std::thread caller([&] {
    const auto deadline = GetParam() == EarlyEnd::kClientDeadline ? 40ms : kStreamDeadline;
    stream = run_stream(client(), request, deadline, [&](const v1::GenerateResponse& m) {
      size_t now = 0;
      {
        std::lock_guard lock(mu);
        received.insert(received.end(), m.token_ids().begin(), m.token_ids().end());
        now = received.size();
      }
      cv.notify_all();
      if (GetParam() == EarlyEnd::kClientAbandons && now >= kTokensBeforeEnd) {
        throw std::runtime_error("client abandons the stream");
      }
    });
  });
  if (GetParam() == EarlyEnd::kCancelRpc) {
    {
      std::unique_lock lock(mu);
      EXPECT_TRUE(cv.wait_for(lock, 30s, [&] { return received.size() >= kTokensBeforeEnd; }));
    }
    EXPECT_TRUE(client().cancel("end-me-early"));
  }
  caller.join();
  const auto ended = Clock::now();

  // The stream ended early, the right way, with a prefix of the offline tokens.
  switch (GetParam()) {
    case EarlyEnd::kCancelRpc:
      ASSERT_TRUE(stream.ok) << stream.error;
      EXPECT_EQ(stream.result.finish, v1::FINISH_REASON_CANCELLED);
      EXPECT_EQ(stream.result.request_id, "end-me-early");
      EXPECT_EQ(stream.result.tokens, received);
      EXPECT_EQ(stream.result.usage.completion_tokens(), static_cast<int32_t>(received.size()));
      break;
    case EarlyEnd::kClientDeadline:
      ASSERT_FALSE(stream.ok);
      EXPECT_EQ(stream.error_code, ErrorCode::kDeadlineExceeded) << stream.error;
      EXPECT_THAT(stream.error, HasSubstr("DEADLINE_EXCEEDED"));
      break;
    case EarlyEnd::kClientAbandons:
      ASSERT_FALSE(stream.ok);
      EXPECT_EQ(stream.error, "client abandons the stream");
      break;
  }
  ASSERT_LT(received.size(), expected.size());
  EXPECT_EQ(received, Tokens(expected.begin(), expected.begin() + received.size()));

  v1::ListWorkersResponse last;
  EXPECT_TRUE(wait_for_idle_cache(ended, kPagesFreedWithin, &last))
      << "pages not freed within " << kPagesFreedWithin.count() << " ms of the end:\n"
      << format_cluster_status(last);
  // Nothing in flight any more (wait_for_idle_cache saw it), so nothing to cancel.
  EXPECT_FALSE(client().cancel("end-me-early"));
  const double freed_ms = std::chrono::duration<double, std::milli>(Clock::now() - ended).count();
  std::cout << "pages free " << freed_ms << " ms after the stream ended, " << received.size()
            << " tokens received\n";
  EXPECT_EQ(pages_used(), 0);
  const double generated = tokens_generated() - generated_before;
  EXPECT_LT(generated, kMaxTokens) << "the worker generated the whole request";
  EXPECT_GE(generated, static_cast<double>(received.size()));

  // The cluster still serves.
  const v1::GenerateRequest next = make_request(golden().prompts[0], 8);
  const Stream after = run_stream(client(), next);
  expect_complete(after, next, golden().greedy[0], "request after the early end");
}

INSTANTIATE_TEST_SUITE_P(Cluster, EarlyEndTest,
                         testing::Values(EarlyEnd::kCancelRpc, EarlyEnd::kClientDeadline,
                                         EarlyEnd::kClientAbandons),
                         early_end_name);

// ---------------------------------------------------------------------------------------
// 3. Bad input

TEST_F(ClusterTest, BadInputGetsAnErrorSayingWhatIsWrongAndTheClusterKeepsServing) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kOneJob));
  const Tokens prompt = golden().prompts[0];

  struct Case {
    std::string what;
    v1::GenerateRequest request;
    std::vector<std::string> message_has;  // besides "INVALID_ARGUMENT: "
  };
  std::vector<Case> cases;
  auto add = [&](std::string what, std::function<void(v1::GenerateRequest&)> edit,
                 std::vector<std::string> message_has) {
    v1::GenerateRequest r = make_request(prompt, 8);
    edit(r);
    cases.push_back({std::move(what), std::move(r), std::move(message_has)});
  };
  add("empty prompt", [](auto& r) { r.clear_prompt_ids(); }, {"prompt_ids", "empty"});
  add("token id = vocab size", [](auto& r) { r.set_prompt_ids(1, kVocab); },
      {"prompt_ids[1]", "256", "vocabulary"});
  add("negative token id", [](auto& r) { r.set_prompt_ids(0, -3); },
      {"prompt_ids[0]", "-3", "vocabulary"});
  add("max_tokens 0", [](auto& r) { r.set_max_tokens(0); }, {"max_tokens", ">= 1", "0"});
  add("negative max_tokens", [](auto& r) { r.set_max_tokens(-5); }, {"max_tokens", "-5"});
  add("prompt + max_tokens beyond the context",
      [](auto& r) { r.set_max_tokens(kContext - r.prompt_ids_size() + 1); },
      {"max_tokens", "context", "256"});
  add("prompt longer than the context",
      [](auto& r) {
        r.clear_prompt_ids();
        for (int i = 0; i < kContext + 1; ++i) r.add_prompt_ids(i % kVocab);
        r.set_max_tokens(1);
      },
      {"257", "context", "256"});
  add("negative temperature", [](auto& r) { r.mutable_sampling()->set_temperature(-0.5f); },
      {"temperature", "-0.5"});
  add("NaN temperature", [](auto& r) { r.mutable_sampling()->set_temperature(NAN); },
      {"temperature"});
  add("top_p above 1", [](auto& r) { r.mutable_sampling()->set_top_p(1.5f); }, {"top_p", "1.5"});
  add("negative top_p", [](auto& r) { r.mutable_sampling()->set_top_p(-0.1f); }, {"top_p"});
  add("negative top_k", [](auto& r) { r.mutable_sampling()->set_top_k(-1); }, {"top_k", "-1"});
  add("top_k beyond the vocabulary", [](auto& r) { r.mutable_sampling()->set_top_k(kVocab + 1); },
      {"top_k", "257"});
  add("stop id outside the vocabulary", [](auto& r) { r.add_stop_ids(kVocab + 7); },
      {"stop_ids[0]", "263"});
  add("request_id too long", [](auto& r) { r.set_request_id(std::string(200, 'x')); },
      {"request_id", "200"});
  add("request_id not printable", [](auto& r) { r.set_request_id("a\nb"); }, {"request_id"});
  add("request_id not UTF-8", [](auto& r) { r.set_request_id("id-\xff\xfe"); },
      {"request_id", "printable"});
  add("resume_ids from a client", [](auto& r) { r.add_resume_ids(5); }, {"resume_ids"});

  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const Failure f = failure_of([&] { client().generate(c.request, {}, 30s); });
    EXPECT_EQ(f.code, ErrorCode::kInvalidArgument) << f.message;
    EXPECT_THAT(f.message, testing::StartsWith("INVALID_ARGUMENT: "));
    for (const std::string& s : c.message_has) EXPECT_THAT(f.message, HasSubstr(s));
  }

  // A request id already in flight.
  {
    v1::GenerateRequest long_request = make_request(prompt, kContext - 8);
    long_request.set_request_id("taken");
    Countdown first_token(1);
    Stream first;
    std::thread t([&] {
      first = run_stream(client(), long_request, kStreamDeadline,
                         [&, once = false](const v1::GenerateResponse& m) mutable {
                           if (!once && m.token_ids_size() > 0) first_token.count_down();
                           once = once || m.token_ids_size() > 0;
                         });
    });
    EXPECT_TRUE(first_token.wait_for(30s));
    v1::GenerateRequest again = make_request(prompt, 4);
    again.set_request_id("taken");
    const Failure f = failure_of([&] { client().generate(again, {}, 30s); });
    EXPECT_THAT(f.message, testing::StartsWith("ALREADY_EXISTS: "));
    EXPECT_THAT(f.message, HasSubstr("taken"));
    EXPECT_TRUE(client().cancel("taken"));
    t.join();
    EXPECT_TRUE(first.ok) << first.error;
    EXPECT_EQ(first.result.finish, v1::FINISH_REASON_CANCELLED);
  }

  // A burst of refused requests does not flood the logs (refusals log at debug level; the
  // metrics count them).
  {
    const auto lines = [&] {
      const std::string log = coordinator_->log_tail(1 << 24);
      return std::count(log.begin(), log.end(), '\n');
    };
    const auto before = lines();
    v1::GenerateRequest bad = make_request(prompt, 8);
    bad.set_max_tokens(0);
    for (int i = 0; i < 500; ++i) failure_of([&] { client().generate(bad, {}, 30s); });
    EXPECT_LT(lines() - before, 5) << "500 refused requests were logged line by line";
  }

  // Cancel of an id that never ran.
  EXPECT_FALSE(client().cancel("no-such-request"));
  EXPECT_FALSE(client().cancel(""));
  EXPECT_FALSE(client().cancel("id-\xff\xfe"));

  // A message over the 64 MiB limit: 34 Mi ids of two bytes each.
  {
    v1::GenerateRequest huge = make_request({}, 8);
    huge.mutable_prompt_ids()->Resize(34 << 20, 200);
    ASSERT_GT(huge.ByteSizeLong(), size_t{64} << 20);
    const Failure f = failure_of([&] { client().generate(huge, {}, 60s); });
    std::cout << huge.ByteSizeLong() << "-byte request: " << f.message << "\n";
    ASSERT_TRUE(f.code.has_value()) << f.message;
    EXPECT_THAT(*f.code, testing::AnyOf(ErrorCode::kResourceExhausted, ErrorCode::kInvalidArgument))
        << f.message;
    EXPECT_THAT(f.message, testing::AnyOf(HasSubstr("larger than max"), HasSubstr("prompt_ids")));
  }

  // Nothing above disturbed the cluster.
  const auto list = wait_for_alive(kGroups, 5s);
  ASSERT_TRUE(list.has_value()) << "a worker died";
  for (size_t i = 0; i < golden().prompts.size(); ++i) {
    const v1::GenerateRequest r = make_request(golden().prompts[i], 8);
    expect_complete(run_stream(client(), r), r, golden().greedy[i],
                    "golden prompt " + std::to_string(i));
  }
  v1::ListWorkersResponse last;
  EXPECT_TRUE(wait_for_idle_cache(Clock::now(), kPagesFreedWithin, &last))
      << format_cluster_status(last);
}

// ---------------------------------------------------------------------------------------
// 4. A worker group killed mid-generation

// What the test SIGKILLs in one group: its whole job, its leader rank or its follower rank.
// With one mpirun job per group, Open MPI ends the rest of the victim's job and nothing else.
enum class Victim { kWholeJob, kLeader, kFollower };

const char* name_of(Victim v) {
  switch (v) {
    case Victim::kWholeJob:
      return "WholeJob";
    case Victim::kLeader:
      return "Leader";
    case Victim::kFollower:
      return "Follower";
  }
  return "unknown";
}
void PrintTo(Victim v, std::ostream* os) { *os << name_of(v); }

class KillTest : public ClusterTest, public testing::WithParamInterface<Victim> {};

TEST_P(KillTest, KillingPartOfAGroupMidGenerationLosesNoTokenAndLeavesTheOtherGroupServing) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  ASSERT_EQ(jobs_.size(), 2u);

  constexpr int kStreams = 16;
  std::mt19937 rng(99);
  std::vector<v1::GenerateRequest> requests;
  std::vector<Tokens> expected;
  for (int i = 0; i < kStreams; ++i) {
    // Long generations (kill latency is a few ms; each stream runs for hundreds of steps).
    v1::GenerateRequest r =
        make_request(random_prompt(rng, 4, 40), 200,
                     i % 2 == 1 ? std::optional<uint64_t>(100 + i) : std::nullopt);
    expected.push_back(offline_tokens(r));
    requests.push_back(std::move(r));
  }

  // Where each stream's latest tokens came from, while they run.
  std::mutex mu;
  std::vector<std::string> current_worker(kStreams);
  std::vector<std::optional<Clock::time_point>> moved_at(kStreams);  // first token elsewhere
  std::vector<bool> done(kStreams, false);
  Countdown first_tokens(kStreams);
  std::vector<Stream> streams(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      bool first = true;
      streams[i] =
          run_stream(client(), requests[i], kStreamDeadline, [&](const v1::GenerateResponse& m) {
            if (m.token_ids_size() == 0) return;
            {
              std::lock_guard lock(mu);
              if (!current_worker[i].empty() && current_worker[i] != m.worker_id()) {
                moved_at[i] = Clock::now();
              }
              current_worker[i] = m.worker_id();
              if (m.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
                done[i] = true;
              }
            }
            if (first) first_tokens.count_down();
            first = false;
          });
      if (first) first_tokens.count_down();  // failed before any token: don't hold the test
    });
  }
  const bool all_started = first_tokens.wait_for(60s);

  // Kill the group with the most unfinished streams: its mpirun and both ranks, SIGKILL.
  std::map<std::string, int> running_on;
  {
    std::lock_guard lock(mu);
    for (int i = 0; i < kStreams; ++i) {
      if (!done[i] && !current_worker[i].empty()) ++running_on[current_worker[i]];
    }
  }
  int victim = 0;
  if (running_on[worker_id_of(jobs_[1], 0)] > running_on[worker_id_of(jobs_[0], 0)]) victim = 1;
  const std::string victim_id = worker_id_of(jobs_[victim], 0);
  const std::string survivor_id = worker_id_of(jobs_[1 - victim], 0);
  std::optional<ProcId> rank;  // the rank to kill, found before the clock starts
  if (GetParam() != Victim::kWholeJob) {
    rank =
        mpi_rank_process(jobs_[victim].process->pid(), GetParam() == Victim::kLeader ? 0 : 1, 5s);
    ASSERT_TRUE(rank.has_value()) << "no rank process under mpirun";
  }
  const auto killed_at = Clock::now();
  if (rank) {
    ::kill(rank->pid, SIGKILL);
  } else {
    jobs_[victim].process->kill_tree();
  }
  for (std::thread& t : threads) t.join();
  const double recovery_s = seconds_since(killed_at);
  ASSERT_TRUE(all_started) << "not every stream got a first token within 60 s";
  double slowest_move_s = 0;
  for (const auto& t : moved_at) {
    if (t)
      slowest_move_s =
          std::max(slowest_move_s, std::chrono::duration<double>(*t - killed_at).count());
  }
  std::cout << "killed " << victim_id << " with " << running_on[victim_id]
            << " of its streams unfinished; the last moved stream's first token elsewhere "
            << slowest_move_s << " s later, all streams done " << recovery_s << " s later\n";
  ASSERT_GT(running_on[victim_id], 0) << "nothing was running on either group";

  int moved = 0;
  for (int i = 0; i < kStreams; ++i) {
    const Stream& s = streams[i];
    expect_complete(s, requests[i], expected[i], "stream " + std::to_string(i));
    if (s.result.worker_ids.size() > 1) {
      ++moved;
      // Once moved, the stream stays on the survivor.
      EXPECT_EQ(s.result.worker_ids, (std::vector<std::string>{victim_id, survivor_id}))
          << "stream " << i;
    }
  }
  EXPECT_GT(moved, 0) << "no stream failed over: the kill came after the victim's streams ended";

  // The coordinator marks the killed group dead (a broken stream, or 1.5 s of silence).
  const auto end = Clock::now() + 5s;
  std::string victim_state;
  while (Clock::now() < end) {
    const v1::ListWorkersResponse list = client().list_workers();
    for (const v1::WorkerStatus& w : list.workers()) {
      if (w.worker_id() == victim_id) victim_state = w.state();
    }
    if (victim_state == "dead") break;
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_EQ(victim_state, "dead");
  const v1::HealthResponse health = client().health();
  EXPECT_TRUE(health.serving());
  EXPECT_EQ(health.workers_alive(), 1);

  // New requests go to the survivor.
  const v1::GenerateRequest r = make_request(golden().prompts[1], 8);
  const Stream after = run_stream(client(), r);
  expect_complete(after, r, golden().greedy[1], "request after the kill");
  EXPECT_EQ(after.result.worker_ids, std::vector<std::string>{survivor_id});

  // Open MPI ends the rest of the victim's job; the other job runs on untouched.
  EXPECT_TRUE(jobs_[victim].process->wait_for_exit(kStopGrace)) << "the victim's mpirun still runs";
  EXPECT_TRUE(jobs_[1 - victim].process->running()) << "the survivor's job ended";
}

INSTANTIATE_TEST_SUITE_P(Cluster, KillTest,
                         testing::Values(Victim::kWholeJob, Victim::kLeader, Victim::kFollower),
                         [](const testing::TestParamInfo<Victim>& info) {
                           return std::string(name_of(info.param));
                         });

// ---------------------------------------------------------------------------------------
// 5. Coordinator restart

// A worker finds a restarted coordinator within max_backoff_ms (CoordinatorLinkOptions:
// 500 ms) and one registration round trip: well within a second.
constexpr auto kReregistrationBound = 1000ms;

TEST_F(ClusterTest, WorkersReRegisterWithARestartedCoordinator) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kOneJob));
  const v1::GenerateRequest r = make_request(golden().prompts[2], 8);
  expect_complete(run_stream(client(), r), r, golden().greedy[2], "before any restart");

  struct Round {
    const char* what;
    int signal;
    std::chrono::milliseconds down;  // how long no coordinator listens
  };
  for (const Round& round : {Round{"SIGKILL, restarted at once", SIGKILL, 0ms},
                             Round{"SIGTERM, restarted at once", SIGTERM, 0ms},
                             Round{"SIGKILL, restarted after 2 s", SIGKILL, 2000ms}}) {
    SCOPED_TRACE(round.what);
    // An idle client connection holds up a SIGTERMed coordinator's exit (see
    // CoordinatorExitsPromptlyOnSigtermWhileAClientIsConnected), which would lengthen the
    // outage; start_coordinator() makes a new client.
    client_.reset();
    const auto signalled = Clock::now();
    coordinator_->signal(round.signal);
    ASSERT_TRUE(coordinator_->wait_for_exit(kStopGrace)) << "the coordinator did not exit";
    if (round.signal == SIGTERM) {
      EXPECT_EQ(coordinator_->exit_description(), "exit 0");
    }
    std::this_thread::sleep_for(round.down);
    const double down_s = seconds_since(signalled);
    ASSERT_NO_FATAL_FAILURE(start_coordinator());
    const auto restarted = Clock::now();
    const auto list = wait_for_alive(kGroups, 15s);
    ASSERT_TRUE(list.has_value()) << "the workers did not re-register";
    const double seconds = seconds_since(restarted);
    std::cout << round.what << ": down " << down_s << " s; both workers alive again " << seconds
              << " s after the restart\n";
    EXPECT_LT(seconds, kReregistrationBound.count() / 1000.0) << "re-registration took too long";
    std::vector<std::string> ids;
    for (const v1::WorkerStatus& w : list->workers()) ids.push_back(w.worker_id());
    EXPECT_THAT(ids, testing::UnorderedElementsAreArray(worker_ids_));
    expect_complete(run_stream(client(), r), r, golden().greedy[2], "after the restart");
  }
}

// A coordinator asked to stop must not wait for its clients to hang up: restarts (and the
// workers' re-registration after them) would wait for it.
TEST_F(ClusterTest, CoordinatorExitsPromptlyOnSigtermWhileAClientIsConnected) {
  ASSERT_NO_FATAL_FAILURE(start_coordinator());
  const v1::HealthResponse health = client().health();  // the client's connection is open now
  EXPECT_FALSE(health.serving());
  const auto signalled = Clock::now();
  coordinator_->signal(SIGTERM);
  ASSERT_TRUE(coordinator_->wait_for_exit(kStopGrace));
  const double seconds = seconds_since(signalled);
  EXPECT_EQ(coordinator_->exit_description(), "exit 0");
  EXPECT_LT(seconds, 1.0) << "the coordinator took " << seconds << " s to exit after SIGTERM";
}

}  // namespace
}  // namespace mla::e2e
