// End-to-end tests of the serving cluster (DESIGN.md section 7): a real `mlaserve coordinator`
// and worker groups under mpirun (two tensor-parallel groups of two ranks) on loopback ports,
// driven through the C++ client library.
//
// The expectation for every generation is what the offline engine produces in this process
// for the same request (greedy or seeded sampling), so a token lost, repeated or changed on
// the way (routing, relaying, cancellation, failover) fails the test.
//
// Every wait is bounded; each test starts its own cluster and stops it with SIGTERM, which
// must end every process within kStopGrace (else they are SIGKILLed and the test fails). On
// failure the processes' logs are printed.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/error.h"
#include "rpc/client.h"
#include "runtime/deepseek_model.h"
#include "runtime/engine.h"
#include "tests/e2e/process.h"

namespace mla::e2e {
namespace {

namespace v1 = mlaserve::v1;
using namespace std::chrono_literals;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;
using Tokens = std::vector<int32_t>;

constexpr int32_t kVocab = 256;        // tests/data/v3
constexpr int32_t kContext = 256;      // its max_position_embeddings
constexpr int kGroups = 2;             // every cluster here: two TP2 groups
constexpr auto kStartupTimeout = 60s;  // mpirun start-up on a loaded 2-core machine
constexpr auto kStopGrace = 10s;
constexpr auto kStreamDeadline = 120s;  // no generation here needs nearly this long
constexpr const char* kControlSecret = "e2e-test-control-plane-secret";
// The coordinator learns a worker's load from its heartbeats (every 500 ms).
constexpr auto kPagesFreedWithin = 2500ms;

std::string model_dir() { return std::string(MLA_TEST_DATA_DIR) + "/v3"; }

// mpirun as the deployment runs it (2 cores: oversubscribed, unbound), with MPI kept to
// shared memory and loopback.
// clang-format off
const std::vector<std::string> kMpiFlags = {
    "--oversubscribe", "--bind-to", "none",
    "--mca", "btl", "self,vader",         // no TCP transport between ranks
    "--mca", "oob_tcp_if_include", "lo",  // mpirun <-> ranks on loopback
};
// clang-format on
// Also set by ctest; repeated here so that the binary runs the same on its own.
const std::vector<std::string> kMpiEnv = {
    "OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1", "OPENBLAS_NUM_THREADS=1",
    "OMPI_MCA_mpi_yield_when_idle=1"};

// ---------------------------------------------------------------------------------------
// Requests and the offline reference

v1::GenerateRequest make_request(const Tokens& prompt, int32_t max_tokens,
                                 std::optional<uint64_t> seed = std::nullopt) {
  v1::GenerateRequest r;
  for (int32_t t : prompt) r.add_prompt_ids(t);
  r.set_max_tokens(max_tokens);
  r.set_ignore_eos(true);
  if (seed) {
    r.mutable_sampling()->set_temperature(0.8f);
    r.mutable_sampling()->set_top_p(0.95f);
    r.mutable_sampling()->set_seed(*seed);
  }
  return r;
}

Tokens random_prompt(std::mt19937& rng, int min_len, int max_len) {
  Tokens p(std::uniform_int_distribution<int>(min_len, max_len)(rng));
  for (int32_t& t : p) t = std::uniform_int_distribution<int32_t>(0, kVocab - 1)(rng);
  return p;
}

struct Golden {
  std::vector<Tokens> prompts;
  std::vector<Tokens> greedy;  // transformers' greedy tokens, 8 steps, eos ignored
};

const Golden& golden() {
  static const Golden g = [] {
    nlohmann::json j;
    std::ifstream(model_dir() + "/golden.json") >> j;
    Golden out;
    for (const auto& p : j["prompts"]) out.prompts.push_back(p.get<Tokens>());
    for (const auto& t : j["greedy"]) out.greedy.push_back(t.get<Tokens>());
    return out;
  }();
  return g;
}

std::shared_ptr<const DeepseekModel> offline_model() {
  static const std::shared_ptr<const DeepseekModel> m =
      DeepseekModel::load(model_dir(), {AbsorbMode::kAuto, CostModel{}, false});
  return m;
}

// The tokens the offline engine generates for `r`, run alone with the workers' cache
// settings (the defaults).
Tokens offline_tokens(const v1::GenerateRequest& r) {
  Request req;
  req.prompt.assign(r.prompt_ids().begin(), r.prompt_ids().end());
  req.max_tokens = r.max_tokens();
  req.ignore_eos = r.ignore_eos();
  req.stop_ids.assign(r.stop_ids().begin(), r.stop_ids().end());
  req.sampling.temperature = r.sampling().temperature();
  req.sampling.top_k = r.sampling().top_k();
  req.sampling.top_p = r.sampling().top_p() == 0 ? 1.0f : r.sampling().top_p();
  req.sampling.seed = r.sampling().seed();
  Engine engine(offline_model(), EngineOptions{});
  const RequestId id = engine.add_request(req);
  Tokens out;
  for (int step = 0; engine.has_work(); ++step) {
    if (step > 2 * kContext) throw std::runtime_error("offline engine does not finish");
    for (const StepOutput& o : engine.step()) {
      if (o.id == id && o.token >= 0) out.push_back(o.token);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Streams

// One Generate call as the client saw it.
struct Stream {
  GenerateResult result;
  std::vector<std::string> message_workers;  // worker_id of each message, in order
  std::vector<std::string> message_request_ids;
  bool ok = false;
  std::optional<ErrorCode> error_code;
  std::string error;
};

// Runs one Generate to its end; never throws. `on_message` sees each message after it is
// recorded.
Stream run_stream(Client& client, const v1::GenerateRequest& request,
                  std::chrono::milliseconds deadline = kStreamDeadline,
                  const std::function<void(const v1::GenerateResponse&)>& on_message = {}) {
  Stream s;
  try {
    s.result = client.generate(
        request,
        [&](const v1::GenerateResponse& m) {
          s.message_workers.push_back(m.worker_id());
          s.message_request_ids.push_back(m.request_id());
          if (on_message) on_message(m);
        },
        deadline);
    s.ok = true;
  } catch (const Error& e) {
    s.error_code = e.code();
    s.error = e.what();
  } catch (const std::exception& e) {
    s.error = e.what();
  }
  return s;
}

// What a caller learns from a failing call: the mla::Error code and message.
struct Failure {
  std::optional<ErrorCode> code;
  std::string message;
};

Failure failure_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return {e.code(), e.what()};
  } catch (const std::exception& e) {
    return {std::nullopt, e.what()};
  }
  return {std::nullopt, "(no error)"};
}

// A count that threads bring down and one thread waits on, with a timeout.
class Countdown {
 public:
  explicit Countdown(int n) : n_(n) {}
  void count_down() {
    std::lock_guard lock(mu_);
    if (--n_ <= 0) cv_.notify_all();
  }
  bool wait_for(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return n_ <= 0; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_;
};

// Sum of the samples of metric `name` (any labels) in Prometheus text from 127.0.0.1:port.
double scrape_metric(int port, const std::string& name) {
  httplib::Client http("127.0.0.1", port);
  http.set_connection_timeout(2);
  http.set_read_timeout(5);
  const auto res = http.Get("/metrics");
  if (!res || res->status != 200) {
    throw std::runtime_error("GET 127.0.0.1:" + std::to_string(port) + "/metrics failed");
  }
  double sum = 0;
  bool found = false;
  std::istringstream lines(res->body);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind(name, 0) != 0 || line.size() <= name.size()) continue;
    if (line[name.size()] != '{' && line[name.size()] != ' ') continue;
    sum += std::stod(line.substr(line.rfind(' ') + 1));
    found = true;
  }
  if (!found) throw std::runtime_error("no metric " + name + " on port " + std::to_string(port));
  return sum;
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::string join(const Tokens& t) {
  std::string s;
  for (int32_t x : t) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

// ---------------------------------------------------------------------------------------
// The cluster

enum class Layout {
  kOneJob,   // mpirun -np 4: both groups in one job
  kTwoJobs,  // two mpirun -np 2 jobs, one group each (to kill one group alone)
};

class ClusterTest : public testing::Test {
 protected:
  // One mpirun: group g serves on port_base + g.
  struct WorkerJob {
    std::unique_ptr<Process> process;
    int port_base = 0;
  };

  void SetUp() override {
    const auto* info = testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string(info->test_suite_name()) + "." + info->name();
    std::replace(name.begin(), name.end(), '/', '_');
    dir_ = testing::TempDir() + "mla_e2e_" + std::to_string(::getpid()) + "_" + name;
    std::filesystem::create_directories(dir_);
    coordinator_port_ = pick_ports(1);
    control_port_ = pick_ports(1);
    // Every process of the cluster (and `mlaserve admin`) reads the control secret from here.
    ::setenv("MLASERVE_CONTROL_SECRET", kControlSecret, 1);
  }

  void TearDown() override {
    const auto start = Clock::now();
    for (WorkerJob& job : jobs_) {
      if (!job.process->running()) continue;  // killed by the test
      const bool clean = job.process->terminate(kStopGrace, /*to_descendants=*/true);
      EXPECT_TRUE(clean) << "worker job `" << job.process->command_line()
                         << "` did not stop within " << kStopGrace.count()
                         << " s of SIGTERM to its ranks; they were killed";
      // mpirun exits 0 when every rank did.
      EXPECT_EQ(job.process->exit_description(), "exit 0") << job.process->command_line();
    }
    const double workers_s = seconds_since(start);
    // An idle client connection holds up the coordinator's exit (the test
    // CoordinatorExitsPromptlyOnSigtermWhileAClientIsConnected); not the point here.
    client_.reset();
    if (coordinator_) {
      const bool clean = coordinator_->terminate(kStopGrace);
      EXPECT_TRUE(clean) << "the coordinator did not stop within " << kStopGrace.count()
                         << " s of SIGTERM";
      EXPECT_EQ(coordinator_->exit_description(), "exit 0");
    }
    std::cout << "stopped: workers in " << workers_s << " s, coordinator in "
              << seconds_since(start) - workers_s << " s\n";
    if (HasFailure()) {
      std::vector<const Process*> all;
      for (const auto& c : old_coordinators_) all.push_back(c.get());
      if (coordinator_) all.push_back(coordinator_.get());
      for (const WorkerJob& job : jobs_) all.push_back(job.process.get());
      for (const Process* p : all) {
        std::cerr << "\n---- " << p->command_line() << " (" << p->exit_description() << "), log "
                  << p->log_path() << " ----\n"
                  << p->log_tail() << "---- end ----\n";
      }
    } else {
      std::error_code ignored;
      std::filesystem::remove_all(dir_, ignored);
    }
  }

  // `count` consecutive free loopback ports that this test has not handed out yet.
  int pick_ports(int count) {
    for (;;) {
      const int first = free_loopback_ports(count);
      bool fresh = true;
      for (int p = first; p < first + count; ++p) fresh = fresh && !used_ports_.contains(p);
      if (!fresh) continue;
      for (int p = first; p < first + count; ++p) used_ports_.insert(p);
      return first;
    }
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(coordinator_port_); }
  std::string control_address() const { return "127.0.0.1:" + std::to_string(control_port_); }

  // The client of the current coordinator.
  Client& client() { return *client_; }

  // Starts a coordinator on the test's port (the same one after a restart) and waits until it
  // listens. The client gets a new channel: an old one that saw the port refuse connections
  // would wait out gRPC's reconnect backoff (a second or more) before trying again.
  void start_coordinator() {
    if (coordinator_) old_coordinators_.push_back(std::move(coordinator_));
    const std::string log =
        dir_ + "/coordinator-" + std::to_string(old_coordinators_.size()) + ".log";
    coordinator_ = std::make_unique<Process>(
        std::vector<std::string>{MLASERVE_BIN, "coordinator", "--address", address(),
                                 "--control-address", control_address()},
        log);
    ASSERT_TRUE(wait_for_listener(coordinator_port_, kStartupTimeout))
        << "the coordinator does not listen on " << address();
    client_ = std::make_unique<Client>(address());
  }

  // Starts the worker groups. `extra` is appended to every worker's command line. With
  // kTwoJobs, the jobs are started as launch/cluster.sh does: one port base, job g with
  // `--group g`.
  void start_workers(Layout layout, const std::vector<std::string>& extra = {}) {
    const int jobs = layout == Layout::kOneJob ? 1 : 2;
    const int groups_per_job = kGroups / jobs;
    const int port_base = pick_ports(kGroups);
    for (int j = 0; j < jobs; ++j) {
      WorkerJob job;
      job.port_base = port_base + j * groups_per_job;
      std::vector<std::string> worker = {MLASERVE_BIN,    "worker",
                                         "--model",       model_dir(),
                                         "--tp",          "2",
                                         "--coordinator", control_address(),
                                         "--port-base",   std::to_string(port_base)};
      if (layout == Layout::kTwoJobs) worker.insert(worker.end(), {"--group", std::to_string(j)});
      std::vector<std::string> argv = {MLA_MPIEXEC, "-np", std::to_string(2 * groups_per_job)};
      argv.insert(argv.end(), kMpiFlags.begin(), kMpiFlags.end());
      argv.insert(argv.end(), worker.begin(), worker.end());
      argv.insert(argv.end(), extra.begin(), extra.end());
      job.process =
          std::make_unique<Process>(argv, dir_ + "/workers-" + std::to_string(j) + ".log", kMpiEnv);
      jobs_.push_back(std::move(job));
    }
  }

  // Polls the coordinator until exactly `n` workers are alive: the listing; nothing when
  // `timeout` passes first or a process of the cluster has exited.
  std::optional<v1::ListWorkersResponse> wait_for_alive(int n, std::chrono::milliseconds timeout) {
    const auto end = Clock::now() + timeout;
    while (Clock::now() < end) {
      try {
        v1::ListWorkersResponse list = client().list_workers();
        const auto alive = std::count_if(list.workers().begin(), list.workers().end(),
                                         [](const auto& w) { return w.state() == "alive"; });
        if (alive == n) return list;
      } catch (const Error&) {
        // not listening yet
      }
      // A process that exited will not come back: no point waiting out the timeout.
      if (coordinator_ && !coordinator_->running()) return std::nullopt;
      for (WorkerJob& job : jobs_) {
        if (!job.process->running()) return std::nullopt;
      }
      std::this_thread::sleep_for(50ms);
    }
    return std::nullopt;
  }

  // Coordinator + both groups, registered and alive.
  void start_cluster(Layout layout, const std::vector<std::string>& worker_extra = {}) {
    const auto start = Clock::now();
    ASSERT_NO_FATAL_FAILURE(start_coordinator());
    start_workers(layout, worker_extra);
    const auto list = wait_for_alive(kGroups, kStartupTimeout);
    ASSERT_TRUE(list.has_value()) << "the worker groups did not register within "
                                  << kStartupTimeout.count() << " s";
    for (const v1::WorkerStatus& w : list->workers()) worker_ids_.push_back(w.worker_id());
    std::cout << "cluster up in " << seconds_since(start) << " s\n";
  }

  // The worker id ("127.0.0.1:<port>") of a job's group g.
  static std::string worker_id_of(const WorkerJob& job, int g) {
    return "127.0.0.1:" + std::to_string(job.port_base + g);
  }

  // Waits until every alive worker reports, in a heartbeat sent after `since` (an older one
  // may predate what the test did), all its pages free and nothing running or waiting, and
  // the coordinator has nothing in flight; true when that happened within `timeout` of
  // `since`. `last` gets the last listing.
  bool wait_for_idle_cache(Clock::time_point since, std::chrono::milliseconds timeout,
                           v1::ListWorkersResponse* last) {
    const auto end = since + timeout;
    for (;;) {
      *last = client().list_workers();
      const auto received = Clock::now();
      bool idle = last->in_flight() == 0;
      for (const v1::WorkerStatus& w : last->workers()) {
        if (w.state() != "alive") continue;
        const auto heartbeat_at =
            received - std::chrono::duration_cast<Clock::duration>(
                           std::chrono::duration<double, std::milli>(w.ms_since_heartbeat()));
        idle = idle && heartbeat_at > since && w.load().total_pages() > 0 &&
               w.load().free_pages() == w.load().total_pages() && w.load().running() == 0 &&
               w.load().waiting() == 0 && w.in_flight() == 0;
      }
      if (idle) return true;
      if (Clock::now() >= end) return false;
      std::this_thread::sleep_for(20ms);
    }
  }

  std::string dir_;
  int coordinator_port_ = 0;
  int control_port_ = 0;
  std::set<int> used_ports_;
  std::unique_ptr<Process> coordinator_;
  std::vector<std::unique_ptr<Process>> old_coordinators_;
  std::vector<WorkerJob> jobs_;
  std::vector<std::string> worker_ids_;  // as first registered
  std::unique_ptr<Client> client_;
};

// Checks a finished stream against the offline tokens: complete, in order, one request id,
// usage and finish reason right.
void expect_complete(const Stream& s, const v1::GenerateRequest& request, const Tokens& expected,
                     const std::string& what) {
  SCOPED_TRACE(what);
  ASSERT_TRUE(s.ok) << s.error;
  EXPECT_EQ(s.result.tokens, expected)
      << "prompt " << join(Tokens(request.prompt_ids().begin(), request.prompt_ids().end()));
  EXPECT_EQ(s.result.finish, v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(s.result.usage.prompt_tokens(), request.prompt_ids_size());
  EXPECT_EQ(s.result.usage.completion_tokens(), request.max_tokens());
  EXPECT_FALSE(s.result.request_id.empty());
  for (const std::string& id : s.message_request_ids) EXPECT_EQ(id, s.result.request_id);
  for (const std::string& w : s.message_workers) EXPECT_FALSE(w.empty());
}

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

  // Cancel of an id that never ran.
  EXPECT_FALSE(client().cancel("no-such-request"));
  EXPECT_FALSE(client().cancel(""));

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
