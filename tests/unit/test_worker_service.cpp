// WorkerService over loopback gRPC: streamed tokens against the golden greedy tokens,
// concurrency, resume_ids continuation, input validation, client cancel, deadlines, the
// Cancel RPC, shutdown with open streams, load reports, step traces, imports. The link to
// the coordinator is test_coordinator_link.cpp; the fixture is worker_fixture.h.
//
// Models: the golden "v3" checkpoint in tests/data (transformers' greedy tokens are the
// expectation), and for requests a test cancels, the same weights with a 4096-token context
// so that a request is certain to still run when the test acts on it. Every RPC carries a
// deadline so a hang fails the test instead of blocking.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "rpc/coordinator_link.h"
#include "rpc/worker_service.h"
#include "runtime/deepseek_model.h"
#include "runtime/engine.h"
#include "runtime/prefix_index.h"
#include "runtime/sampler.h"
#include "tests/support/golden.h"
#include "tests/unit/worker_fixture.h"

namespace mla {
namespace {

using namespace test_worker;  // NOLINT: the fixture's names are these tests' vocabulary

// ---------------------------------------------------------------------------------------
// Streaming

TEST_F(WorkerServiceTest, GreedyStreamReproducesGoldenTokensOneMessagePerToken) {
  TestWorker w;
  const Tokens& prompt = golden().prompts[0];
  const Tokens& expected = golden().greedy[0];
  v1::GenerateRequest req = make_request(prompt, static_cast<int32_t>(expected.size()));
  req.set_request_id("golden-0");
  const StreamResult r = generate(*w.stub, req);

  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, expected);
  ASSERT_EQ(r.messages.size(), expected.size());
  for (size_t i = 0; i < r.messages.size(); ++i) {
    EXPECT_EQ(r.messages[i].request_id(), "golden-0");
    EXPECT_EQ(r.messages[i].worker_id(), "w0");
    EXPECT_EQ(r.messages[i].finish_reason() == v1::FINISH_REASON_UNSPECIFIED,
              i + 1 < r.messages.size());
  }
  const v1::GenerateResponse& last = r.messages.back();
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(last.usage().prompt_tokens(), static_cast<int32_t>(prompt.size()));
  EXPECT_EQ(last.usage().completion_tokens(), static_cast<int32_t>(expected.size()));
  EXPECT_GE(last.timings().queue_ms(), 0);
  EXPECT_LE(last.timings().queue_ms(), last.timings().ttft_ms());
  EXPECT_LE(last.timings().ttft_ms(), last.timings().total_ms());
  EXPECT_TRUE(r.logprobs.empty());
  EXPECT_TRUE(w.all_pages_free());
}

TEST_F(WorkerServiceTest, WithoutIgnoreEosTheGoldenStreamStopsAtEos) {
  TestWorker w;
  v1::GenerateRequest req = make_request(golden().prompts[0], 8);
  req.set_ignore_eos(false);
  const StreamResult r = generate(*w.stub, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, Tokens{golden().greedy[0][0]});  // the golden model's eos id
  EXPECT_EQ(r.messages.back().finish_reason(), v1::FINISH_REASON_STOP);
}

TEST_F(WorkerServiceTest, LogprobsMatchTheEngineLogits) {
  TestWorker w;
  v1::GenerateRequest req = make_request(golden().prompts[1], 6, /*seed=*/11);
  req.set_return_logprobs(true);
  const StreamResult r = generate(*w.stub, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();

  Engine local(golden_model(), engine_options());
  Request lr;
  lr.prompt = golden().prompts[1];
  lr.max_tokens = 6;
  lr.ignore_eos = true;
  lr.sampling = {.temperature = 0.8f, .top_k = 0, .top_p = 1, .seed = 11};
  lr.return_logits = true;
  local.add_request(lr);
  Tokens tokens;
  std::vector<float> logprobs;
  while (local.has_work()) {
    for (const StepOutput& o : local.step()) {
      tokens.push_back(o.token);
      logprobs.push_back(
          token_logprob(o.logits.data(), golden_model()->config().vocab_size, o.token));
    }
  }
  EXPECT_EQ(r.tokens, tokens);
  ASSERT_EQ(r.logprobs.size(), logprobs.size());
  for (size_t i = 0; i < logprobs.size(); ++i) {
    EXPECT_NEAR(r.logprobs[i], logprobs[i], 1e-5) << "token " << i;
    EXPECT_LE(r.logprobs[i], 0.0f);
  }

  // With top_logprobs: per token, the most likely ones, as top_logprobs() gives them.
  req.set_top_logprobs(4);
  const StreamResult top = generate(*w.stub, req);
  ASSERT_TRUE(top.status.ok()) << top.status.error_message();
  EXPECT_EQ(top.tokens, tokens);
  std::vector<v1::TopLogprobs> got;
  for (const auto& m : top.messages)
    got.insert(got.end(), m.top_logprobs().begin(), m.top_logprobs().end());
  ASSERT_EQ(got.size(), tokens.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].token_ids_size(), 4);
    for (int k = 1; k < 4; ++k) EXPECT_GE(got[i].logprobs(k - 1), got[i].logprobs(k));
    // The sampled token is among them or less likely than all of them.
    const auto at = std::find(got[i].token_ids().begin(), got[i].token_ids().end(), tokens[i]);
    if (at != got[i].token_ids().end()) {
      EXPECT_NEAR(got[i].logprobs(static_cast<int>(at - got[i].token_ids().begin())), logprobs[i],
                  1e-5);
    } else {
      EXPECT_LE(logprobs[i], got[i].logprobs(3));
    }
  }
  req.set_top_logprobs(21);
  const StreamResult too_many = generate(*w.stub, req);
  EXPECT_EQ(too_many.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(too_many.status.error_message().find("top_logprobs: must be 0 to 20"),
            std::string::npos)
      << too_many.status.error_message();
}

TEST_F(WorkerServiceTest, SixteenConcurrentStreamsEachGetTheirGoldenTokens) {
  TestWorker w;
  constexpr int kStreams = 16;
  std::vector<StreamResult> results(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      const size_t g = i % golden().prompts.size();
      results[i] = generate(*w.stub, make_request(golden().prompts[g],
                                                  static_cast<int32_t>(golden().greedy[g].size())));
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(results[i].status.ok())
        << "stream " << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, golden().greedy[i % golden().prompts.size()]) << "stream " << i;
  }
  EXPECT_TRUE(w.all_pages_free());
  const v1::WorkerLoad load = w.service.load();
  EXPECT_EQ(load.running(), 0);
  EXPECT_EQ(load.waiting(), 0);
  EXPECT_EQ(load.total_pages(), 64);
  EXPECT_GT(load.tokens_per_second(), 0);  // 128 tokens within the last 2 s
}

