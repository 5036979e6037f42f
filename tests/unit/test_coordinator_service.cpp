// CoordinatorService over loopback gRPC, against fake workers defined here: routing,
// failover without lost or repeated tokens, validation, admission, heartbeats, drain,
// cancellation and deadlines.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/error.h"
#include "rpc/control_service.h"
#include "rpc/coordinator_service.h"
#include "rpc/metrics.h"
#include "rpc/shared_secret.h"

namespace mla {
namespace {

namespace v1 = mlaserve::v1;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr int32_t kVocab = 1000;
constexpr int32_t kContext = 256;
constexpr const char* kSecret = "unit-test-control-secret";

const SharedSecret& test_secret() {
  static const SharedSecret secret(kSecret);
  return secret;
}

bool wait_until(const std::function<bool()>& done, std::chrono::milliseconds limit = 3000ms) {
  const auto until = Clock::now() + limit;
  while (Clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return done();
}

v1::ModelInfo model_info() {
  v1::ModelInfo m;
  m.set_model_type("deepseek_v2");
  m.set_vocab_size(kVocab);
  m.set_max_context(kContext);
  m.set_tp_size(1);
  m.set_block_size(64);
  m.set_dtype("float32");
  m.set_config_hash("0123abcd");
  return m;
}

v1::WorkerLoad load(int32_t free_pages, int32_t waiting = 0) {
  v1::WorkerLoad l;
  l.set_free_pages(free_pages);
  l.set_total_pages(100);
  l.set_waiting(waiting);
  return l;
}

// Token j of a request whose prompt has n ids: what every fake worker produces at that
// position, so a resumed request continues exactly where it left off.
int32_t token_at(int32_t prompt_len, int32_t j) { return (prompt_len + j) % kVocab; }

std::vector<int32_t> expected_tokens(int32_t prompt_len, int32_t count) {
  std::vector<int32_t> t;
  for (int32_t j = 0; j < count; ++j) t.push_back(token_at(prompt_len, j));
  return t;
}

v1::GenerateRequest make_request(int32_t prompt_len, int32_t max_tokens, std::string id = "") {
  v1::GenerateRequest r;
  r.set_request_id(std::move(id));
  for (int32_t i = 0; i < prompt_len; ++i) r.add_prompt_ids(1 + i);
  r.set_max_tokens(max_tokens);
  return r;
}

// How a fake worker misbehaves, counted in tokens it sends in one call.
struct Script {
  int32_t die_after = -1;        // then answer UNAVAILABLE
  int32_t end_after = -1;        // then end with OK but no final message
  int32_t hold_after = -1;       // then wait (up to 5 s) for the call to be cancelled
  bool refuse_draining = false;  // refuse every call as a draining worker does
  int32_t padding = 0;           // extra ids in every message, to fill flow-control windows
};

// A Worker service that streams one token per message, token j of the request being
// token_at(prompt size, j), and honours resume_ids. Records what it was asked.
class FakeWorker final : public v1::Worker::Service {
 public:
  explicit FakeWorker(std::string id, v1::WorkerLoad load = ::mla::load(100))
      : id_(std::move(id)), load_(std::move(load)) {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(this);
    server_ = builder.BuildAndStart();
    address_ = "127.0.0.1:" + std::to_string(port);
  }
  ~FakeWorker() override {
    stop_heartbeats();
    server_->Shutdown(std::chrono::system_clock::now() + 1s);
  }

  const std::string& id() const { return id_; }
  const std::string& address() const { return address_; }
  void set_script(Script script) {
    std::lock_guard lock(mu_);
    script_ = script;
    // A worker that refuses because it drains says so in its heartbeats too.
    if (script.refuse_draining) draining_ = true;
  }

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    Script script;
    {
      std::lock_guard lock(mu_);
      requests_.push_back(*request);
      deadlines_.push_back(context->deadline());
      script = script_;
    }
    if (script.refuse_draining) {
      context->AddTrailingMetadata("mlaserve-worker-state", "draining");
      return {grpc::StatusCode::UNAVAILABLE, "fake worker draining"};
    }
    const int32_t resumed = request->resume_ids_size();
    const int32_t prompt_len = request->prompt_ids_size();
    const int32_t remaining = request->max_tokens() - resumed;
    for (int32_t i = 0; i < remaining; ++i) {
      if (i == script.die_after) return {grpc::StatusCode::UNAVAILABLE, "fake worker died"};
      if (i == script.end_after) return grpc::Status::OK;
      if (i == script.hold_after) {
        wait_until([&] { return context->IsCancelled(); }, 5000ms);
      }
      if (context->IsCancelled()) {
        ++cancels_seen_;
        return {grpc::StatusCode::CANCELLED, "cancelled"};
      }
      v1::GenerateResponse m;
      m.set_request_id(request->request_id());
      m.set_worker_id(id_);
      m.add_token_ids(token_at(prompt_len, resumed + i));
      for (int32_t p = 0; p < script.padding; ++p) m.add_token_ids(0);
      if (i == remaining - 1) {
        m.set_finish_reason(v1::FINISH_REASON_LENGTH);
        m.mutable_usage()->set_prompt_tokens(prompt_len);
        m.mutable_usage()->set_completion_tokens(resumed + i + 1);
      }
      if (!writer->Write(m)) {
        ++cancels_seen_;
        return {grpc::StatusCode::CANCELLED, "client gone"};
      }
    }
    return grpc::Status::OK;
  }

  std::vector<v1::GenerateRequest> requests() const {
    std::lock_guard lock(mu_);
    return requests_;
  }
  size_t num_requests() const { return requests().size(); }
  std::vector<std::chrono::system_clock::time_point> deadlines() const {
    std::lock_guard lock(mu_);
    return deadlines_;
  }
  int cancels_seen() const { return cancels_seen_; }
  bool drain_seen() const { return drain_seen_; }
  bool draining() const { return draining_; }
  std::string session() const {
    std::lock_guard lock(mu_);
    return session_;
  }

  // RegisterWorker once (with the control secret); the status.
  grpc::Status try_register(v1::Control::Stub& control) {
    v1::RegisterWorkerRequest r;
    r.set_worker_id(id_);
    r.set_address(address_);
    *r.mutable_model() = model_info();
    *r.mutable_load() = load_;
    r.set_draining(draining_);
    v1::RegisterWorkerResponse response;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 1s);
    test_secret().attach(context);
    const grpc::Status status = control.RegisterWorker(&context, r, &response);
    if (status.ok()) {
      std::lock_guard lock(mu_);
      session_ = response.session();
    }
    return status;
  }
  bool register_with(v1::Control::Stub& control) { return try_register(control).ok(); }

