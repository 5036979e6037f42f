// The WorkerService tests' fixture: the golden "v3" model (and the same weights with a
// 4096-token context, for requests a test acts on while they run), a WorkerService on a free
// loopback port (TestWorker), request builders and stream readers, and WorkerServiceTest.
// Shared by test_worker_service.cpp (the Worker RPCs) and test_coordinator_link.cpp (the
// link to the coordinator's control plane). Every RPC carries a deadline so a hang fails the
// test instead of blocking.
#pragma once

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "rpc/worker_service.h"
#include "runtime/deepseek_model.h"
#include "runtime/engine.h"
#include "tests/support/golden.h"

namespace mla::test_worker {

namespace v1 = mlaserve::v1;
using Tokens = std::vector<int32_t>;
using namespace std::chrono_literals;

inline constexpr auto kRpcDeadline = 10s;  // far above any test's need: only a hang reaches it
// Seconds of decoding on long_context_model(): still running whenever a test cancels it.
inline constexpr int32_t kLongRun = 4000;

using test::Golden;
inline std::string golden_dir() { return test::model_dir("v3"); }
inline const Golden& golden() { return test::golden("v3"); }

inline std::shared_ptr<const DeepseekModel> golden_model() {
  static const std::shared_ptr<const DeepseekModel> m =
      DeepseekModel::load(golden_dir(), {AbsorbMode::kAuto, CostModel{}, false});
  return m;
}

// A per-process temporary directory, removed at exit.
class TempDir {
 public:
  TempDir()
      : path_(std::filesystem::temp_directory_path() /
              fmt::format("mla_test_worker_service_{}", ::getpid())) {
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// The golden weights with max_position_embeddings 4096.
inline std::shared_ptr<const DeepseekModel> long_context_model() {
  static const TempDir dir;
  static const std::shared_ptr<const DeepseekModel> m = [] {
    nlohmann::json config;
    std::ifstream(golden_dir() + "/config.json") >> config;
    config["max_position_embeddings"] = 4096;
    std::ofstream(dir.path() / "config.json") << config.dump(2);
    std::filesystem::create_symlink(golden_dir() + "/model.safetensors",
                                    dir.path() / "model.safetensors");
    return DeepseekModel::load(dir.path().string(), {AbsorbMode::kAuto, CostModel{}, false});
  }();
  return m;
}

inline EngineOptions engine_options(int32_t block_size = 16, int32_t num_pages = 64) {
  EngineOptions o;
  o.block_size = block_size;
  o.num_pages = num_pages;
  return o;
}

// Polls `cond` until it holds or `timeout` passes.
inline bool eventually(const std::function<bool()>& cond, std::chrono::milliseconds timeout = 2s) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

// A grpc::Server on a free loopback port serving a WorkerService over the golden model.
inline constexpr const char* kSecret = "worker-test-control-secret";

struct TestWorker {
  explicit TestWorker(EngineOptions eo = engine_options(),
                      std::shared_ptr<const DeepseekModel> model = golden_model(),
                      WorkerServiceOptions options = {.worker_id = "w0"})
      : engine(std::move(model), eo), service(engine, std::move(options)) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    server = builder.BuildAndStart();
    EXPECT_NE(server, nullptr);
    EXPECT_GT(port, 0);
    stub = v1::Worker::NewStub(
        grpc::CreateChannel(fmt::format("127.0.0.1:{}", port), grpc::InsecureChannelCredentials()));
  }
  ~TestWorker() {
    service.shutdown();
    server->Shutdown(std::chrono::system_clock::now() + 2s);
  }

  bool all_pages_free(std::chrono::milliseconds timeout = 2s) {
    return eventually(
        [&] {
          const v1::WorkerLoad l = service.load();
          return l.free_pages() == l.total_pages();
        },
        timeout);
  }

  Engine engine;
  WorkerService service;
  int port = 0;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<v1::Worker::Stub> stub;
};

inline v1::GenerateRequest make_request(const Tokens& prompt, int32_t max_tokens,
                                        std::optional<uint64_t> seed = std::nullopt) {
  v1::GenerateRequest r;
  for (int32_t t : prompt) r.add_prompt_ids(t);
  r.set_max_tokens(max_tokens);
  r.set_ignore_eos(true);  // golden greedy[0] starts with the eos id
  if (seed) {
    r.mutable_sampling()->set_temperature(0.8f);
    r.mutable_sampling()->set_seed(*seed);
  }
  return r;
}

struct StreamResult {
  grpc::Status status;
  Tokens tokens;
  std::vector<float> logprobs;
  std::vector<v1::GenerateResponse> messages;
};

inline StreamResult generate(v1::Worker::Stub& stub, const v1::GenerateRequest& request,
                             std::chrono::milliseconds deadline = kRpcDeadline) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + deadline);
  auto reader = stub.Generate(&ctx, request);
  StreamResult out;
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    out.tokens.insert(out.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    out.logprobs.insert(out.logprobs.end(), m.logprobs().begin(), m.logprobs().end());
    out.messages.push_back(m);
  }
  out.status = reader->Finish();
  return out;
}

// An open stream the test reads message by message.
struct OpenStream {
  OpenStream(v1::Worker::Stub& stub, const v1::GenerateRequest& request) {
    ctx.set_deadline(std::chrono::system_clock::now() + kRpcDeadline);
    reader = stub.Generate(&ctx, request);
  }
  std::optional<v1::GenerateResponse> read() {
    v1::GenerateResponse m;
    if (!reader->Read(&m)) return std::nullopt;
    return m;
  }
  // Reads what is left, then the status.
  grpc::Status finish(std::vector<v1::GenerateResponse>* rest = nullptr) {
    while (auto m = read()) {
      if (rest) rest->push_back(*m);
    }
    return reader->Finish();
  }

  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
};

class WorkerServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    level_ = spdlog::get_level();
    // Requests log their start and finish, and the link tests their expected outages.
    spdlog::set_level(spdlog::level::err);
    golden_model();
  }
  static void TearDownTestSuite() { spdlog::set_level(level_); }

  static inline spdlog::level::level_enum level_ = spdlog::level::info;
};

// A worker where kLongRun-token requests fit, several at once.
inline std::unique_ptr<TestWorker> long_context_worker() {
  return std::make_unique<TestWorker>(engine_options(/*block_size=*/64, /*num_pages=*/256),
                                      long_context_model());
}

}  // namespace mla::test_worker
