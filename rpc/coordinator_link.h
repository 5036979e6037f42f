// CoordinatorLink: a worker's side of the control plane (docs/ARCHITECTURE.md section 8). It
// registers the worker with one coordinator and heartbeats its load, and passes on the
// coordinator's drain and undrain requests. A worker process keeps one link per coordinator,
// next to its WorkerService (rpc/worker_service.h), whose load() and draining() it reports.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "rpc/shared_secret.h"

namespace mla {

struct CoordinatorLinkOptions {
  // host:port of the coordinator's control plane (its Control service). Required.
  std::string coordinator_address;
  std::string worker_id;       // Required.
  std::string worker_address;  // host:port where this worker's Worker service listens. Required.
  mlaserve::v1::ModelInfo model;
  std::function<mlaserve::v1::WorkerLoad()> load;  // called for every heartbeat. Required.
  std::string role = "both";                       // RegisterWorkerRequest.role. Default: both.
  // Whether the worker takes no new requests, sent with every registration and heartbeat.
  // Default: none (never draining).
  std::function<bool()> draining;
  // Called (from the link's thread) each time the coordinator asks this worker to drain, or
  // to take requests again. Default: none.
  std::function<void()> on_drain;
  std::function<void()> on_undrain;
  // Sent with every call. Default: none (a coordinator that checks a secret refuses).
  std::shared_ptr<const SharedSecret> secret;
  // For the channel. Default: null, meaning plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  int32_t rpc_timeout_ms = 2000;  // deadline of each RegisterWorker / Heartbeat. Default: 2000.
  int32_t min_backoff_ms = 100;   // first wait before retrying registration. Default: 100.
  // The wait doubles up to this, which bounds how long a restarted coordinator waits for its
  // workers. Default: 500.
  int32_t max_backoff_ms = 500;
  // Heartbeat interval when the coordinator's answer has none. Default: 1000.
  int32_t default_heartbeat_ms = 1000;
};

// Registers this worker with the coordinator and heartbeats its load from a background
// thread, at the interval the coordinator asks for. When the coordinator is unreachable or
// no longer knows this worker (it restarted), registers again with exponential backoff;
// it never gives up. Thread-safe.
class CoordinatorLink {
 public:
  // Starts the background thread; throws kInvalidArgument if a required option is missing.
  explicit CoordinatorLink(CoordinatorLinkOptions options);
  // Stops the thread, cancelling an RPC in flight.
  ~CoordinatorLink();

  CoordinatorLink(const CoordinatorLink&) = delete;
  CoordinatorLink& operator=(const CoordinatorLink&) = delete;

  // Sends the next heartbeat now instead of at the end of the interval (the worker started
  // draining: the coordinator moves its requests as soon as it hears).
  void heartbeat_now();
  // Whether the last RegisterWorker or Heartbeat found the coordinator knowing this worker.
  bool registered() const;
  // Successful RegisterWorker calls so far.
  int64_t registrations() const;

 private:
  void run();
  bool register_once();
  // Runs one RPC with the link's deadline, cancellable by the destructor; nullopt when the
  // link is stopping.
  std::optional<grpc::Status> call_cancellable(
      const std::function<grpc::Status(grpc::ClientContext*)>& rpc);
  // False: re-register.
  bool heartbeat_once();
  // Waits up to `ms` or until stopped; false if stopped.
  bool sleep_for(int64_t ms);

  const CoordinatorLinkOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<mlaserve::v1::Control::Stub> stub_;

  mutable std::mutex mu_;
  std::condition_variable stop_cv_;
  bool stop_ = false;
  bool wake_ = false;  // heartbeat_now() was called
  bool registered_ = false;
  std::string session_;  // from the last registration
  int64_t registrations_ = 0;
  int64_t failed_registrations_ = 0;  // since the last success, to log an outage once
  int32_t heartbeat_ms_ = 0;
  grpc::ClientContext* in_flight_ = nullptr;  // cancelled by the destructor

  std::thread thread_;  // started last in the constructor
};

}  // namespace mla