  // Registers, then heartbeats every 20 ms from a thread, re-registering when the
  // coordinator does not know this worker and draining or undraining when told to (as the
  // real CoordinatorLink and WorkerService do).
  void join(const std::string& coordinator_address) {
    control_ = v1::Control::NewStub(
        grpc::CreateChannel(coordinator_address, grpc::InsecureChannelCredentials()));
    ASSERT_TRUE(register_with(*control_));
    stop_ = false;
    heartbeats_ = std::thread([this] {
      while (!stop_) {
        v1::HeartbeatRequest r;
        r.set_worker_id(id_);
        r.set_session(session());
        r.set_draining(draining_);
        *r.mutable_load() = load_;
        v1::HeartbeatResponse response;
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + 1s);
        test_secret().attach(context);
        if (control_->Heartbeat(&context, r, &response).ok()) {
          if (!response.known()) register_with(*control_);
          if (response.drain()) drain_seen_ = draining_ = true;
          if (response.undrain()) draining_ = false;
        }
        std::this_thread::sleep_for(20ms);
      }
    });
  }
  void stop_heartbeats() {
    stop_ = true;
    if (heartbeats_.joinable()) heartbeats_.join();
  }

 private:
  const std::string id_;
  const v1::WorkerLoad load_;
  std::string address_;
  std::unique_ptr<grpc::Server> server_;

  mutable std::mutex mu_;
  Script script_;
  std::vector<v1::GenerateRequest> requests_;
  std::vector<std::chrono::system_clock::time_point> deadlines_;
  std::atomic<int> cancels_seen_{0};

  std::unique_ptr<v1::Control::Stub> control_;
  std::string session_;
  std::atomic<bool> stop_{true};
  std::atomic<bool> drain_seen_{false};
  std::atomic<bool> draining_{false};
  std::thread heartbeats_;
};

// A whole Generate stream, read to its end.
struct Stream {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::vector<std::string> token_workers;  // the worker id of each token
  v1::GenerateResponse last;
  int messages = 0;
};

// A Generate stream read message by message, for tests that act while it runs.
struct OpenStream {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
  std::vector<int32_t> tokens;
  v1::GenerateResponse last;

  bool read_one() {
    v1::GenerateResponse m;
    if (!reader->Read(&m)) return false;
    tokens.insert(tokens.end(), m.token_ids().begin(), m.token_ids().end());
    last = m;
    return true;
  }
  grpc::Status finish() {
    while (read_one()) {
    }
    return reader->Finish();
  }
};

// Workers heartbeat every 20 ms. Only the tests about silence rely on the death timeout;
// the others keep it long so that a slow machine (or a sanitizer build) does not fail
// workers over behind their back.
CoordinatorOptions fast_options(RoutingPolicy policy = RoutingPolicy::kLeastLoaded) {
  CoordinatorOptions o;
  o.policy = policy;
  o.heartbeat_interval_ms = 50;
  o.dead_after_ms = 10000;
  return o;
}

CoordinatorOptions quick_death_options() {
  CoordinatorOptions o = fast_options();
  o.dead_after_ms = 400;
  return o;
}

class CoordinatorServiceTest : public ::testing::Test {
 protected:
  void TearDown() override {
    for (auto& w : workers_) w->stop_heartbeats();
    stop_coordinator();
    workers_.clear();
  }

  // The coordinator with its control plane on one test server (`mlaserve coordinator`
  // gives each plane its own listener).
  void start(CoordinatorOptions options = fast_options(), MetricsRegistry* metrics = nullptr) {
    service_ = std::make_unique<CoordinatorService>(options);
    if (metrics) service_->attach_metrics(*metrics);
    control_ = std::make_unique<ControlService>(*service_, test_secret());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    builder.RegisterService(control_.get());
    server_ = builder.BuildAndStart();
    address_ = "127.0.0.1:" + std::to_string(port);
    auto channel = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
    stub_ = v1::Coordinator::NewStub(channel);
    control_stub_ = v1::Control::NewStub(channel);
  }
  void stop_coordinator() {
    if (!service_) return;
    service_->shutdown();
    server_->Shutdown(std::chrono::system_clock::now() + 1s);
    server_.reset();
    control_.reset();
    service_.reset();
  }

  FakeWorker& add_worker(const std::string& id, v1::WorkerLoad l = load(100)) {
    workers_.push_back(std::make_unique<FakeWorker>(id, std::move(l)));
    workers_.back()->join(address_);
    return *workers_.back();
  }

