// The client library against an in-test fake Coordinator on loopback.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

#include "rpc/client.h"
#include "tests/support/golden.h"

namespace mla {
namespace {

namespace v1 = mlaserve::v1;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

// Behaviour is picked by the request id:
//   "" or anything else  one token per message, prompt.back()+1, +2, ...; the first half
//                        from worker w0, the rest from w1; the last message finishes
//                        (LENGTH) with usage and timings; an empty id is assigned "req-1"
//   "hang"               one token, then waits until Cancel (-> finish CANCELLED) or until
//                        the call is cancelled or its deadline passes
//   "exhausted"          RESOURCE_EXHAUSTED before any token
//   "dies"               one token, then UNAVAILABLE
//   "big"                one message of 2M tokens (over gRPC's default 4 MiB limit)
// An empty prompt gets INVALID_ARGUMENT "prompt_ids is empty". received_ids are honoured
// (the tokens continue after them), and with break_after >= 0 a stream ends UNAVAILABLE
// after that many messages, as when its coordinator dies.
class FakeCoordinator final : public v1::Coordinator::Service {
 public:
  grpc::Status Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    if (req->prompt_ids().empty()) {
      return {grpc::StatusCode::INVALID_ARGUMENT, "prompt_ids is empty"};
    }
    const std::string& id = req->request_id();
    if (id == "exhausted") {
      return {grpc::StatusCode::RESOURCE_EXHAUSTED, "too many requests in flight (4 of 4)"};
    }
    v1::GenerateResponse msg;
    msg.set_request_id(id.empty() ? "req-1" : id);
    msg.set_worker_id("w0");
    if (id == "big") {
      for (int i = 0; i < 2'000'000; ++i) msg.add_token_ids(100000);
      msg.set_finish_reason(v1::FINISH_REASON_LENGTH);
      writer->Write(msg);
      return grpc::Status::OK;
    }
    if (id == "hang" || id == "dies") {
      {
        std::lock_guard lock(mutex_);
        running_.insert(id);
      }
      msg.add_token_ids(7);
      writer->Write(msg);
      if (id == "dies") return {grpc::StatusCode::UNAVAILABLE, "worker w0 died"};
      std::unique_lock lock(mutex_);
      while (!cancelled_.count(id)) {
        if (ctx->IsCancelled()) {
          running_.erase(id);
          saw_client_cancel_ = true;
          cv_.notify_all();
          return grpc::Status::CANCELLED;
        }
        cv_.wait_for(lock, 5ms);
      }
      cancelled_.erase(id);
      running_.erase(id);
      msg.clear_token_ids();
      msg.set_finish_reason(v1::FINISH_REASON_CANCELLED);
      msg.mutable_usage()->set_prompt_tokens(req->prompt_ids_size());
      msg.mutable_usage()->set_completion_tokens(1);
      writer->Write(msg);
      return grpc::Status::OK;
    }
    {
      std::lock_guard lock(mutex_);
      requests_.push_back(*req);
    }
    const int32_t last = req->prompt_ids(req->prompt_ids_size() - 1);
    int written = 0;
    for (int i = req->received_ids_size(); i < req->max_tokens(); ++i) {
      if (written++ == break_after) return {grpc::StatusCode::UNAVAILABLE, "Socket closed"};
      msg.clear_token_ids();
      msg.clear_logprobs();
      msg.add_token_ids(last + i + 1);
      if (req->return_logprobs()) msg.add_logprobs(-0.5f * static_cast<float>(i + 1));
      msg.set_worker_id(i < req->max_tokens() / 2 ? "w0" : "w1");
      if (i + 1 == req->max_tokens()) {
        msg.set_finish_reason(v1::FINISH_REASON_LENGTH);
        msg.mutable_usage()->set_prompt_tokens(req->prompt_ids_size());
        msg.mutable_usage()->set_completion_tokens(req->max_tokens());
        msg.mutable_timings()->set_ttft_ms(1.5);
        msg.mutable_timings()->set_total_ms(9.0);
      }
      if (!writer->Write(msg)) return grpc::Status::CANCELLED;
    }
    return grpc::Status::OK;
  }

