// The end-to-end cluster fixture: a real `mlaserve coordinator` and worker groups under
// mpirun (two tensor-parallel groups of two ranks) on loopback ports, driven through the C++
// client library, with the offline engine's tokens as the expectation for every generation
// (greedy or seeded sampling), so a token lost, repeated or changed on the way (routing,
// relaying, cancellation, failover) fails a test.
//
// Every wait is bounded; each test starts its own cluster and stops it with SIGTERM, which
// must end every process within kStopGrace (else they are SIGKILLed and the test fails). On
// failure the processes' logs are printed.
#pragma once

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

namespace v1 = mlaserve::v1;
using namespace std::chrono_literals;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;
using Tokens = std::vector<int32_t>;

inline constexpr int32_t kVocab = 256;        // tests/data/v3
inline constexpr int32_t kContext = 256;      // its max_position_embeddings
inline constexpr int kGroups = 2;             // every cluster here: two groups (TP2 by default)
inline constexpr auto kStartupTimeout = 60s;  // mpirun start-up on a loaded 2-core machine
inline constexpr auto kStopGrace = 10s;
inline constexpr auto kStreamDeadline = 120s;  // no generation here needs nearly this long
inline constexpr const char* kControlSecret = "e2e-test-control-plane-secret";
// The coordinator learns a worker's load from its heartbeats (every 500 ms).
inline constexpr auto kPagesFreedWithin = 2500ms;

inline std::string model_dir() { return std::string(MLA_TEST_DATA_DIR) + "/v3"; }

// mpirun as the deployment runs it (2 cores: oversubscribed, unbound), with MPI kept to
// shared memory and loopback.
// clang-format off
inline const std::vector<std::string> kMpiFlags = {
    "--oversubscribe", "--bind-to", "none",
    "--mca", "btl", "self,vader",         // no TCP transport between ranks
    "--mca", "oob_tcp_if_include", "lo",  // mpirun <-> ranks on loopback
};
// clang-format on
// Also set by ctest; repeated here so that the binary runs the same on its own.
inline const std::vector<std::string> kMpiEnv = {
    "OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1", "OPENBLAS_NUM_THREADS=1",
    "OMPI_MCA_mpi_yield_when_idle=1"};

// ---------------------------------------------------------------------------------------
// Requests and the offline reference