  Stream generate(const v1::GenerateRequest& request, std::chrono::milliseconds deadline = 5000ms) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + deadline);
    auto reader = stub_->Generate(&context, request);
    Stream s;
    v1::GenerateResponse m;
    while (reader->Read(&m)) {
      ++s.messages;
      for (int32_t t : m.token_ids()) {
        s.tokens.push_back(t);
        s.token_workers.push_back(m.worker_id());
      }
      s.last = m;
    }
    s.status = reader->Finish();
    return s;
  }

  std::unique_ptr<OpenStream> open(const v1::GenerateRequest& request,
                                   std::chrono::milliseconds deadline = 5000ms) {
    auto s = std::make_unique<OpenStream>();
    s->context.set_deadline(std::chrono::system_clock::now() + deadline);
    s->reader = stub_->Generate(&s->context, request);
    return s;
  }

  v1::ListWorkersResponse list_workers() {
    grpc::ClientContext context;
    v1::ListWorkersResponse response;
    EXPECT_TRUE(stub_->ListWorkers(&context, {}, &response).ok());
    return response;
  }
  std::string state_of(const std::string& worker_id) {
    const v1::ListWorkersResponse listed = list_workers();
    for (const auto& w : listed.workers()) {
      if (w.worker_id() == worker_id) return w.state();
    }
    return "missing";
  }
  v1::HealthResponse health() {
    grpc::ClientContext context;
    v1::HealthResponse response;
    EXPECT_TRUE(stub_->Health(&context, {}, &response).ok());
    return response;
  }
  bool cancel(const std::string& request_id) {
    grpc::ClientContext context;
    v1::CancelRequest r;
    r.set_request_id(request_id);
    v1::CancelResponse response;
    EXPECT_TRUE(stub_->Cancel(&context, r, &response).ok());
    return response.cancelled();
  }
  grpc::Status drain(const std::string& worker_id, bool* draining) {
    grpc::ClientContext context;
    test_secret().attach(context);
    v1::DrainRequest r;
    r.set_worker_id(worker_id);
    v1::DrainResponse response;
    grpc::Status status = control_stub_->Drain(&context, r, &response);
    *draining = response.draining();
    return status;
  }
  grpc::Status undrain(const std::string& worker_id) {
    grpc::ClientContext context;
    test_secret().attach(context);
    v1::UndrainRequest r;
    r.set_worker_id(worker_id);
    v1::UndrainResponse response;
    return control_stub_->Undrain(&context, r, &response);
  }
  grpc::Status register_raw(const v1::RegisterWorkerRequest& r, const char* secret = kSecret,
                            v1::RegisterWorkerResponse* out = nullptr) {
    grpc::ClientContext context;
    if (secret != nullptr) context.AddMetadata("authorization", std::string("Bearer ") + secret);
    v1::RegisterWorkerResponse response;
    return control_stub_->RegisterWorker(&context, r, out ? out : &response);
  }

  MetricsRegistry metrics_;  // outlives the service, which records into it when attached
  std::unique_ptr<CoordinatorService> service_;
  std::unique_ptr<ControlService> control_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  std::unique_ptr<v1::Coordinator::Stub> stub_;
  std::unique_ptr<v1::Control::Stub> control_stub_;
  std::vector<std::unique_ptr<FakeWorker>> workers_;
};

TEST_F(CoordinatorServiceTest, RoundRobinSpreadsRequests) {
  start(fast_options(RoutingPolicy::kRoundRobin));
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  FakeWorker& c = add_worker("w-c");
  std::map<std::string, int> served;
  for (int i = 0; i < 6; ++i) {
    Stream s = generate(make_request(5, 4));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.tokens, expected_tokens(5, 4));
    EXPECT_EQ(s.last.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(s.last.request_id().rfind("req-", 0), 0u) << s.last.request_id();
    ++served[s.last.worker_id()];
  }
  EXPECT_EQ(served, (std::map<std::string, int>{{"w-a", 2}, {"w-b", 2}, {"w-c", 2}}));
  EXPECT_EQ(a.num_requests() + b.num_requests() + c.num_requests(), 6u);
}

TEST_F(CoordinatorServiceTest, LeastLoadedFollowsFreePagesAndInFlight) {
  start();
  add_worker("w-a", load(10));
  FakeWorker& b = add_worker("w-b", load(90));
  for (int i = 0; i < 3; ++i) {
    Stream s = generate(make_request(3, 2));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.last.worker_id(), "w-b");
  }
  EXPECT_EQ(b.num_requests(), 3u);
}

TEST_F(CoordinatorServiceTest, LeastLoadedCountsRequestsInFlight) {
  start();
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  a.set_script({.hold_after = 1});
  auto held = open(make_request(4, 8));
  ASSERT_TRUE(held->read_one());  // w-a (the tie goes to the smaller id) holds it now
  EXPECT_EQ(held->last.worker_id(), "w-a");
  Stream s = generate(make_request(4, 3));
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.last.worker_id(), "w-b");
  EXPECT_EQ(b.num_requests(), 1u);
  held->context.TryCancel();
  EXPECT_EQ(held->finish().error_code(), grpc::StatusCode::CANCELLED);
}

TEST_F(CoordinatorServiceTest, FailoverResumesWithoutLossOrRepeat) {
  start();
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  a.set_script({.die_after = 3});
  Stream s = generate(make_request(5, 10, "fo-1"));
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.tokens, expected_tokens(5, 10));
  EXPECT_EQ(s.token_workers, (std::vector<std::string>{"w-a", "w-a", "w-a", "w-b", "w-b", "w-b",
                                                       "w-b", "w-b", "w-b", "w-b"}));
  EXPECT_EQ(s.last.request_id(), "fo-1");
  EXPECT_EQ(s.last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(s.last.usage().prompt_tokens(), 5);
  EXPECT_EQ(s.last.usage().completion_tokens(), 10);
  EXPECT_GE(s.last.timings().total_ms(), s.last.timings().ttft_ms());

  ASSERT_EQ(b.num_requests(), 1u);
  const v1::GenerateRequest resumed = b.requests()[0];
  EXPECT_EQ(resumed.request_id(), "fo-1");
  EXPECT_EQ(resumed.max_tokens(), 10);
  EXPECT_EQ(std::vector<int32_t>(resumed.resume_ids().begin(), resumed.resume_ids().end()),
            expected_tokens(5, 3));
  EXPECT_EQ(a.requests()[0].resume_ids_size(), 0);

  // The failed worker was marked dead; its next heartbeat is answered known = false, it
  // re-registers and is alive again.
  a.set_script({});
  EXPECT_TRUE(wait_until([&] { return state_of("w-a") == "alive"; }));
}

