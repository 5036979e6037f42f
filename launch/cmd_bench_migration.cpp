// `mlaserve bench-migration`: live migration measured against a running cluster (a coordinator
// and at least two single-rank worker groups of one model), per context length:
//   - an unmigrated greedy request (the reference tokens, and its time to first token: what
//     a replay after a failure spends recomputing the context);
//   - the same request again, migrated (Control.Migrate) once --migrate-after tokens have
//     arrived: its tokens must equal the reference; the client's stream gap at the switch
//     (last token from the source to the first from the target) is the downtime; the bytes,
//     stages, copy time and the source's stop-and-copy come from the MigrateResponse;
//   - the same request migrated by a blocking stop-and-copy (MigrateRequest.stop_first: the
//     source stops it, then sends its whole cache): that stream's gap is the baseline;
//   - the transport's ceilings in the same run: host memcpy and a loopback gRPC stream of
//     1 MiB messages (the chunk size), each over 256 MiB.
// B/token is what moved per token, all layers: (d_c + d_r) values per layer in the cache's
// dtype, against heads * (d_n + d_r + d_v) per layer for the same context as MHA keys and values.
#include <fmt/format.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <future>
#include <iostream>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "kernels/error.h"
#include "launch/commands.h"
#include "launch/deploy_flags.h"
#include "rpc/client.h"
#include "rpc/shared_secret.h"
#include "rpc/tls_credentials.h"
#include "runtime/deploy_config.h"

namespace mla::launch {
namespace {

namespace v1 = mlaserve::v1;
using Clock = std::chrono::steady_clock;

struct BenchMigrationArgs {
  std::string config_path;
  std::string address = "127.0.0.1:50051";
  std::string control_address = "127.0.0.1:50052";
  std::string contexts = "1024,4096,16384,32768";
  int32_t max_tokens = 64;
  int32_t migrate_after = 16;
  int32_t runs = 3;
  uint64_t seed = 1;
};

double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// GB/s of host memcpy over `bytes`, best of three.
double memcpy_gbps(size_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes);
  double best = 0;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    best = std::max(best, static_cast<double>(bytes) / 1e6 / ms(Clock::now() - t0));
  }
  return best;
}

// A generic service that streams `count` messages of `size` bytes to each caller.
class StreamBytes final : public grpc::CallbackGenericService {
 public:
  StreamBytes(size_t size, int count) : message_(std::string(size, 'x')), count_(count) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    class Reactor final : public grpc::ServerGenericBidiReactor {
     public:
      Reactor(const StreamBytes& s) : s_(s) { next(); }
      void OnWriteDone(bool ok) override {
        if (!ok) return Finish(grpc::Status::CANCELLED);
        next();
      }
      void OnDone() override { delete this; }

     private:
      void next() {
        if (sent_++ == s_.count_) return Finish(grpc::Status::OK);
        grpc::Slice slice(s_.message_);
        buffer_ = grpc::ByteBuffer(&slice, 1);
        StartWrite(&buffer_);
      }
      const StreamBytes& s_;
      int sent_ = 0;
      grpc::ByteBuffer buffer_;
    };
    return new Reactor(*this);
  }

 private:
  const std::string message_;
  const int count_;
};

// GB/s of a gRPC stream of 1 MiB messages between two ends on loopback TCP (this process's
// own server and client), 256 MiB in all.
double grpc_loopback_gbps() {
  constexpr size_t kMessage = 1 << 20;
  constexpr int kCount = 256;
  StreamBytes service(kMessage, kCount);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterCallbackGenericService(&service);
  auto server = builder.BuildAndStart();
  MLA_CHECK(server && port > 0, "cannot start the loopback gRPC server");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(8 << 20);
  auto channel = grpc::CreateCustomChannel(fmt::format("127.0.0.1:{}", port),
                                           grpc::InsecureChannelCredentials(), args);
  grpc::GenericStub stub(channel);

  class Reader final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
   public:
    void OnReadDone(bool ok) override {
      if (!ok) return;
      bytes += buffer_.Length();
      StartRead(&buffer_);
    }
    void OnDone(const grpc::Status& s) override { done.set_value(s); }
    size_t bytes = 0;
    std::promise<grpc::Status> done;
    grpc::ByteBuffer buffer_;
  };
  double best = 0;
  for (int i = 0; i < 3; ++i) {
    Reader reader;
    grpc::ClientContext ctx;
    const auto t0 = Clock::now();
    stub.PrepareBidiStreamingCall(&ctx, "/bench.Bytes/Stream", grpc::StubOptions(), &reader);
    reader.StartWritesDone();
    reader.StartRead(&reader.buffer_);
    reader.StartCall();
    const grpc::Status status = reader.done.get_future().get();
    MLA_CHECK(status.ok(), "loopback gRPC stream: {}", status.error_message());
    best = std::max(best, static_cast<double>(reader.bytes) / 1e6 / ms(Clock::now() - t0));
  }
  server->Shutdown();
  return best;
}