inline v1::GenerateRequest make_request(const Tokens& prompt, int32_t max_tokens,
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

inline Tokens random_prompt(std::mt19937& rng, int min_len, int max_len) {
  Tokens p(std::uniform_int_distribution<int>(min_len, max_len)(rng));
  for (int32_t& t : p) t = std::uniform_int_distribution<int32_t>(0, kVocab - 1)(rng);
  return p;
}

struct Golden {
  std::vector<Tokens> prompts;
  std::vector<Tokens> greedy;  // transformers' greedy tokens, 8 steps, eos ignored
};

inline const Golden& golden() {
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

// The offline model; `deterministic`: with batch-invariant products, `cache`: the cache's
// element (ModelOptions).
inline std::shared_ptr<const DeepseekModel> offline_model(bool deterministic = false,
                                                          CacheDType cache = CacheDType::kAuto) {
  static std::map<std::pair<bool, CacheDType>, std::shared_ptr<const DeepseekModel>> models;
  static std::mutex mu;
  std::lock_guard lock(mu);
  auto& m = models[{deterministic, cache}];
  if (!m) {
    ModelOptions o;
    o.show_progress = false;
    o.deterministic = deterministic;
    o.cache_dtype = cache;
    m = DeepseekModel::load(model_dir(), o);
  }
  return m;
}

// The tokens the offline engine generates for `r`, run alone with the workers' cache
// settings (the defaults); `deterministic` as the workers' --deterministic, `cache` as their
// --cache-dtype.
inline Tokens offline_tokens(const v1::GenerateRequest& r, bool deterministic = false,
                             CacheDType cache = CacheDType::kAuto) {
  Request req;
  req.prompt.assign(r.prompt_ids().begin(), r.prompt_ids().end());
  req.max_tokens = r.max_tokens();
  req.ignore_eos = r.ignore_eos();
  req.stop_ids.assign(r.stop_ids().begin(), r.stop_ids().end());
  req.sampling.temperature = r.sampling().temperature();
  req.sampling.top_k = r.sampling().top_k();
  req.sampling.top_p = r.sampling().top_p() == 0 ? 1.0f : r.sampling().top_p();
  req.sampling.seed = r.sampling().seed();
  Engine engine(offline_model(deterministic, cache), EngineOptions{});
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
inline Stream run_stream(Client& client, const v1::GenerateRequest& request,
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

inline Failure failure_of(const std::function<void()>& fn) {
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
inline double scrape_metric(int port, const std::string& name) {
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

inline double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

inline std::string join(const Tokens& t) {
  std::string s;
  for (int32_t x : t) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

// `n` long requests (greedy and seeded), with the offline engine's tokens for each (with
// `deterministic`, the batch-invariant engine's).
struct Load {
  std::vector<v1::GenerateRequest> requests;
  std::vector<Tokens> expected;
};

inline Load long_requests(int n, int32_t max_tokens, uint32_t seed, bool deterministic = false,
                          CacheDType cache = CacheDType::kAuto) {
  Load load;
  std::mt19937 rng(seed);
  for (int i = 0; i < n; ++i) {
    v1::GenerateRequest r =
        make_request(random_prompt(rng, 4, 40), max_tokens,
                     i % 2 == 1 ? std::optional<uint64_t>(seed + i) : std::nullopt);
    load.expected.push_back(offline_tokens(r, deterministic, cache));
    load.requests.push_back(std::move(r));
  }
  return load;
}

// Runs every request of `load` on its own thread through `client`; `act` runs once every
// stream has its first token (or failed before one). Returns the streams.
inline std::vector<Stream> run_load(Client& client, const Load& load,
                                    const std::function<void()>& act) {
  const int n = static_cast<int>(load.requests.size());
  std::vector<Stream> streams(n);
  Countdown first_tokens(n);
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      bool first = true;
      streams[i] =
          run_stream(client, load.requests[i], kStreamDeadline, [&](const v1::GenerateResponse& m) {
            if (first && m.token_ids_size() > 0) first_tokens.count_down();
            first = first && m.token_ids_size() == 0;
          });
      if (first) first_tokens.count_down();
    });
  }
  EXPECT_TRUE(first_tokens.wait_for(60s)) << "not every stream got a first token";
  act();
  for (std::thread& t : threads) t.join();
  return streams;
}

// A command's exit and output (stdout and stderr together).
struct CommandResult {
  std::string exit;
  std::string output;
};

// A file's whole text (a process's log); empty if it cannot be read.
inline std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

inline CommandResult run_command(const std::vector<std::string>& argv, const std::string& log,
                                 const std::vector<std::string>& env = {},
                                 std::chrono::milliseconds timeout = 60s) {
  Process p(argv, log, env);
  if (!p.wait_for_exit(timeout)) p.kill_tree();
  return {p.exit_description(), read_file(log)};
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
      // mpirun exits 0 when every rank did; its log's warnings and errors say which did not
      // (the whole log follows, but a long test output may lose its middle).
      EXPECT_EQ(job.process->exit_description(), "exit 0")
          << job.process->command_line() << "\n"
          << notable_lines(job.process->log_path());
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

  // The lines of a process log that tell why it failed: spdlog warnings and errors, and what
  // mpirun and the C++ runtime print about ranks that exited early (at most 40 lines).
  static std::string notable_lines(const std::string& log_path) {
    static const char* kMarks[] = {
        "[warning]", "[error]",   "[critical]", "error:",  "exit code", "signal",
        "terminate", "MPI_ABORT", "mpirun",     "prterun", "Aborted",   "finalize"};
    std::ifstream in(log_path);
    std::string out, line;
    int kept = 0;
    while (std::getline(in, line) && kept < 40) {
      for (const char* mark : kMarks) {
        if (line.find(mark) != std::string::npos) {
          out += line + "\n";
          ++kept;
          break;
        }
      }
    }
    return out;
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
  // The control addresses the workers register with: this test's coordinator and any others.
  std::string worker_coordinators() const {
    std::string list = control_address();
    for (const std::string& a : extra_control_addresses_) list += "," + a;
    return list;
  }

  // The client of the current coordinator.
  Client& client() { return *client_; }

  // Starts a coordinator on the test's port (the same one after a restart) and waits until it
  // listens. The client gets a new channel: an old one that saw the port refuse connections
  // would wait out gRPC's reconnect backoff (a second or more) before trying again.
  void start_coordinator() {
    if (coordinator_) old_coordinators_.push_back(std::move(coordinator_));
    const std::string log =
        dir_ + "/coordinator-" + std::to_string(old_coordinators_.size()) + ".log";
    std::vector<std::string> argv = {MLASERVE_BIN, "coordinator",       "--address",
                                     address(),    "--control-address", control_address()};
    argv.insert(argv.end(), coordinator_extra_.begin(), coordinator_extra_.end());
    coordinator_ = std::make_unique<Process>(argv, log);
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
      const int tp = j < static_cast<int>(job_tp_.size()) ? job_tp_[j] : tp_;
      std::vector<std::string> worker = {MLASERVE_BIN,    "worker",
                                         "--model",       model_,
                                         "--tp",          std::to_string(tp),
                                         "--coordinator", worker_coordinators(),
                                         "--port-base",   std::to_string(port_base)};
      if (layout == Layout::kTwoJobs) worker.insert(worker.end(), {"--group", std::to_string(j)});
      if (deterministic_) worker.push_back("--deterministic");
      std::vector<std::string> argv = {MLA_MPIEXEC, "-np", std::to_string(tp * groups_per_job)};
      argv.insert(argv.end(), kMpiFlags.begin(), kMpiFlags.end());
      argv.insert(argv.end(), worker.begin(), worker.end());
      argv.insert(argv.end(), extra.begin(), extra.end());
      if (j < static_cast<int>(job_extra_.size())) {
        argv.insert(argv.end(), job_extra_[j].begin(), job_extra_[j].end());
      }
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
    std::optional<v1::ListWorkersResponse> list;
    for (int attempt = 1;; ++attempt) {
      start_workers(layout, worker_extra);
      list = wait_for_alive(kGroups, kStartupTimeout);
      // Another test process may take a port between our check that it was free and the
      // worker's bind: start the groups again on other ports.
      if (list || attempt == 3 || !worker_port_taken()) break;
      for (WorkerJob& job : jobs_) job.process->kill_tree();
      jobs_.clear();
    }
    ASSERT_TRUE(list.has_value()) << "the worker groups did not register within "
                                  << kStartupTimeout.count() << " s";
    for (const v1::WorkerStatus& w : list->workers()) {
      if (w.state() == "alive") worker_ids_.push_back(w.worker_id());
    }
    std::cout << "cluster up in " << seconds_since(start) << " s\n";
  }

  // Whether a worker job of this cluster failed because its port was taken.
  bool worker_port_taken() {
    for (size_t j = 0; j < jobs_.size(); ++j) {
      if (jobs_[j].process->running()) continue;
      const std::string log = read_file(dir_ + "/workers-" + std::to_string(j) + ".log");
      if (log.find("address in use") != std::string::npos) return true;
    }
    return false;
  }

  // The worker id ("127.0.0.1:<port>") of a job's group g.
  static std::string worker_id_of(const WorkerJob& job, int g) {
    return "127.0.0.1:" + std::to_string(job.port_base + g);
  }

  // Waits until every alive worker reports, in a heartbeat sent after `since` (an older one
  // may predate what the test did), all its pages free and nothing running or waiting, and
  // the coordinator has nothing in flight; true when that happened within `timeout` of
  // `since` or of now, whichever is later. `last` gets the last listing.
  bool wait_for_idle_cache(Clock::time_point since, std::chrono::milliseconds timeout,
                           v1::ListWorkersResponse* last) {
    const auto end = std::max(since, Clock::now()) + timeout;
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

  // `mlaserve admin ARGS` against this test's coordinator, with `secret`.
  CommandResult admin(const std::vector<std::string>& args, const std::string& secret) {
    std::vector<std::string> argv = {MLASERVE_BIN, "--log-level", "warn",
                                     "admin",      "--address",   control_address()};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv, dir_ + "/admin-" + std::to_string(++admin_calls_) + ".log",
                       {"MLASERVE_CONTROL_SECRET=" + secret});
  }

  std::string dir_;
  std::string model_ = model_dir();                  // what the workers serve
  bool deterministic_ = false;                       // workers run --deterministic
  int tp_ = 2;                                       // ranks per worker group
  std::vector<int> job_tp_;                          // job j's ranks per group, if not tp_
  std::vector<std::vector<std::string>> job_extra_;  // job j's own worker arguments
  std::vector<std::string> coordinator_extra_;       // the coordinator's own arguments
  int admin_calls_ = 0;
  int coordinator_port_ = 0;
  int control_port_ = 0;
  std::vector<std::string> extra_control_addresses_;  // see worker_coordinators()
  std::set<int> used_ports_;
  std::unique_ptr<Process> coordinator_;
  std::vector<std::unique_ptr<Process>> old_coordinators_;
  std::vector<WorkerJob> jobs_;
  std::vector<std::string> worker_ids_;  // as first registered
  std::unique_ptr<Client> client_;
};

// Checks a finished stream against the offline tokens: complete, in order, one request id,
// usage and finish reason right.
inline void expect_complete(const Stream& s, const v1::GenerateRequest& request,
                            const Tokens& expected, const std::string& what) {
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

}  // namespace mla::e2e