  grpc::Status Cancel(grpc::ServerContext*, const v1::CancelRequest* req,
                      v1::CancelResponse* resp) override {
    std::lock_guard lock(mutex_);
    const bool running = running_.count(req->request_id()) > 0;
    if (running) cancelled_.insert(req->request_id());
    resp->set_cancelled(running);
    cv_.notify_all();
    return grpc::Status::OK;
  }

  grpc::Status Health(grpc::ServerContext*, const v1::HealthRequest*,
                      v1::HealthResponse* resp) override {
    ++health_calls;
    resp->set_serving(ready);
    resp->set_workers_alive(ready ? 2 : 0);
    return grpc::Status::OK;
  }

  grpc::Status ListWorkers(grpc::ServerContext*, const v1::ListWorkersRequest*,
                           v1::ListWorkersResponse* resp) override {
    *resp = workers();
    return grpc::Status::OK;
  }

  static v1::ListWorkersResponse workers() {
    v1::ListWorkersResponse resp;
    resp.set_in_flight(3);
    resp.set_max_in_flight(64);
    const char* ids[] = {"w0", "worker-long-name"};
    for (int i = 0; i < 2; ++i) {
      v1::WorkerStatus* w = resp.add_workers();
      w->set_worker_id(ids[i]);
      w->set_address(i == 0 ? "127.0.0.1:50061" : "10.0.0.2:50061");
      w->set_state(i == 0 ? "alive" : "draining");
      if (i == 1) w->set_role("prefill");
      w->mutable_model()->set_tp_size(2);
      w->mutable_load()->set_free_pages(100 - 10 * i);
      w->mutable_load()->set_total_pages(128);
      w->mutable_load()->set_running(2 + i);
      w->mutable_load()->set_waiting(i);
      w->mutable_load()->set_tokens_per_second(123.45 * (i + 1));
      w->set_in_flight(2 - i);
      w->set_ms_since_heartbeat(12.3 + i);
    }
    return resp;
  }

  bool is_running(const std::string& id) {
    std::lock_guard lock(mutex_);
    return running_.count(id) > 0;
  }
  bool wait_client_cancel(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [this] { return saw_client_cancel_; });
  }

  std::vector<v1::GenerateRequest> requests() {
    std::lock_guard lock(mutex_);
    return requests_;
  }

  std::atomic<bool> ready{true};
  std::atomic<int> health_calls{0};
  std::atomic<int> break_after{-1};

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::set<std::string> running_;
  std::set<std::string> cancelled_;
  std::vector<v1::GenerateRequest> requests_;
  bool saw_client_cancel_ = false;
};

class ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_TRUE(server_);
    ASSERT_GT(port, 0);
    address_ = "127.0.0.1:" + std::to_string(port);
    client_ = std::make_unique<Client>(address_);
  }
  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + 2s);
  }

  v1::GenerateRequest request(const std::string& id, int max_tokens = 4) {
    v1::GenerateRequest req;
    req.set_request_id(id);
    req.add_prompt_ids(10);
    req.add_prompt_ids(20);
    req.set_max_tokens(max_tokens);
    return req;
  }

  // Waits (polling) until the fake runs request `id`.
  void wait_running(const std::string& id) {
    for (int i = 0; i < 2000 && !service_.is_running(id); ++i) std::this_thread::sleep_for(1ms);
    ASSERT_TRUE(service_.is_running(id));
  }

  FakeCoordinator service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  std::unique_ptr<Client> client_;
};

// A loopback port nobody listens on (the kernel picked it free a moment ago).
int unused_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  EXPECT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  close(fd);
  return ntohs(addr.sin_port);
}

using test::code_of;