struct Timed {
  std::vector<int32_t> tokens;
  std::vector<std::pair<Clock::time_point, std::string>> messages;  // arrival, worker
  Clock::time_point start;

  // The gap at the switch: from the last message of one worker to the first of the next
  // (0 without a switch). `itl` gets the gaps between messages of one worker.
  double switch_gap(std::vector<double>* itl = nullptr) const {
    double gap = 0;
    for (size_t i = 1; i < messages.size(); ++i) {
      const double d_ms = ms(messages[i].first - messages[i - 1].first);
      if (messages[i].second != messages[i - 1].second) {
        gap = d_ms;
      } else if (itl) {
        itl->push_back(d_ms);
      }
    }
    return gap;
  }
};

// Streams `r`; when `migrate` is set, calls it on another thread once `after` tokens came.
Timed run(Client& client, const v1::GenerateRequest& r, int32_t after,
          const std::function<void()>& migrate) {
  Timed t;
  std::mutex mu;
  std::condition_variable cv;
  bool go = false, stop = false;
  std::thread mover;
  if (migrate) {
    mover = std::thread([&] {
      std::unique_lock lk(mu);
      cv.wait(lk, [&] { return go || stop; });
      if (!go) return;
      lk.unlock();
      migrate();
    });
  }
  t.start = Clock::now();
  try {
    const GenerateResult result = client.generate(r, [&](const v1::GenerateResponse& m) {
      t.messages.emplace_back(Clock::now(), m.worker_id());
      t.tokens.insert(t.tokens.end(), m.token_ids().begin(), m.token_ids().end());
      if (static_cast<int32_t>(t.tokens.size()) >= after) {
        std::lock_guard lk(mu);
        go = true;
        cv.notify_one();
      }
    });
  } catch (...) {
    {
      std::lock_guard lk(mu);
      stop = true;
    }
    cv.notify_one();
    if (mover.joinable()) mover.join();
    throw;
  }
  {
    std::lock_guard lk(mu);
    stop = true;
  }
  cv.notify_one();
  if (mover.joinable()) mover.join();
  return t;
}

