// CoordinatorService's worker registry and control plane against fake workers
// (tests/unit/coordinator_fixture.h): registration checks, heartbeats and sessions, death and
// forgetting, drain and undrain, id binding, the secret, model checks, limits, readiness.
#include "tests/unit/coordinator_fixture.h"

namespace mla::test_coordinator {
namespace {

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
      {"weights", [](auto& m) { m.set_weights("fp8_e4m3"); }},
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
}  // namespace mla::test_coordinator