// ---------------------------------------------------------------------------------------
// Failover continuation

class ResumeTest : public WorkerServiceTest,
                   public ::testing::WithParamInterface<std::optional<uint64_t>> {};

TEST_P(ResumeTest, ContinuationEqualsAnUninterruptedRun) {
  TestWorker w;
  constexpr int32_t kMax = 12;
  const Tokens& prompt = golden().prompts[2];
  const StreamResult full = generate(*w.stub, make_request(prompt, kMax, GetParam()));
  ASSERT_TRUE(full.status.ok()) << full.status.error_message();
  ASSERT_EQ(full.tokens.size(), static_cast<size_t>(kMax));

  for (int32_t sent : {1, 5, kMax - 1}) {
    v1::GenerateRequest req = make_request(prompt, kMax, GetParam());
    for (int32_t i = 0; i < sent; ++i) req.add_resume_ids(full.tokens[i]);
    const StreamResult rest = generate(*w.stub, req);
    ASSERT_TRUE(rest.status.ok()) << rest.status.error_message();
    EXPECT_EQ(rest.tokens, Tokens(full.tokens.begin() + sent, full.tokens.end()))
        << "resumed after " << sent;
    EXPECT_EQ(rest.messages.back().finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(rest.messages.back().usage().completion_tokens(), kMax);
    EXPECT_EQ(rest.messages.back().usage().prompt_tokens(), static_cast<int32_t>(prompt.size()));
  }

  // Everything already produced: only the final message.
  v1::GenerateRequest done = make_request(prompt, kMax, GetParam());
  for (int32_t t : full.tokens) done.add_resume_ids(t);
  const StreamResult r = generate(*w.stub, done);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_TRUE(r.tokens.empty());
  ASSERT_EQ(r.messages.size(), 1u);
  EXPECT_EQ(r.messages[0].finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.messages[0].usage().completion_tokens(), kMax);
  EXPECT_TRUE(w.all_pages_free());
}

INSTANTIATE_TEST_SUITE_P(GreedyAndSeeded, ResumeTest,
                         ::testing::Values(std::nullopt, std::optional<uint64_t>(1234)),
                         [](const auto& info) { return info.param ? "seeded" : "greedy"; });

// ---------------------------------------------------------------------------------------
// Migration (the end-to-end moves are in tests/e2e/test_migration.cpp)

TEST_F(WorkerServiceTest, AMigratedGenerateWithoutAnImportedCacheRecomputesItsContext) {
  TestWorker w;
  constexpr int32_t kMax = 12;
  const Tokens& prompt = golden().prompts[1];
  const StreamResult full = generate(*w.stub, make_request(prompt, kMax));
  ASSERT_TRUE(full.status.ok()) << full.status.error_message();
  v1::GenerateRequest moved = make_request(prompt, kMax);
  moved.set_request_id("arrived-without-cache");
  moved.set_migrated(true);
  for (int32_t i = 0; i < 5; ++i) moved.add_resume_ids(full.tokens[i]);
  const StreamResult rest = generate(*w.stub, moved);
  ASSERT_TRUE(rest.status.ok()) << rest.status.error_message();
  EXPECT_EQ(rest.tokens, Tokens(full.tokens.begin() + 5, full.tokens.end()));
  EXPECT_TRUE(w.all_pages_free());
  EXPECT_EQ(w.service.imports_in_progress(), 0u);
}

TEST_F(WorkerServiceTest, AnImportWithoutRoomIsRefusedBeforeTheSourceIsCalled) {
  TestWorker w(engine_options(/*block_size=*/16, /*num_pages=*/4));  // room for 64 tokens
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + kRpcDeadline);
  v1::ImportRequest ask;
  ask.set_request_id("too-big");
  ask.set_source_worker_id("nowhere");
  ask.set_source_address("127.0.0.1:1");  // nothing listens: a call would fail UNAVAILABLE
  ask.set_expected_tokens(100);
  v1::ImportResponse response;
  const grpc::Status status = w.stub->Import(&ctx, ask, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_NE(status.error_message().find("no room"), std::string::npos) << status.error_message();
  EXPECT_EQ(w.service.imports_in_progress(), 0u);
  EXPECT_TRUE(w.all_pages_free());

  // With room, the unreachable source fails the import, and its pages are freed.
  grpc::ClientContext ctx2;
  ctx2.set_deadline(std::chrono::system_clock::now() + kRpcDeadline);
  ask.set_expected_tokens(40);
  const grpc::Status unreachable = w.stub->Import(&ctx2, ask, &response);
  EXPECT_EQ(unreachable.error_code(), grpc::StatusCode::UNAVAILABLE) << unreachable.error_message();
  EXPECT_EQ(w.service.imports_in_progress(), 0u);
  EXPECT_TRUE(w.all_pages_free());
}

// A source whose Export answers nothing until its call ends: an import from it holds its pages.
class SilentSource final : public v1::Worker::Service {
 public:
  SilentSource() {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(this);
    server_ = builder.BuildAndStart();
  }
  ~SilentSource() override { server_->Shutdown(std::chrono::system_clock::now() + 1s); }
  std::string address() const { return fmt::format("127.0.0.1:{}", port_); }
  grpc::Status Export(grpc::ServerContext* context, const v1::ExportRequest*,
                      grpc::ServerWriter<v1::ExportMessage>*) override {
    while (!context->IsCancelled()) std::this_thread::sleep_for(5ms);
    return grpc::Status::CANCELLED;
  }

 private:
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

// A request that waits for pages an import holds, with nothing running, does not make the
// step loop spin: the process stays nearly idle; the request runs once the import gives its
// pages back.
TEST_F(WorkerServiceTest, ARequestWaitingForAnImportsPagesDoesNotSpinTheStepLoop) {
  TestWorker w(engine_options(/*block_size=*/4, /*num_pages=*/16));  // room for 64 tokens
  SilentSource source;
  grpc::ClientContext import_ctx;
  import_ctx.set_deadline(std::chrono::system_clock::now() + kRpcDeadline);
  v1::ImportRequest ask;
  ask.set_request_id("holding");
  ask.set_source_worker_id("silent");
  ask.set_source_address(source.address());
  ask.set_expected_tokens(56);  // 14 of the 16 pages
  grpc::Status imported;
  std::thread importer([&] {
    v1::ImportResponse response;
    imported = w.stub->Import(&import_ctx, ask, &response);
  });
  ASSERT_TRUE(eventually([&] { return w.service.load().free_pages() == 2; }));
  const Tokens& prompt = golden().prompts[1];  // needs more than 2 pages of 4
  ASSERT_GT(prompt.size(), 8u);
  std::promise<StreamResult> waiting;
  std::thread client([&] { waiting.set_value(generate(*w.stub, make_request(prompt, 2))); });
  ASSERT_TRUE(eventually([&] { return w.service.load().waiting() == 1; }));
  auto cpu_ms = [] {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e3 +
           (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e3;
  };
  const double before = cpu_ms();
  std::this_thread::sleep_for(500ms);
  const double used = cpu_ms() - before;
  EXPECT_LT(used, 150.0) << "ms of CPU in 500 ms while the request waited";
  import_ctx.TryCancel();  // the import fails and frees its pages
  importer.join();
  EXPECT_FALSE(imported.ok());
  const StreamResult r = waiting.get_future().get();
  client.join();
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens.size(), 2u);
  EXPECT_TRUE(w.all_pages_free());
}

TEST_F(WorkerServiceTest, AnExportToAnotherModelIsRefusedNamingTheField) {
  TestWorker w;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + kRpcDeadline);
  v1::ExportRequest ask;
  ask.set_request_id("any");
  *ask.mutable_model() = w.service.model_info();
  ask.mutable_model()->set_config_hash("0123");
  auto reader = w.stub->Export(&ctx, ask);
  v1::ExportMessage m;
  EXPECT_FALSE(reader->Read(&m));
  const grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_NE(status.error_message().find("config_hash"), std::string::npos)
      << status.error_message();

  // The same model, a request that does not run here.
  grpc::ClientContext ctx2;
  ctx2.set_deadline(std::chrono::system_clock::now() + kRpcDeadline);
  *ask.mutable_model() = w.service.model_info();
  auto reader2 = w.stub->Export(&ctx2, ask);
  EXPECT_FALSE(reader2->Read(&m));
  EXPECT_EQ(reader2->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------------------
// Bad input

TEST_F(WorkerServiceTest, BadInputGetsInvalidArgumentNamingTheFieldAndServingGoesOn) {
  TestWorker w;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    const char* what;
    std::function<void(v1::GenerateRequest&)> mutate;
    const char* message;  // a substring the status message must contain
  };
  const std::vector<Case> cases = {
      {"empty prompt", [](auto& r) { r.clear_prompt_ids(); }, "prompt_ids: must not be empty"},
      {"token = vocab", [](auto& r) { r.set_prompt_ids(2, 256); },
       "prompt_ids[2]: 256 is outside the vocabulary [0, 256)"},
      {"negative token", [](auto& r) { r.set_prompt_ids(0, -1); }, "prompt_ids[0]: -1"},
      {"bad resume id",
       [](auto& r) {
         r.add_resume_ids(3);
         r.add_resume_ids(1000);
       },
       "resume_ids[1]: 1000"},
      {"max_tokens 0", [](auto& r) { r.set_max_tokens(0); }, "max_tokens: must be >= 1, got 0"},
      {"max_tokens < 0", [](auto& r) { r.set_max_tokens(-3); }, "max_tokens: must be >= 1"},
      {"over context", [](auto& r) { r.set_max_tokens(252); },
       "+ max_tokens (252) = 257 exceeds the model's context of 256"},
      {"negative temperature", [](auto& r) { r.mutable_sampling()->set_temperature(-1); },
       "sampling.temperature"},
      {"NaN temperature", [&](auto& r) { r.mutable_sampling()->set_temperature(nan); },
       "sampling.temperature"},
      {"infinite temperature", [&](auto& r) { r.mutable_sampling()->set_temperature(inf); },
       "sampling.temperature"},
      {"negative top_k", [](auto& r) { r.mutable_sampling()->set_top_k(-1); },
       "sampling.top_k: must be >= 0"},
      {"top_k > vocab", [](auto& r) { r.mutable_sampling()->set_top_k(257); }, "sampling.top_k"},
      {"top_p > 1", [](auto& r) { r.mutable_sampling()->set_top_p(1.5f); }, "sampling.top_p"},
      {"negative top_p", [](auto& r) { r.mutable_sampling()->set_top_p(-0.1f); }, "sampling.top_p"},
      {"NaN top_p", [&](auto& r) { r.mutable_sampling()->set_top_p(nan); }, "sampling.top_p"},
      {"long request_id", [](auto& r) { r.set_request_id(std::string(129, 'x')); },
       "request_id: 129 characters (limit 128)"},
      {"unprintable request_id", [](auto& r) { r.set_request_id("a\nb"); },
       "request_id: only printable ASCII"},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest req = make_request(golden().prompts[0], 4);
    c.mutate(req);
    const StreamResult r = generate(*w.stub, req);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.what;
    EXPECT_NE(r.status.error_message().find(c.message), std::string::npos)
        << c.what << ": " << r.status.error_message();
    EXPECT_TRUE(r.messages.empty()) << c.what;
  }

  // The edges are valid: exactly the context, top_p 0 (off) and 1, top_k = vocab, an id of
  // 128 characters.
  v1::GenerateRequest edge = make_request(golden().prompts[0], 4, /*seed=*/3);
  edge.mutable_sampling()->set_top_k(256);
  edge.set_request_id(std::string(128, 'y'));
  EXPECT_TRUE(generate(*w.stub, edge).status.ok());
  edge.mutable_sampling()->set_top_p(1);
  edge.set_max_tokens(256 - static_cast<int32_t>(golden().prompts[0].size()));
  const StreamResult full = generate(*w.stub, edge);
  EXPECT_TRUE(full.status.ok()) << full.status.error_message();
  EXPECT_EQ(full.tokens.size(), 256 - golden().prompts[0].size());

  const StreamResult ok = generate(*w.stub, make_request(golden().prompts[0], 8));
  ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.tokens, golden().greedy[0]);
}

TEST_F(WorkerServiceTest, ARequestThatCanNeverFitIsResourceExhausted) {
  TestWorker w(engine_options(/*block_size=*/16, /*num_pages=*/4));  // 64 tokens in all
  const StreamResult r = generate(*w.stub, make_request(golden().prompts[0], 100));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(r.status.error_message().find("cache pages"), std::string::npos)
      << r.status.error_message();
  EXPECT_TRUE(generate(*w.stub, make_request(golden().prompts[0], 8)).status.ok());
}

TEST_F(WorkerServiceTest, ARunningRequestIdCannotBeReused) {
  const std::unique_ptr<TestWorker> worker = long_context_worker();
  TestWorker& w = *worker;
  v1::GenerateRequest req = make_request(golden().prompts[0], kLongRun);
  req.set_request_id("dup");
  OpenStream first(*w.stub, req);
  ASSERT_TRUE(first.read().has_value());

  const StreamResult second = generate(*w.stub, req);
  EXPECT_EQ(second.status.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_NE(second.status.error_message().find("'dup'"), std::string::npos);

  first.ctx.TryCancel();
  EXPECT_EQ(first.finish().error_code(), grpc::StatusCode::CANCELLED);
  // Once the first ended, the id is free again.
  req.set_max_tokens(4);
  EXPECT_TRUE(eventually([&] { return generate(*w.stub, req).status.ok(); }));
}

// ---------------------------------------------------------------------------------------
// Cancellation, deadlines, shutdown

TEST_F(WorkerServiceTest, ClientCancelMidStreamFreesEveryPagePromptly) {
  const std::unique_ptr<TestWorker> worker = long_context_worker();
  TestWorker& w = *worker;
  OpenStream s(*w.stub, make_request(golden().prompts[2], kLongRun));
  ASSERT_TRUE(s.read().has_value());
  EXPECT_LT(w.service.load().free_pages(), w.service.load().total_pages());
  s.ctx.TryCancel();
  EXPECT_EQ(s.finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(w.all_pages_free(500ms));
  EXPECT_EQ(w.service.load().running(), 0);
  EXPECT_TRUE(generate(*w.stub, make_request(golden().prompts[0], 8)).status.ok());
}

TEST_F(WorkerServiceTest, ADeadlineOfOneMillisecondIsDeadlineExceeded) {
  const std::unique_ptr<TestWorker> worker = long_context_worker();
  TestWorker& w = *worker;
  const StreamResult r = generate(*w.stub, make_request(golden().prompts[2], kLongRun), 1ms);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(w.all_pages_free(500ms));
}

TEST_F(WorkerServiceTest, CancelRpcEndsTheStreamWithFinishReasonCancelled) {
  const std::unique_ptr<TestWorker> worker = long_context_worker();
  TestWorker& w = *worker;
  v1::GenerateRequest req = make_request(golden().prompts[1], kLongRun);
  req.set_request_id("to-cancel");
  OpenStream s(*w.stub, req);
  ASSERT_TRUE(s.read().has_value());

  const auto cancel = [&](const std::string& id) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kRpcDeadline);
    v1::CancelRequest c;
    c.set_request_id(id);
    v1::CancelResponse resp;
    EXPECT_TRUE(w.stub->Cancel(&ctx, c, &resp).ok());
    return resp.cancelled();
  };
  EXPECT_TRUE(cancel("to-cancel"));
  std::vector<v1::GenerateResponse> rest;
  EXPECT_TRUE(s.finish(&rest).ok());
  ASSERT_FALSE(rest.empty());
  const v1::GenerateResponse& last = rest.back();
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_EQ(last.request_id(), "to-cancel");
  EXPECT_GE(last.usage().completion_tokens(), 1);
  EXPECT_LT(last.usage().completion_tokens(), kLongRun);
  EXPECT_TRUE(w.all_pages_free(500ms));

  EXPECT_FALSE(cancel("to-cancel"));  // no longer running
  EXPECT_FALSE(cancel("never-seen"));
}

TEST_F(WorkerServiceTest, ShutdownEndsOpenStreamsWithUnavailableAndReturns) {
  const std::unique_ptr<TestWorker> worker = long_context_worker();
  TestWorker& w = *worker;
  std::vector<std::unique_ptr<OpenStream>> streams;
  for (int i = 0; i < 3; ++i) {
    streams.push_back(
        std::make_unique<OpenStream>(*w.stub, make_request(golden().prompts[i], kLongRun)));
    ASSERT_TRUE(streams.back()->read().has_value());
  }
  const auto start = std::chrono::steady_clock::now();
  w.service.shutdown();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
  for (auto& s : streams) {
    const grpc::Status status = s->finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  }
  EXPECT_EQ(w.service.load().free_pages(), w.service.load().total_pages());
  const StreamResult late = generate(*w.stub, make_request(golden().prompts[0], 4));
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  w.service.shutdown();  // idempotent
}

TEST_F(WorkerServiceTest, MetricsCountRequestsTokensAndPages) {
  MetricsRegistry registry;  // outlives the service, as attach_metrics() requires
  TestWorker w;
  w.service.attach_metrics(registry);
  EXPECT_THROW(w.service.attach_metrics(registry), Error);

  ASSERT_TRUE(generate(*w.stub, make_request(golden().prompts[0], 8)).status.ok());
  EXPECT_EQ(generate(*w.stub, make_request({}, 8)).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  const Labels worker = {{"worker", "w0"}};
  RequestMetrics requests(registry, worker);
  EXPECT_EQ(requests.requests_total("OK").value(), 1);
  EXPECT_EQ(requests.requests_total("INVALID_ARGUMENT").value(), 1);
  EXPECT_EQ(requests.tokens_generated.value(), 8);
  EXPECT_EQ(requests.ttft_seconds.count(), 1u);
  EXPECT_EQ(requests.inter_token_latency_seconds.count(), 7u);
  EXPECT_EQ(requests.in_flight.value(), 0);
  CacheMetrics cache(registry, worker);
  EXPECT_EQ(cache.pages_total.value(), 64);
  EXPECT_TRUE(eventually([&] { return cache.pages_used.value() == 0; }));
  EXPECT_NE(registry.render().find("mlaserve_requests_total{code=\"OK\",worker=\"w0\"} 1"),
            std::string::npos)
      << registry.render();
}

// --step-trace: one JSON line per step, with its shape and times; the prefill step first.
TEST_F(WorkerServiceTest, AStepTraceHasALinePerStep) {
  static const TempDir dir;
  const std::string path = (dir.path() / "steps.jsonl").string();
  WorkerServiceOptions o{.worker_id = "w0"};
  o.step_trace = path;
  {
    TestWorker w(engine_options(), golden_model(), o);
    const Tokens& prompt = golden().prompts[0];
    ASSERT_TRUE(generate(*w.stub, make_request(prompt, 4)).status.ok());
    w.service.shutdown();
    std::ifstream in(path);
    std::vector<nlohmann::json> lines;
    for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
    ASSERT_EQ(static_cast<int64_t>(lines.size()), w.engine.stats().steps);
    ASSERT_GE(lines.size(), 4u) << "the prefill, then a step per further token";
    EXPECT_EQ(lines[0]["prefill_tokens"], static_cast<int>(prompt.size()));
    EXPECT_EQ(lines[1]["decode_seqs"], 1);
    for (const auto& l : lines) {
      EXPECT_GT(l["step_ms"].get<double>(), 0);
      EXPECT_GE(l["loop_ms"].get<double>(), l["step_ms"].get<double>());
      EXPECT_GT(l["t"].get<double>(), 0);
    }
  }
  WorkerServiceOptions bad{.worker_id = "w0"};
  bad.step_trace = "/nonexistent/dir/steps.jsonl";
  Engine engine(golden_model(), engine_options());
  EXPECT_THROW(WorkerService(engine, bad), Error);
}

// With prefix caching, the load lists the units the cache keeps (for cache-aware routing):
// after a one-token request, the full pages of 4 tokens its prompt fills, most recently used
// first, keyed as a router keys a prompt.
TEST_F(WorkerServiceTest, TheLoadListsTheKeptPrefixUnits) {
  EngineOptions eo = engine_options(4);
  eo.prefix_caching = true;
  TestWorker w(eo);
  const Tokens& prompt = golden().prompts[2];
  ASSERT_TRUE(generate(*w.stub, make_request(prompt, 1)).status.ok());
  const v1::WorkerLoad load = w.service.load();
  EXPECT_EQ(load.prefix_unit_tokens(), 4);
  const std::vector<uint64_t> keys = prefix_unit_keys(prompt, 4);
  ASSERT_EQ(keys.size(), prompt.size() / 4);
  ASSERT_EQ(load.cached_units_size(), static_cast<int>(keys.size()));
  // A parent is more recent than its children: the first page first.
  for (size_t i = 0; i < keys.size(); ++i) {
    EXPECT_EQ(load.cached_units(static_cast<int>(i)), keys[i]) << i;
  }
  TestWorker plain;
  EXPECT_EQ(plain.service.load().cached_units_size(), 0);
  EXPECT_EQ(plain.service.load().prefix_unit_tokens(), 0) << "no caching: nothing reported";
}

}  // namespace
}  // namespace mla