int run_bench_migration(const BenchMigrationArgs& a) {
  const DeployConfig d = a.config_path.empty() ? DeployConfig{} : DeployConfig::load(a.config_path);
  Client client(a.address);
  AdminClient admin(a.control_address, SharedSecret::load(d.control.secret_file),
                    channel_credentials(d.tls), std::chrono::minutes(5));
  const v1::ListWorkersResponse workers = client.list_workers();
  MLA_REQUIRE(workers.workers_size() >= 2, "bench-migration needs two workers, {} registered",
              workers.workers_size());
  const v1::ModelInfo& model = workers.workers(0).model();
  const std::vector<int32_t> contexts = parse_ids(a.contexts, "--contexts");

  std::cout << "ceilings: memcpy " << fmt::format("{:.2f}", memcpy_gbps(256 << 20))
            << " GB/s, loopback gRPC stream (1 MiB messages) "
            << fmt::format("{:.2f}", grpc_loopback_gbps()) << " GB/s\n";
  std::mt19937 rng(a.seed);
  std::cout << fmt::format(
      "{:>7} {:>9} {:>12} {:>8} {:>9} {:>7} {:>9} {:>9} {:>9} {:>11} {:>10} {:>9} {:>12} {:>9}\n",
      "context", "tokens", "bytes", "B/token", "transport", "stages", "copy ms", "GB/s", "stop ms",
      "gap ms", "itl ms", "replay ms", "blocking gap", "identical");
  int failures = 0;
  for (int32_t context : contexts) {
    MLA_REQUIRE(context + a.max_tokens <= model.max_context(),
                "context {} + max_tokens {} exceeds the model's {}", context, a.max_tokens,
                model.max_context());
    for (int run_i = 0; run_i < a.runs; ++run_i) {
      v1::GenerateRequest r;
      for (int32_t i = 0; i < context; ++i) {
        r.add_prompt_ids(std::uniform_int_distribution<int32_t>(0, model.vocab_size() - 1)(rng));
      }
      r.set_max_tokens(a.max_tokens);
      r.set_ignore_eos(true);
      r.set_request_id(fmt::format("bench-ref-{}-{}", context, run_i));
      const Timed ref = run(client, r, 0, {});
      // Migrated live, then by a blocking stop-and-copy.
      v1::MigrateResponse moved, blocked;
      std::string error;
      auto migrated = [&](const std::string& kind, bool stop_first, v1::MigrateResponse* out) {
        r.set_request_id(fmt::format("bench-{}-{}-{}", kind, context, run_i));
        return run(client, r, a.migrate_after, [&, id = r.request_id()] {
          try {
            *out = admin.migrate(id, "", stop_first);
          } catch (const std::exception& e) {
            error = e.what();
          }
        });
      };
      const Timed mig = migrated("mig", false, &moved);
      const Timed blk = migrated("blk", true, &blocked);
      std::vector<double> itl;
      const double gap = mig.switch_gap(&itl), blocking_gap = blk.switch_gap();
      const v1::MigrationStats& s = moved.stats();
      const bool identical = mig.tokens == ref.tokens && blk.tokens == ref.tokens;
      failures += !identical;
      const double replay_ms = ref.messages.empty() ? 0 : ms(ref.messages[0].first - ref.start);
      if (!error.empty() || moved.outcome() != "migrated" || blocked.outcome() != "migrated") {
        std::cout << fmt::format(
                         "{:>7} migration {}: {}\n", context,
                         error.empty() ? moved.outcome() + "/" + blocked.outcome() : "failed",
                         error)
                  << std::flush;
        continue;
      }
      std::cout << fmt::format(
                       "{:>7} {:>9} {:>12} {:>8} {:>9} {:>7} {:>9.1f} {:>9.2f} {:>9.2f} {:>11.2f} "
                       "{:>10.2f} {:>9.1f} {:>12.2f} {:>9}\n",
                       context, s.tokens(), s.bytes(), s.bytes() / std::max(1, s.tokens()),
                       s.transport(), s.stages(), s.duration_ms(),
                       static_cast<double>(s.bytes()) / 1e6 / std::max(1e-3, s.duration_ms()),
                       s.stop_ms(), gap, median(itl), replay_ms, blocking_gap,
                       identical ? "yes" : "NO")
                << std::flush;  // each row as it comes: a long sweep may be cut off
    }
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

void add_bench_migration_command(CLI::App& app, int& exit_code) {
  auto a = std::make_shared<BenchMigrationArgs>();
  auto* cmd = app.add_subcommand(
      "bench-migration",
      "Live migration against a running cluster: downtime, bandwidth and replay time per context");
  cmd->add_option("--config", a->config_path, "Deployment config: control and tls sections");
  cmd->add_option("--address", a->address, "Coordinator")->capture_default_str();
  cmd->add_option("--control-address", a->control_address, "Its control plane")
      ->capture_default_str();
  cmd->add_option("--contexts", a->contexts, "Prompt lengths, comma-separated")
      ->capture_default_str();
  cmd->add_option("--max-tokens", a->max_tokens, "Tokens per request")->capture_default_str();
  cmd->add_option("--migrate-after", a->migrate_after, "Migrate once this many tokens arrived")
      ->capture_default_str();
  cmd->add_option("--runs", a->runs, "Runs per context")->capture_default_str();
  cmd->add_option("--seed", a->seed, "Prompt seed")->capture_default_str();
  cmd->callback([a, &exit_code] { exit_code = run_bench_migration(*a); });
}

}  // namespace mla::launch
