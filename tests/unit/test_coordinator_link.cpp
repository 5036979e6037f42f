// CoordinatorLink over loopback gRPC against a fake coordinator control plane: registration,
// heartbeats with the worker's load, re-registration after the coordinator forgets the
// worker, drain and undrain commands, the control secret, retries while the coordinator is
// down, and a prompt stop while it is unreachable.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>

#include "rpc/coordinator_link.h"
#include "rpc/shared_secret.h"
#include "tests/unit/worker_fixture.h"

namespace mla {
namespace {

using namespace test_worker;  // NOLINT: the fixture's names are these tests' vocabulary

// ---------------------------------------------------------------------------------------
// Coordinator link

// The coordinator's control plane as the link sees it: sessions, drain and undrain
// commands, and the secret each call carried.
class FakeCoordinator final : public v1::Control::Service {
 public:
  grpc::Status RegisterWorker(grpc::ServerContext* ctx, const v1::RegisterWorkerRequest* req,
                              v1::RegisterWorkerResponse* resp) override {
    std::lock_guard lk(mu_);
    record_secret(*ctx);
    ++registrations_;
    last_register_ = *req;
    known_ = true;
    session_ = fmt::format("session-{}", registrations_);
    resp->set_heartbeat_interval_ms(20);
    resp->set_session(session_);
    return grpc::Status::OK;
  }
  grpc::Status Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* req,
                         v1::HeartbeatResponse* resp) override {
    std::lock_guard lk(mu_);
    record_secret(*ctx);
    ++heartbeats_;
    last_heartbeat_ = *req;
    resp->set_known(known_ && req->session() == session_);
    resp->set_drain(drain_ && !req->draining());
    resp->set_undrain(undrain_ && req->draining());
    return grpc::Status::OK;
  }

  void forget() {
    std::lock_guard lk(mu_);
    known_ = false;
  }
  void drain() {
    std::lock_guard lk(mu_);
    drain_ = true;
    undrain_ = false;
  }
  void undrain() {
    std::lock_guard lk(mu_);
    drain_ = false;
    undrain_ = true;
  }
  int registrations() const {
    std::lock_guard lk(mu_);
    return registrations_;
  }
  int heartbeats() const {
    std::lock_guard lk(mu_);
    return heartbeats_;
  }
  v1::RegisterWorkerRequest last_register() const {
    std::lock_guard lk(mu_);
    return last_register_;
  }
  v1::HeartbeatRequest last_heartbeat() const {
    std::lock_guard lk(mu_);
    return last_heartbeat_;
  }
  std::string last_authorization() const {
    std::lock_guard lk(mu_);
    return last_authorization_;
  }

 private:
  void record_secret(const grpc::ServerContext& ctx) {
    const auto it = ctx.client_metadata().find("authorization");
    last_authorization_ =
        it == ctx.client_metadata().end() ? "" : std::string(it->second.data(), it->second.size());
  }

  mutable std::mutex mu_;
  int registrations_ = 0;
  int heartbeats_ = 0;
  bool known_ = false;
  bool drain_ = false;
  bool undrain_ = false;
  std::string session_;
  std::string last_authorization_;
  v1::RegisterWorkerRequest last_register_;
  v1::HeartbeatRequest last_heartbeat_;
};

// A FakeCoordinator on `port` (0: a free one).
struct CoordinatorServer {
  explicit CoordinatorServer(int want_port = 0) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort(fmt::format("127.0.0.1:{}", want_port),
                             grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    server = builder.BuildAndStart();
  }
  ~CoordinatorServer() { server->Shutdown(std::chrono::system_clock::now() + 1s); }
  std::string address() const { return fmt::format("127.0.0.1:{}", port); }