TEST_F(ClientTest, GenerateCollectsTokensAndCallsOnMessagePerMessage) {
  v1::GenerateRequest req = request("", 4);
  req.set_return_logprobs(true);
  std::vector<std::vector<int32_t>> seen;
  GenerateResult r = client_->generate(req, [&](const v1::GenerateResponse& msg) {
    seen.emplace_back(msg.token_ids().begin(), msg.token_ids().end());
  });
  EXPECT_EQ(r.request_id, "req-1");
  EXPECT_THAT(r.tokens, ElementsAre(21, 22, 23, 24));
  EXPECT_THAT(r.logprobs, ElementsAre(-0.5f, -1.0f, -1.5f, -2.0f));
  EXPECT_EQ(seen, (std::vector<std::vector<int32_t>>{{21}, {22}, {23}, {24}}));
  EXPECT_EQ(r.num_messages, 4);
  EXPECT_EQ(r.finish, v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.usage.prompt_tokens(), 2);
  EXPECT_EQ(r.usage.completion_tokens(), 4);
  EXPECT_DOUBLE_EQ(r.timings.ttft_ms(), 1.5);
  EXPECT_DOUBLE_EQ(r.timings.total_ms(), 9.0);
  EXPECT_THAT(r.worker_ids, ElementsAre("w0", "w1"));
  EXPECT_GT(r.client_total_ms, 0.0);
  EXPECT_LE(r.client_ttft_ms, r.client_total_ms);
}

TEST_F(ClientTest, GenerateWithoutCallback) {
  GenerateResult r = client_->generate(request("mine", 3));
  EXPECT_EQ(r.request_id, "mine");
  EXPECT_THAT(r.tokens, ElementsAre(21, 22, 23));
  EXPECT_TRUE(r.logprobs.empty());
}

TEST_F(ClientTest, ErrorsKeepTheServersMessage) {
  v1::GenerateRequest empty = request("x");
  empty.clear_prompt_ids();
  std::string message;
  EXPECT_EQ(code_of([&] { client_->generate(empty); }, &message), ErrorCode::kInvalidArgument);
  EXPECT_EQ(message, "INVALID_ARGUMENT: prompt_ids is empty");

  EXPECT_EQ(code_of([&] { client_->generate(request("exhausted")); }, &message),
            ErrorCode::kResourceExhausted);
  EXPECT_EQ(message, "RESOURCE_EXHAUSTED: too many requests in flight (4 of 4)");
}

TEST_F(ClientTest, ErrorAfterSomeTokensStillThrowsAfterDeliveringThem) {
  ClientOptions no_resume;
  no_resume.max_resumes = 0;
  Client client(address_, no_resume);
  int messages = 0;
  std::string message;
  EXPECT_EQ(
      code_of([&] { client.generate(request("dies"), [&](auto&) { ++messages; }); }, &message),
      ErrorCode::kUnavailable);
  EXPECT_EQ(message, "UNAVAILABLE: worker w0 died");
  EXPECT_EQ(messages, 1);
}

// Another FakeCoordinator on a free loopback port.
struct FakeServer {
  FakeServer() {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    server = builder.BuildAndStart();
    address = "127.0.0.1:" + std::to_string(port);
  }
  ~FakeServer() { server->Shutdown(std::chrono::system_clock::now() + 1s); }
  FakeCoordinator service;
  std::unique_ptr<grpc::Server> server;
  std::string address;
};