TEST_F(CoordinatorServiceTest, FailoverChainsAcrossWorkers) {
  start();
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  FakeWorker& c = add_worker("w-c");
  a.set_script({.die_after = 2});
  b.set_script({.end_after = 3});  // a stream that ends without its final message
  Stream s = generate(make_request(7, 9));
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.tokens, expected_tokens(7, 9));
  EXPECT_EQ(s.last.usage().completion_tokens(), 9);
  EXPECT_EQ(s.last.worker_id(), "w-c");
  ASSERT_EQ(b.num_requests(), 1u);
  ASSERT_EQ(c.num_requests(), 1u);
  EXPECT_EQ(b.requests()[0].resume_ids_size(), 2);
  const auto resume = c.requests()[0].resume_ids();
  EXPECT_EQ(std::vector<int32_t>(resume.begin(), resume.end()), expected_tokens(7, 5));
}

TEST_F(CoordinatorServiceTest, GivesUpAfterMaxFailovers) {
  CoordinatorOptions options = fast_options();
  options.max_failovers = 1;
  start(options);
  for (const char* id : {"w-a", "w-b", "w-c"}) add_worker(id).set_script({.die_after = 1});
  Stream s = generate(make_request(3, 6));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(s.status.error_message().find("gave up after 1 failovers"), std::string::npos)
      << s.status.error_message();
  EXPECT_EQ(s.tokens, expected_tokens(3, 2));  // what was sent stays unrepeated
}

// Sum of the samples of `name` (any labels) in Prometheus text.
double metric(const std::string& text, const std::string& name) {
  double sum = 0;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind(name, 0) != 0 || line.size() <= name.size()) continue;
    if (line[name.size()] != ' ' && line[name.size()] != '{') continue;
    sum += std::stod(line.substr(line.rfind(' ') + 1));
  }
  return sum;
}

TEST_F(CoordinatorServiceTest, MetricsCountTokensLatenciesFailoversAndRejections) {
  MetricsRegistry& registry = metrics_;
  CoordinatorOptions options = fast_options();
  options.max_in_flight = 1;
  start(options, &registry);
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  // A request that holds the only slot after one token, and one refused meanwhile.
  a.set_script({.hold_after = 1});
  b.set_script({.hold_after = 1});
  auto held = open(make_request(4, 5));
  ASSERT_TRUE(held->read_one());
  EXPECT_EQ(generate(make_request(3, 2)).status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  held->context.TryCancel();
  held->finish();
  EXPECT_TRUE(wait_until([&] { return list_workers().in_flight() == 0; }));
  // One that fails over once (least-loaded picks w-a first).
  a.set_script({.die_after = 2});
  b.set_script({});
  Stream s = generate(make_request(3, 6));
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  // A stream's metrics are recorded as its handler ends, just after the client has its end.
  EXPECT_TRUE(
      wait_until([&] { return metric(registry.render(), "mlaserve_requests_total") == 3; }));
  const std::string text = registry.render();
  EXPECT_EQ(metric(text, "mlaserve_prompt_tokens_total"), 3 + 4) << text;
  EXPECT_EQ(metric(text, "mlaserve_failovers_total"), 1);
  EXPECT_EQ(metric(text, "mlaserve_admission_rejections_total"), 1);
  EXPECT_EQ(metric(text, "mlaserve_workers_alive"), health().workers_alive());
  EXPECT_GE(metric(text, "mlaserve_tokens_generated_total"), 7);
  EXPECT_EQ(metric(text, "mlaserve_request_duration_seconds_count"), 2);       // the admitted two
  EXPECT_EQ(metric(text, "mlaserve_time_per_output_token_seconds_count"), 1);  // > 1 token
  EXPECT_EQ(metric(text, "mlaserve_requests_total"), 3);
  EXPECT_EQ(metric(text, "mlaserve_requests_in_flight"), 0);
}

TEST_F(CoordinatorServiceTest, FailsOverWhenEveryOtherWorkerIsGone) {
  start();
  add_worker("w-a").set_script({.die_after = 2});
  Stream s = generate(make_request(3, 6));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(s.status.error_message().find("w-a failed"), std::string::npos)
      << s.status.error_message();
}

TEST_F(CoordinatorServiceTest, WorkerErrorsOtherThanFailuresGoToTheClient) {
  start();
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  // A prompt the worker refuses (its own validation): no failover, status unchanged.
  class Refusing final : public v1::Worker::Service {};  // UNIMPLEMENTED for everything
  grpc::ServerBuilder builder;
  int port = 0;
  Refusing refusing;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&refusing);
  auto server = builder.BuildAndStart();
  v1::RegisterWorkerRequest r;
  r.set_worker_id("w-0");  // sorts first: least-loaded picks it
  r.set_address("127.0.0.1:" + std::to_string(port));
  *r.mutable_model() = model_info();
  *r.mutable_load() = load(100);
  v1::RegisterWorkerResponse response;
  ASSERT_TRUE(register_raw(r, kSecret, &response).ok());
  EXPECT_EQ(response.heartbeat_interval_ms(), 50);
  Stream s = generate(make_request(3, 2));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(a.num_requests() + b.num_requests(), 0u);
  server->Shutdown(std::chrono::system_clock::now() + 1s);
}

TEST_F(CoordinatorServiceTest, HungWorkerThatStopsHeartbeatingFailsOver) {
  start(quick_death_options());
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  a.set_script({.hold_after = 2});
  auto stream = open(make_request(4, 6));
  ASSERT_TRUE(stream->read_one());
  ASSERT_TRUE(stream->read_one());
  EXPECT_EQ(stream->last.worker_id(), "w-a");
  a.stop_heartbeats();  // hung: no more heartbeats, no more tokens
  const auto silent_at = Clock::now();
  ASSERT_TRUE(stream->finish().ok());
  EXPECT_GE(Clock::now() - silent_at, 300ms);  // it took the heartbeat timeout
  EXPECT_EQ(stream->tokens, expected_tokens(4, 6));
  EXPECT_EQ(stream->last.worker_id(), "w-b");
  ASSERT_EQ(b.num_requests(), 1u);
  EXPECT_EQ(b.requests()[0].resume_ids_size(), 2);
  EXPECT_TRUE(wait_until([&] { return a.cancels_seen() == 1; }));

  EXPECT_EQ(state_of("w-a"), "dead");
  EXPECT_EQ(health().workers_alive(), 1);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(generate(make_request(2, 2)).last.worker_id(), "w-b");
  EXPECT_EQ(a.num_requests(), 1u);
}

