// The coordinator under test over loopback gRPC, with fake workers: FakeWorker (a Worker
// service whose tokens are a function of the position, honouring resume_ids, scriptable to
// die, stall, hold or refuse as draining, registering and heartbeating like CoordinatorLink),
// stream readers, and the CoordinatorServiceTest fixture. Shared by
// test_coordinator_service.cpp (routing, relaying, failover, limits) and
// test_coordinator_registry.cpp (registration, heartbeats, drain, the control plane).
#pragma once

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

namespace mla::test_coordinator {

namespace v1 = mlaserve::v1;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

inline constexpr int32_t kVocab = 1000;
inline constexpr int32_t kContext = 256;
inline constexpr const char* kSecret = "unit-test-control-secret";

inline const SharedSecret& test_secret() {
  static const SharedSecret secret(kSecret);
  return secret;
}

inline bool wait_until(const std::function<bool()>& done,
                       std::chrono::milliseconds limit = 3000ms) {
  const auto until = Clock::now() + limit;
  while (Clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return done();
}

inline v1::ModelInfo model_info() {
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

inline v1::WorkerLoad load(int32_t free_pages, int32_t waiting = 0) {
  v1::WorkerLoad l;
  l.set_free_pages(free_pages);
  l.set_total_pages(100);
  l.set_waiting(waiting);
  return l;
}

// Token j of a request whose prompt has n ids: what every fake worker produces at that
// position, so a resumed request continues exactly where it left off.
inline int32_t token_at(int32_t prompt_len, int32_t j) { return (prompt_len + j) % kVocab; }

inline std::vector<int32_t> expected_tokens(int32_t prompt_len, int32_t count) {
  std::vector<int32_t> t;
  for (int32_t j = 0; j < count; ++j) t.push_back(token_at(prompt_len, j));
  return t;
}

inline v1::GenerateRequest make_request(int32_t prompt_len, int32_t max_tokens,
                                        std::string id = "") {
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
  explicit FakeWorker(std::string id, v1::WorkerLoad load = test_coordinator::load(100))
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
inline CoordinatorOptions fast_options(RoutingPolicy policy = RoutingPolicy::kLeastLoaded) {
  CoordinatorOptions o;
  o.policy = policy;
  o.heartbeat_interval_ms = 50;
  o.dead_after_ms = 10000;
  return o;
}

inline CoordinatorOptions quick_death_options() {
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

}  // namespace mla::test_coordinator