  FakeCoordinator service;
  int port = 0;
  std::unique_ptr<grpc::Server> server;
};

CoordinatorLinkOptions link_options(TestWorker& w, const std::string& coordinator) {
  CoordinatorLinkOptions o;
  o.coordinator_address = coordinator;
  o.worker_id = w.service.worker_id();
  o.worker_address = fmt::format("127.0.0.1:{}", w.port);
  o.model = w.service.model_info();
  o.load = [&w] { return w.service.load(); };
  o.draining = [&w] { return w.service.draining(); };
  o.on_drain = [&w] { w.service.drain(); };
  o.on_undrain = [&w] { w.service.undrain(); };
  o.secret = std::make_shared<const SharedSecret>(kSecret);
  o.rpc_timeout_ms = 500;
  o.min_backoff_ms = 20;
  o.max_backoff_ms = 100;
  return o;
}

TEST_F(WorkerServiceTest, LinkRegistersHeartbeatsReRegistersAndDrains) {
  TestWorker w;
  CoordinatorServer coordinator;
  CoordinatorLink link(link_options(w, coordinator.address()));

  ASSERT_TRUE(eventually([&] { return coordinator.service.heartbeats() >= 2; }));
  EXPECT_TRUE(link.registered());
  const v1::RegisterWorkerRequest reg = coordinator.service.last_register();
  EXPECT_EQ(reg.worker_id(), "w0");
  EXPECT_EQ(reg.address(), fmt::format("127.0.0.1:{}", w.port));
  EXPECT_EQ(reg.model().model_type(), "deepseek_v3");
  EXPECT_EQ(reg.model().vocab_size(), 256);
  EXPECT_EQ(reg.model().max_context(), 256);
  EXPECT_EQ(reg.model().tp_size(), 1);
  EXPECT_EQ(reg.model().block_size(), 16);
  EXPECT_EQ(reg.model().dtype(), "float32");
  EXPECT_EQ(reg.load().total_pages(), 64);
  EXPECT_FALSE(reg.draining());
  EXPECT_EQ(coordinator.service.last_heartbeat().load().free_pages(), 64);
  EXPECT_EQ(coordinator.service.last_heartbeat().session(), "session-1");
  EXPECT_EQ(coordinator.service.last_authorization(), std::string("Bearer ") + kSecret);

  // A coordinator that forgot the worker (restarted) gets a new registration.
  coordinator.service.forget();
  ASSERT_TRUE(eventually([&] { return link.registrations() >= 2; }));
  EXPECT_GE(coordinator.service.registrations(), 2);

  coordinator.service.drain();
  ASSERT_TRUE(eventually([&] { return w.service.draining(); }));
  const StreamResult r = generate(*w.stub, make_request(golden().prompts[0], 4));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(r.status.error_message().find("draining"), std::string::npos);
  ASSERT_TRUE(eventually([&] { return coordinator.service.last_heartbeat().draining(); }));

  // Undrain: the worker takes requests again and says so.
  coordinator.service.undrain();
  ASSERT_TRUE(eventually([&] { return !w.service.draining(); }));
  ASSERT_TRUE(eventually([&] { return !coordinator.service.last_heartbeat().draining(); }));
  const StreamResult again = generate(*w.stub, make_request(golden().prompts[0], 2));
  EXPECT_TRUE(again.status.ok()) << again.status.error_message();

  // A worker that stops for good cannot be undrained.
  w.service.drain_for_shutdown();
  w.service.undrain();
  EXPECT_TRUE(w.service.draining());
}

// A worker that keeps an fp8 checkpoint's weights says so in its model info (the coordinator
// refuses to mix it with widening workers: CoordinatorServiceTest's model checks); one that
// widens them, or serves a model without fp8 weights, says nothing.
TEST_F(WorkerServiceTest, TheModelInfoSaysWhetherFp8WeightsAreKept) {
  for (const Fp8Weights fp8 : {Fp8Weights::kKeep, Fp8Weights::kWiden}) {
    ModelOptions o;
    o.show_progress = false;
    o.fp8_weights = fp8;
    TestWorker w(engine_options(), DeepseekModel::load(test::model_dir("v3_fp8"), o));
    EXPECT_EQ(w.service.model_info().weights(), fp8 == Fp8Weights::kKeep ? "fp8_e4m3" : "")
        << to_string(fp8);
    EXPECT_EQ(w.service.model_info().dtype(), "float32");
  }
  TestWorker plain;
  EXPECT_EQ(plain.service.model_info().weights(), "");
}

TEST_F(WorkerServiceTest, CallsWithoutTheSecretAreRefused) {
  TestWorker w(engine_options(), golden_model(),
               {.worker_id = "w0", .secret = std::make_shared<const SharedSecret>(kSecret)});
  const StreamResult refused = generate(*w.stub, make_request(golden().prompts[0], 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  v1::CancelRequest cancel;
  cancel.set_request_id("x");
  v1::CancelResponse cancelled;
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Bearer not-the-secret-at-all");
  EXPECT_EQ(w.stub->Cancel(&ctx, cancel, &cancelled).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(w.service.running(), 0u);
}

TEST_F(WorkerServiceTest, LinkKeepsRetryingUntilTheCoordinatorComesUp) {
  TestWorker w;
  int port = 0;
  {
    CoordinatorServer probe;  // finds a free port, then frees it
    port = probe.port;
  }
  CoordinatorLink link(link_options(w, fmt::format("127.0.0.1:{}", port)));
  std::this_thread::sleep_for(200ms);
  EXPECT_FALSE(link.registered());
  EXPECT_EQ(link.registrations(), 0);

  CoordinatorServer coordinator(port);
  ASSERT_EQ(coordinator.port, port);
  EXPECT_TRUE(eventually([&] { return link.registered(); }, 3s));
  EXPECT_EQ(coordinator.service.registrations(), 1);
}

TEST_F(WorkerServiceTest, LinkStopsPromptlyWhileTheCoordinatorIsUnreachable) {
  TestWorker w;
  CoordinatorLinkOptions o = link_options(w, "127.0.0.1:1");
  o.max_backoff_ms = 5000;
  const auto start = std::chrono::steady_clock::now();
  {
    CoordinatorLink link(o);
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
}

}  // namespace
}  // namespace mla