TEST_F(CoordinatorServiceTest, BadInputIsInvalidArgumentNamingTheField) {
  start();
  add_worker("w-a");
  struct Case {
    const char* field;
    std::function<void(v1::GenerateRequest&)> mutate;
  };
  const std::vector<Case> cases = {
      {"prompt_ids", [](auto& r) { r.clear_prompt_ids(); }},
      {"prompt_ids[2]", [](auto& r) { r.set_prompt_ids(2, kVocab); }},
      {"prompt_ids[0]", [](auto& r) { r.set_prompt_ids(0, -1); }},
      {"max_tokens", [](auto& r) { r.set_max_tokens(0); }},
      {"max_tokens", [](auto& r) { r.set_max_tokens(-5); }},
      {"max_tokens", [](auto& r) { r.set_max_tokens(kContext - 3); }},  // 4 + 253 > 256
      {"sampling.temperature", [](auto& r) { r.mutable_sampling()->set_temperature(-0.5f); }},
      {"sampling.temperature", [](auto& r) { r.mutable_sampling()->set_temperature(NAN); }},
      {"sampling.top_k", [](auto& r) { r.mutable_sampling()->set_top_k(-1); }},
      {"sampling.top_k", [](auto& r) { r.mutable_sampling()->set_top_k(kVocab + 1); }},
      {"sampling.top_p", [](auto& r) { r.mutable_sampling()->set_top_p(1.5f); }},
      {"sampling.top_p", [](auto& r) { r.mutable_sampling()->set_top_p(-0.1f); }},
      {"stop_ids[1]",
       [](auto& r) {
         r.add_stop_ids(3);
         r.add_stop_ids(kVocab + 7);
       }},
      {"request_id", [](auto& r) { r.set_request_id(std::string(129, 'x')); }},
      {"request_id", [](auto& r) { r.set_request_id("tab\there"); }},
      {"resume_ids", [](auto& r) { r.add_resume_ids(1); }},
  };
  for (const auto& c : cases) {
    v1::GenerateRequest r = make_request(4, 8);
    c.mutate(r);
    Stream s = generate(r);
    EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.field;
    EXPECT_EQ(s.status.error_message().rfind(c.field, 0), 0u)
        << c.field << ": " << s.status.error_message();
    EXPECT_EQ(s.messages, 0);
  }
  // The limits themselves are fine.
  v1::GenerateRequest edge = make_request(4, kContext - 4, std::string(128, 'y'));
  edge.mutable_sampling()->set_top_k(kVocab);
  edge.mutable_sampling()->set_top_p(1.0f);
  edge.mutable_sampling()->set_temperature(0.7f);
  Stream ok = generate(edge);
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.tokens.size(), static_cast<size_t>(kContext - 4));
  EXPECT_EQ(workers_[0]->num_requests(), 1u);
}

TEST_F(CoordinatorServiceTest, PromptLongerThanTheLimitIsRefused) {
  CoordinatorOptions options = fast_options();
  options.max_prompt_ids = 8;
  start(options);
  add_worker("w-a");
  Stream s = generate(make_request(9, 1));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.status.error_message().find("prompt_ids: 9 ids (limit 8)"), std::string::npos)
      << s.status.error_message();
}