TEST_F(ClientTest, ABrokenStreamResumesOnTheNextCoordinatorWithNothingLostOrRepeated) {
  FakeServer other;
  FakeCoordinator& second = other.service;
  const std::string& second_address = other.address;
  service_.break_after = 2;  // the first coordinator "dies" after two tokens
  Client client(std::vector<std::string>{address_, second_address});
  std::vector<int32_t> streamed;
  GenerateResult r = client.generate(request("resume-me", 6), [&](const v1::GenerateResponse& m) {
    streamed.insert(streamed.end(), m.token_ids().begin(), m.token_ids().end());
  });
  EXPECT_THAT(r.tokens, ElementsAre(21, 22, 23, 24, 25, 26));
  EXPECT_EQ(streamed, r.tokens);
  EXPECT_EQ(r.finish, v1::FINISH_REASON_LENGTH);
  EXPECT_THAT(r.coordinators, ElementsAre(address_, second_address));
  const auto resumed = second.requests();
  ASSERT_EQ(resumed.size(), 1u);
  EXPECT_EQ(resumed[0].request_id(), "resume-me");
  EXPECT_THAT(resumed[0].received_ids(), ElementsAre(21, 22));
  EXPECT_EQ(resumed[0].max_tokens(), 6);
  // Calls go on to the coordinator that answered.
  service_.break_after = -1;
  EXPECT_THAT(client.generate(request("next", 2)).coordinators, ElementsAre(second_address));
}

TEST(Client, UnaryCallsUseTheFirstCoordinatorThatAnswers) {
  FakeServer live;
  const std::string dead = "127.0.0.1:" + std::to_string(unused_port());
  Client client(dead + "," + live.address);
  EXPECT_EQ(client.addresses().size(), 2u);
  EXPECT_TRUE(client.health().serving());
  EXPECT_EQ(client.list_workers().workers_size(), 2);
  EXPECT_TRUE(client.wait_until_ready(5s));
  EXPECT_THROW(Client(std::vector<std::string>{}), Error);
  EXPECT_THROW(Client("a:1,,b:2"), Error);
}

TEST_F(ClientTest, DeadlineGivesDeadlineExceededAndCancelsTheServerSide) {
  const auto start = std::chrono::steady_clock::now();
  std::string message;
  EXPECT_EQ(code_of([&] { client_->generate(request("hang"), {}, 200ms); }, &message),
            ErrorCode::kDeadlineExceeded);
  EXPECT_THAT(message, HasSubstr("DEADLINE_EXCEEDED"));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 190ms);
  EXPECT_TRUE(service_.wait_client_cancel(5s));
}

TEST_F(ClientTest, ThrowingCallbackCancelsTheStreamAndPropagates) {
  EXPECT_THROW(
      client_->generate(request("hang"), [](auto&) { throw std::runtime_error("stop reading"); }),
      std::runtime_error);
  EXPECT_TRUE(service_.wait_client_cancel(5s));
}

TEST_F(ClientTest, CancelFromAnotherThreadEndsTheStream) {
  GenerateResult r;
  std::thread gen([&] { r = client_->generate(request("hang")); });
  wait_running("hang");
  EXPECT_TRUE(client_->cancel("hang"));
  gen.join();
  EXPECT_EQ(r.finish, v1::FINISH_REASON_CANCELLED);
  EXPECT_THAT(r.tokens, ElementsAre(7));
  EXPECT_EQ(r.usage.completion_tokens(), 1);
  EXPECT_FALSE(client_->cancel("hang"));  // finished
  EXPECT_FALSE(client_->cancel("unknown"));
}

TEST_F(ClientTest, HealthAndListWorkersRoundTrip) {
  v1::HealthResponse h = client_->health();
  EXPECT_TRUE(h.serving());
  EXPECT_EQ(h.workers_alive(), 2);

  v1::ListWorkersResponse workers = client_->list_workers();
  ASSERT_EQ(workers.workers_size(), 2);
  EXPECT_EQ(workers.workers(1).worker_id(), "worker-long-name");
  EXPECT_EQ(workers.workers(1).load().free_pages(), 90);
  EXPECT_EQ(workers.max_in_flight(), 64);
}

TEST_F(ClientTest, ManyConcurrentCallsOnOneClient) {
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 5; ++i) {
        v1::GenerateRequest req = request(fmt::format("t{}-{}", t, i), 3);
        req.set_prompt_ids(1, 100 * t);
        GenerateResult r = client_->generate(req);
        if (r.tokens == std::vector<int32_t>{100 * t + 1, 100 * t + 2, 100 * t + 3} &&
            client_->health().serving()) {
          ++ok;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok, 40);
}

