// CoordinatorService's client plane against fake workers (tests/unit/coordinator_fixture.h):
// routing, failover without lost or repeated tokens, resumed streams, validation,
// admission, cancellation, deadlines, slow clients and metrics.
#include "runtime/prefix_index.h"
#include "tests/unit/coordinator_fixture.h"

namespace mla::test_coordinator {
namespace {

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

// cache-aware routing reads the prefix units workers report keeping in their heartbeats: a
// prompt goes to the worker that keeps its leading units though the other is as loaded and
// first by id; the listed load does not carry the keys.
TEST_F(CoordinatorServiceTest, CacheAwareRoutingReadsTheUnitsWorkersReport) {
  CoordinatorOptions o = fast_options(RoutingPolicy::kCacheAware);
  o.affinity_block = 4;
  start(o);
  const v1::GenerateRequest request = make_request(16, 2);  // prompt 1..16: 4 units of 4
  const std::vector<int32_t> prompt(request.prompt_ids().begin(), request.prompt_ids().end());
  v1::WorkerLoad keeps = load(100), keeps_nothing = load(100);
  keeps_nothing.set_prefix_unit_tokens(4);
  keeps.set_prefix_unit_tokens(4);
  for (uint64_t key : prefix_unit_keys(prompt, 4)) keeps.add_cached_units(key);
  add_worker("w-a", keeps_nothing);
  add_worker("w-b", keeps);
  for (int i = 0; i < 3; ++i) {
    Stream s = generate(request);
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.last.worker_id(), "w-b") << i;
  }
  const v1::ListWorkersResponse listed = list_workers();
  ASSERT_EQ(listed.workers_size(), 2);
  for (const auto& w : listed.workers()) {
    EXPECT_EQ(w.load().cached_units_size(), 0) << w.worker_id();
  }
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
  // The gauge follows the registry (the failed worker, declared dead, registers again with
  // its next heartbeat, so the two are compared until they agree rather than once).
  EXPECT_TRUE(wait_until([&] {
    return metric(registry.render(), "mlaserve_workers_alive") == health().workers_alive();
  }));
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

}  // namespace
}  // namespace mla::test_coordinator