TEST_F(CoordinatorServiceTest, NoLiveWorkerIsUnavailable) {
  start();
  EXPECT_EQ(generate(make_request(3, 2)).status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_FALSE(health().serving());
  EXPECT_EQ(health().workers_alive(), 0);
  // Structural errors are still reported as such.
  EXPECT_EQ(generate(make_request(0, 2)).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  add_worker("w-a");
  EXPECT_TRUE(health().serving());
  bool draining = false;
  ASSERT_TRUE(drain("w-a", &draining).ok());
  EXPECT_EQ(generate(make_request(3, 2)).status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_FALSE(health().serving());
}

TEST_F(CoordinatorServiceTest, AdmissionLimitIsResourceExhausted) {
  CoordinatorOptions options = fast_options();
  options.max_in_flight = 2;
  start(options);
  FakeWorker& a = add_worker("w-a");
  a.set_script({.hold_after = 1});
  auto first = open(make_request(3, 5));
  auto second = open(make_request(3, 5));
  ASSERT_TRUE(first->read_one());
  ASSERT_TRUE(second->read_one());
  Stream refused = generate(make_request(3, 5));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(refused.status.error_message(), "2 requests in flight (limit 2)");
  const v1::ListWorkersResponse listed = list_workers();
  EXPECT_EQ(listed.in_flight(), 2);
  EXPECT_EQ(listed.max_in_flight(), 2);
  ASSERT_EQ(listed.workers_size(), 1);
  EXPECT_EQ(listed.workers(0).in_flight(), 2);

  first->context.TryCancel();
  second->context.TryCancel();
  first->finish();
  second->finish();
  EXPECT_TRUE(wait_until([&] { return list_workers().in_flight() == 0; }));
  a.set_script({});
  EXPECT_TRUE(generate(make_request(3, 5)).status.ok());
}

TEST_F(CoordinatorServiceTest, HeartbeatSilenceMarksAWorkerDead) {
  start(quick_death_options());
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  EXPECT_EQ(health().workers_alive(), 2);
  a.stop_heartbeats();
  ASSERT_TRUE(wait_until([&] { return state_of("w-a") == "dead"; }));
  EXPECT_EQ(health().workers_alive(), 1);
  EXPECT_TRUE(health().serving());
  const v1::ListWorkersResponse listed = list_workers();
  for (const auto& w : listed.workers()) {
    if (w.worker_id() == "w-a") {
      EXPECT_GE(w.ms_since_heartbeat(), 400);
      EXPECT_EQ(w.address(), a.address());
      EXPECT_EQ(w.model().vocab_size(), kVocab);
      EXPECT_EQ(w.load().free_pages(), 100);
    }
  }
  for (int i = 0; i < 4; ++i) {
    Stream s = generate(make_request(2, 2));
    ASSERT_TRUE(s.status.ok());
    EXPECT_EQ(s.last.worker_id(), "w-b");
  }
  EXPECT_EQ(a.num_requests(), 0u);
  EXPECT_EQ(b.num_requests(), 4u);

  // A heartbeat from the dead worker asks it to re-register; then it is alive again.
  a.join(address_);
  EXPECT_TRUE(wait_until([&] { return state_of("w-a") == "alive"; }));
}

TEST_F(CoordinatorServiceTest, RestartedCoordinatorAnswersUnknown) {
  start();
  FakeWorker worker("w-x");
  auto heartbeat = [&](v1::Control::Stub& stub, const std::string& session) {
    v1::HeartbeatRequest r;
    r.set_worker_id("w-x");
    r.set_session(session);
    v1::HeartbeatResponse response;
    grpc::ClientContext context;
    test_secret().attach(context);
    EXPECT_TRUE(stub.Heartbeat(&context, r, &response).ok());
    return response.known();
  };
  EXPECT_FALSE(heartbeat(*control_stub_, ""));
  ASSERT_TRUE(worker.register_with(*control_stub_));
  EXPECT_TRUE(heartbeat(*control_stub_, worker.session()));
  // A heartbeat under another session (a forged one, or a stale process's) is not taken.
  EXPECT_FALSE(heartbeat(*control_stub_, "not-the-session"));

  stop_coordinator();
  start();  // a new instance knows nobody
  EXPECT_FALSE(heartbeat(*control_stub_, worker.session()));
  ASSERT_TRUE(worker.register_with(*control_stub_));
  EXPECT_TRUE(heartbeat(*control_stub_, worker.session()));
}

TEST_F(CoordinatorServiceTest, DrainStopsRoutingAndTellsTheWorker) {
  start(fast_options(RoutingPolicy::kRoundRobin));
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  bool draining = false;
  ASSERT_TRUE(drain("w-a", &draining).ok());
  EXPECT_TRUE(draining);
  EXPECT_TRUE(wait_until([&] { return a.drain_seen(); }));
  EXPECT_FALSE(b.drain_seen());
  EXPECT_EQ(state_of("w-a"), "draining");
  EXPECT_EQ(health().workers_alive(), 1);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(generate(make_request(2, 2)).last.worker_id(), "w-b");
  EXPECT_EQ(a.num_requests(), 0u);

  const grpc::Status unknown = drain("w-nope", &draining);
  EXPECT_EQ(unknown.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(unknown.error_message().find("w-nope"), std::string::npos);

  // Re-registering does not undo a drain (the worker still drains); undrain does.
  ASSERT_TRUE(a.register_with(*control_stub_));
  EXPECT_EQ(state_of("w-a"), "draining");
  ASSERT_TRUE(undrain("w-a").ok());
  EXPECT_TRUE(wait_until([&] { return !a.draining() && state_of("w-a") == "alive"; }));
  EXPECT_EQ(health().workers_alive(), 2);
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(generate(make_request(2, 2)).status.ok());
  EXPECT_GT(a.num_requests(), 0u);
  EXPECT_EQ(undrain("w-nope").error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(CoordinatorServiceTest, AWorkerThatDrainsByItselfIsNotRoutedTo) {
  start(fast_options(RoutingPolicy::kRoundRobin));
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  // A refusal that says "draining" moves the request on at once and stops the routing,
  // without counting the worker dead.
  a.set_script({.refuse_draining = true});
  for (int i = 0; i < 4; ++i) {
    Stream s = generate(make_request(3, 3));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.last.worker_id(), "w-b");
  }
  EXPECT_LE(a.num_requests(), 1u);
  EXPECT_NE(state_of("w-a"), "dead");
  EXPECT_EQ(b.num_requests(), 4u);
}

TEST_F(CoordinatorServiceTest, CancelEndsTheRequestAndTheWorkerCall) {
  start();
  FakeWorker& a = add_worker("w-a");
  a.set_script({.hold_after = 2});
  auto stream = open(make_request(3, 10, "to-cancel"));
  ASSERT_TRUE(stream->read_one());
  ASSERT_TRUE(stream->read_one());

  // A second request with the same id is refused while the first runs.
  Stream duplicate = generate(make_request(3, 10, "to-cancel"));
  EXPECT_EQ(duplicate.status.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_NE(duplicate.status.error_message().find("request_id"), std::string::npos);

  EXPECT_FALSE(cancel("no-such-request"));
  EXPECT_TRUE(cancel("to-cancel"));
  const grpc::Status status = stream->finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(stream->last.finish_reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_EQ(stream->last.request_id(), "to-cancel");
  EXPECT_EQ(stream->last.usage().completion_tokens(), 2);
  EXPECT_EQ(stream->tokens, expected_tokens(3, 2));
  EXPECT_TRUE(wait_until([&] { return a.cancels_seen() == 1; }));
  EXPECT_FALSE(cancel("to-cancel"));  // finished now
  EXPECT_EQ(a.num_requests(), 1u);    // no failover after a cancel
}

TEST_F(CoordinatorServiceTest, ClientCancellationReachesTheWorker) {
  start();
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  a.set_script({.hold_after = 1});
  auto stream = open(make_request(3, 10));
  ASSERT_TRUE(stream->read_one());
  const auto cancelled_at = Clock::now();
  stream->context.TryCancel();
  EXPECT_EQ(stream->finish().error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(wait_until([&] { return a.cancels_seen() == 1; }));
  EXPECT_LT(Clock::now() - cancelled_at, 1000ms);
  EXPECT_TRUE(wait_until([&] { return list_workers().in_flight() == 0; }));
  EXPECT_EQ(b.num_requests(), 0u);  // a client's cancel is not a failure to fail over
  EXPECT_EQ(state_of("w-a"), "alive");
}

TEST_F(CoordinatorServiceTest, DeadlinePropagatesToTheWorker) {
  start();
  FakeWorker& a = add_worker("w-a");
  FakeWorker& b = add_worker("w-b");
  a.set_script({.hold_after = 1});
  const auto client_deadline = std::chrono::system_clock::now() + 400ms;
  grpc::ClientContext context;
  context.set_deadline(client_deadline);
  auto reader = stub_->Generate(&context, make_request(3, 10));
  v1::GenerateResponse m;
  ASSERT_TRUE(reader->Read(&m));
  while (reader->Read(&m)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  ASSERT_EQ(a.deadlines().size(), 1u);
  const auto worker_deadline = a.deadlines()[0];
  EXPECT_LE(worker_deadline, client_deadline + 50ms);
  EXPECT_GE(worker_deadline, client_deadline - 200ms);
  EXPECT_TRUE(wait_until([&] { return a.cancels_seen() == 1; }));
  EXPECT_EQ(b.num_requests(), 0u);
}

TEST_F(CoordinatorServiceTest, AWorkerIdStaysBoundToItsAddressUntilForgotten) {
  CoordinatorOptions options = quick_death_options();
  options.forget_dead_after_ms = 800;
  start(options);
  FakeWorker& real = add_worker("w-a");
  FakeWorker impostor("w-a");  // same id, another address
  const grpc::Status hijack = impostor.try_register(*control_stub_);
  EXPECT_EQ(hijack.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(hijack.error_message().find("w-a"), std::string::npos);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(generate(make_request(2, 2)).status.ok());
  EXPECT_EQ(real.num_requests(), 3u);
  EXPECT_EQ(impostor.num_requests(), 0u);
  // The real worker registers again (a restart at the same address): accepted.
  EXPECT_TRUE(real.register_with(*control_stub_));

  // Dead, then forgotten: the id is free again.
  real.stop_heartbeats();
  ASSERT_TRUE(wait_until([&] { return state_of("w-a") == "dead"; }));
  EXPECT_EQ(impostor.try_register(*control_stub_).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  ASSERT_TRUE(wait_until([&] { return state_of("w-a") == "missing"; }, 3000ms));
  EXPECT_TRUE(impostor.register_with(*control_stub_));
  const v1::ListWorkersResponse listed = list_workers();
  ASSERT_EQ(listed.workers_size(), 1);
  EXPECT_EQ(listed.workers(0).address(), impostor.address());
}

TEST_F(CoordinatorServiceTest, ControlCallsWithoutTheSecretAreRefused) {
  start();
  FakeWorker& a = add_worker("w-a");
  v1::RegisterWorkerRequest r;
  r.set_worker_id("w-evil");
  r.set_address("127.0.0.1:1");
  *r.mutable_model() = model_info();
  for (const char* secret : {static_cast<const char*>(nullptr), "wrong-secret-of-some-length"}) {
    EXPECT_EQ(register_raw(r, secret).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext c1, c2, c3, c4;
    if (secret) {
      for (grpc::ClientContext* c : {&c1, &c2, &c3, &c4}) {
        c->AddMetadata("authorization", std::string("Bearer ") + secret);
      }
    }
    v1::HeartbeatRequest hb;
    hb.set_worker_id("w-a");
    hb.set_session(a.session());
    hb.mutable_load()->set_free_pages(0);
    v1::HeartbeatResponse hb_response;
    EXPECT_EQ(control_stub_->Heartbeat(&c1, hb, &hb_response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    v1::DrainRequest dr;
    dr.set_worker_id("w-a");
    v1::DrainResponse dr_response;
    EXPECT_EQ(control_stub_->Drain(&c2, dr, &dr_response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    v1::UndrainRequest ur;
    ur.set_worker_id("w-a");
    v1::UndrainResponse ur_response;
    EXPECT_EQ(control_stub_->Undrain(&c3, ur, &ur_response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    v1::ListWorkersResponse lw_response;
    EXPECT_EQ(control_stub_->ListWorkers(&c4, {}, &lw_response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  EXPECT_EQ(state_of("w-evil"), "missing");
  EXPECT_EQ(state_of("w-a"), "alive");
  EXPECT_TRUE(generate(make_request(2, 2)).status.ok());
  EXPECT_EQ(a.num_requests(), 1u);
}

TEST_F(CoordinatorServiceTest, AWorkerWithAnotherModelIsRefusedNamingTheField) {
  start();
  add_worker("w-a");
  struct Case {
    const char* field;
    std::function<void(v1::ModelInfo&)> edit;
  };
  const std::vector<Case> cases = {
      {"model_type", [](auto& m) { m.set_model_type("deepseek_v3"); }},
      {"vocab_size", [](auto& m) { m.set_vocab_size(kVocab + 1); }},
      {"max_context", [](auto& m) { m.set_max_context(1); }},
      {"dtype", [](auto& m) { m.set_dtype("bfloat16"); }},
      {"config_hash", [](auto& m) { m.set_config_hash("ffff"); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.field);
    v1::RegisterWorkerRequest r;
    r.set_worker_id("w-b");
    r.set_address("127.0.0.1:2");
    *r.mutable_model() = model_info();
    c.edit(*r.mutable_model());
    const grpc::Status status = register_raw(r);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_NE(status.error_message().find(std::string("model.") + c.field), std::string::npos)
        << status.error_message();
  }
  EXPECT_EQ(state_of("w-b"), "missing");
}

TEST_F(CoordinatorServiceTest, TheWorkerTableIsBounded) {
  CoordinatorOptions options = fast_options();
  options.max_workers = 3;
  start(options);
  v1::RegisterWorkerRequest r;
  r.set_address("127.0.0.1:3");
  *r.mutable_model() = model_info();
  r.set_worker_id(std::string(100 * 1024, 'x'));
  EXPECT_EQ(register_raw(r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  r.set_worker_id("has space");
  EXPECT_EQ(register_raw(r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  r.set_worker_id("w-1");
  r.set_address(std::string(300, 'h') + ":1");
  EXPECT_EQ(register_raw(r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  r.set_address("no-port");
  EXPECT_EQ(register_raw(r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  for (int i = 0; i < 3; ++i) {
    r.set_worker_id("w-" + std::to_string(i));
    r.set_address("127.0.0.1:" + std::to_string(10 + i));
    EXPECT_TRUE(register_raw(r).ok());
  }
  r.set_worker_id("w-3");
  r.set_address("127.0.0.1:13");
  EXPECT_EQ(register_raw(r).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(list_workers().workers_size(), 3);
}

TEST_F(CoordinatorServiceTest, ReceivedIdsResumeAStreamWithoutRepeatingThem) {
  start();
  FakeWorker& a = add_worker("w-a");
  v1::GenerateRequest r = make_request(4, 6, "resumed");
  const std::vector<int32_t> all = expected_tokens(4, 6);
  for (int i = 0; i < 2; ++i) r.add_received_ids(all[i]);
  Stream s = generate(r);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.tokens, std::vector<int32_t>(all.begin() + 2, all.end()));
  EXPECT_EQ(s.last.usage().completion_tokens(), 6);
  ASSERT_EQ(a.requests().size(), 1u);
  EXPECT_EQ(a.requests()[0].resume_ids_size(), 2);
  EXPECT_EQ(a.requests()[0].received_ids_size(), 0);

  v1::GenerateRequest too_many = make_request(4, 2);
  too_many.add_received_ids(1);
  too_many.add_received_ids(2);
  EXPECT_EQ(generate(too_many).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::GenerateRequest outside = make_request(4, 3);
  outside.add_received_ids(kVocab);
  const Stream bad = generate(outside);
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bad.status.error_message().find("received_ids[0]"), std::string::npos);
}

TEST_F(CoordinatorServiceTest, AClientThatStopsReadingIsCancelledAndFreesItsSlot) {
  CoordinatorOptions options = fast_options();
  options.stream_write_timeout_ms = 300;
  options.max_in_flight = 1;
  start(options);
  FakeWorker& a = add_worker("w-a");
  // 190 messages of 100 KB, far more than the flow-control windows hold, then the worker
  // waits for the cancellation.
  a.set_script({.hold_after = 190, .padding = 25000});
  auto stalled = open(make_request(3, 200), 20000ms);  // never read
  ASSERT_TRUE(wait_until([&] { return a.num_requests() == 1; }));
  const auto opened = Clock::now();
  ASSERT_TRUE(wait_until([&] { return a.cancels_seen() == 1; }, 5000ms))
      << "the worker call was not cancelled";
  const double seconds = std::chrono::duration<double>(Clock::now() - opened).count();
  EXPECT_GE(seconds, 0.25);
  EXPECT_TRUE(wait_until([&] { return list_workers().in_flight() == 0; }));
  // The admission slot is free again.
  a.set_script({});
  Stream next = generate(make_request(3, 4));
  EXPECT_TRUE(next.status.ok()) << next.status.error_message();
  stalled->context.TryCancel();
  stalled->finish();
}

TEST_F(CoordinatorServiceTest, ReadinessFollowsLiveWorkersAndStopAccepting) {
  start(quick_death_options());
  EXPECT_FALSE(service_->ready());
  EXPECT_FALSE(health().serving());
  FakeWorker& a = add_worker("w-a");
  EXPECT_TRUE(service_->ready());
  a.stop_heartbeats();
  ASSERT_TRUE(wait_until([&] { return !service_->ready(); }));
  EXPECT_FALSE(health().serving());
  a.join(address_);
  ASSERT_TRUE(wait_until([&] { return service_->ready(); }));
  service_->stop_accepting();
  EXPECT_FALSE(service_->ready());
  const Stream refused = generate(make_request(2, 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(refused.status.error_message().find("stopping"), std::string::npos);
  EXPECT_TRUE(service_->wait_until_idle(100ms));
}

TEST_F(CoordinatorServiceTest, RegisterWorkerChecksItsRequest) {
  start();
  add_worker("w-a");
  auto register_worker = [&](const v1::RegisterWorkerRequest& r) { return register_raw(r); };
  v1::RegisterWorkerRequest good;
  good.set_worker_id("w-b");
  good.set_address("127.0.0.1:1");
  *good.mutable_model() = model_info();

  v1::RegisterWorkerRequest r = good;
  r.clear_worker_id();
  EXPECT_EQ(register_worker(r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  r = good;
  r.clear_address();
  EXPECT_EQ(register_worker(r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  r = good;
  r.mutable_model()->set_vocab_size(0);
  EXPECT_EQ(register_worker(r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  r = good;
  r.mutable_model()->set_vocab_size(kVocab * 2);
  const grpc::Status other_model = register_worker(r);
  EXPECT_EQ(other_model.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(other_model.error_message().find("w-a"), std::string::npos);
  EXPECT_TRUE(register_worker(good).ok());
}

TEST(CoordinatorOptions, DefaultsAndValidation) {
  const CoordinatorOptions defaults;
  EXPECT_EQ(defaults.policy, RoutingPolicy::kLeastLoaded);
  EXPECT_EQ(defaults.max_in_flight, 4096);
  EXPECT_EQ(defaults.heartbeat_interval_ms, 500);
  EXPECT_EQ(defaults.dead_after_ms, 1500);
  EXPECT_EQ(defaults.max_failovers, 3);
  EXPECT_NO_THROW(defaults.validate());
  CoordinatorOptions bad;
  bad.max_in_flight = 0;
  EXPECT_THROW(CoordinatorService{bad}, Error);
  bad = {};
  bad.dead_after_ms = bad.heartbeat_interval_ms;
  EXPECT_THROW(bad.validate(), Error);
  bad = {};
  bad.max_failovers = -1;
  EXPECT_THROW(bad.validate(), Error);
}

}  // namespace
}  // namespace mla