TEST_F(ClientTest, ReceivesMessagesOverGrpcsDefaultLimit) {
  GenerateResult r = client_->generate(request("big"));
  EXPECT_EQ(r.tokens.size(), 2'000'000u);
}

TEST_F(ClientTest, WaitUntilReadyPollsUntilServing) {
  service_.ready = false;
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(client_->wait_until_ready(300ms));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 290ms);
  EXPECT_GE(service_.health_calls, 2);

  std::thread flip([&] {
    std::this_thread::sleep_for(200ms);
    service_.ready = true;
  });
  EXPECT_TRUE(client_->wait_until_ready(10s));
  flip.join();
}

TEST_F(ClientTest, WaitUntilReadyRidesOutAServerStartingLater) {
  const int port = unused_port();
  Client late("127.0.0.1:" + std::to_string(port));
  FakeCoordinator service;
  std::unique_ptr<grpc::Server> server;
  std::thread starter([&] {
    std::this_thread::sleep_for(300ms);
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:" + std::to_string(port), grpc::InsecureServerCredentials());
    b.RegisterService(&service);
    server = b.BuildAndStart();
  });
  EXPECT_TRUE(late.wait_until_ready(20s));
  starter.join();
  ASSERT_TRUE(server);
  server->Shutdown();
}

TEST(Client, UnreachableServerIsUnavailable) {
  const int port = unused_port();
  ClientOptions options;
  options.max_resumes = 1;
  Client client("127.0.0.1:" + std::to_string(port), options);
  EXPECT_EQ(code_of([&] { client.health(); }), ErrorCode::kUnavailable);
  v1::GenerateRequest req;
  req.add_prompt_ids(1);
  std::string message;
  EXPECT_EQ(code_of([&] { client.generate(req); }, &message), ErrorCode::kUnavailable) << message;
  EXPECT_FALSE(client.wait_until_ready(200ms));
}

TEST(Client, GrpcCodesMapToErrorCodes) {
  EXPECT_EQ(error_code_from_grpc(grpc::StatusCode::INVALID_ARGUMENT), ErrorCode::kInvalidArgument);
  EXPECT_EQ(error_code_from_grpc(grpc::StatusCode::RESOURCE_EXHAUSTED),
            ErrorCode::kResourceExhausted);
  EXPECT_EQ(error_code_from_grpc(grpc::StatusCode::DEADLINE_EXCEEDED),
            ErrorCode::kDeadlineExceeded);
  EXPECT_EQ(error_code_from_grpc(grpc::StatusCode::UNAVAILABLE), ErrorCode::kUnavailable);
  EXPECT_EQ(error_code_from_grpc(grpc::StatusCode::UNIMPLEMENTED), ErrorCode::kInternal);
  Error e = error_from_grpc_status({grpc::StatusCode::OUT_OF_RANGE, "max_tokens too big"});
  EXPECT_EQ(e.code(), ErrorCode::kOutOfRange);
  EXPECT_STREQ(e.what(), "OUT_OF_RANGE: max_tokens too big");
}

TEST(Client, FormatsClusterStatusAsATable) {
  const std::string text = format_cluster_status(FakeCoordinator::workers());
  EXPECT_EQ(text,
            "WORKER            ADDRESS          STATE     ROLE     TP  PAGES FREE/TOTAL  RUNNING"
            "  WAITING  TOK/S  IN FLIGHT  HEARTBEAT AGO\n"
            "w0                127.0.0.1:50061  alive     both      2           100/128        2"
            "        0  123.5          2          12 ms\n"
            "worker-long-name  10.0.0.2:50061   draining  prefill   2            90/128        3"
            "        1  246.9          1          13 ms\n"
            "workers: 2 (1 alive); requests in flight: 3 (max 64)\n");
  const v1::ListWorkersResponse none;
  EXPECT_EQ(format_cluster_status(none),
            "no workers registered\nworkers: 0 (0 alive); requests in flight: 0 (max 0)\n");
}

}  // namespace
}  // namespace mla
