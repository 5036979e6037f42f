// The Worker side of serving (docs/ARCHITECTURE.md section 8): WorkerService serves the mlaserve.v1
// Worker RPCs around one tensor-parallel group's leader Engine, and CoordinatorLink keeps
// the worker registered with the coordinator and heartbeats its load.
//
// Thread model. The Engine is not thread-safe, so one step-loop thread owns it: gRPC
// handler threads validate a request and put it in an inbox; the step loop takes new
// requests and cancellations from the inbox, runs engine.step() while the engine has work,
// and hands each step's output to the request's handler, which streams it to the client.
// The step loop sleeps while there is nothing to do. An engine with followers needs nothing
// special: the leader's step() drives them.
//
// Lifetime, for the owner:
//   Engine engine(...);  WorkerService service(engine, {...});
//   build and start a grpc::Server with &service;  CoordinatorLink link({...});
//   ... serve ...
//   link goes; service.shutdown() (open streams end); server->Shutdown(); engine.shutdown().
// The service must outlive the grpc::Server that dispatches to it.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "rpc/metrics.h"
#include "rpc/shared_secret.h"
#include "runtime/engine.h"
#include "runtime/request_validation.h"

namespace mla {

struct WorkerServiceOptions {
  // Names this worker group in responses, logs and generated request ids. Default: "worker".
  std::string worker_id = "worker";
  // How often a handler waiting for tokens checks whether its client cancelled or its
  // deadline passed (a running request's handler also wakes at each of its tokens). With
  // 1,000 streams open a 50 ms poll cost more than half the worker's throughput in
  // wake-ups. Default: 200 ms.
  int32_t poll_interval_ms = 200;
  // The window load().tokens_per_second averages over. Default: 2000 ms.
  int32_t load_window_ms = 2000;
  // While idle, the step loop calls engine.heartbeat() this often so that the group's
  // followers, which wait for the leader's plans, do not time out. Must be well under the
  // communicator's timeout. Default: 1000 ms.
  int32_t idle_heartbeat_ms = 1000;
  // Every Generate and Cancel must carry this secret (UNAUTHENTICATED otherwise). Default:
  // none, meaning no check (in-process tests; `mlaserve worker` always sets one).
  std::shared_ptr<const SharedSecret> secret;
  // ModelInfo.config_hash to register with (model_identity.h). Default: empty.
  std::string config_hash;
};

// Serves Worker.Generate and Worker.Cancel for one Engine. Thread-safe: every public method
// may be called from any thread.
//
// Generate streams one GenerateResponse per step output for the request; the last one has
// finish_reason, usage and timings set. Timings count from the handler's arrival; queue_ms
// ends when the engine has taken the request and starts its next step. With resume_ids
// (failover) the engine continues after those tokens exactly as the original run would
// have (the sampler's random draw depends on the position, which prompt + resume_ids
// restores); usage.completion_tokens counts the resumed tokens too, and eos or stop ids
// among them are not re-checked. With return_logprobs each token comes with its log-softmax
// under the raw logits (temperature 1); only such requests pay for copying logits.
//
// Statuses: INVALID_ARGUMENT with a message naming the field; ALREADY_EXISTS for a
// request_id that is running; RESOURCE_EXHAUSTED when the request could never fit in the
// cache; UNAVAILABLE while draining or after shutdown(), and for streams shutdown() ends;
// CANCELLED / DEADLINE_EXCEEDED when the client cancels or its deadline passes, and the
// request's cache pages are freed at once. A stream ended by the Cancel RPC finishes with
// OK and finish_reason CANCELLED.
class WorkerService final : public mlaserve::v1::Worker::Service {
 public:
  // `engine` must be a group leader and outlive this service; from now on only the service's
  // step-loop thread touches it, until shutdown() returns. Throws kInvalidArgument for
  // options out of range.
  WorkerService(Engine& engine, WorkerServiceOptions options);
  // Calls shutdown().
  ~WorkerService() override;

  WorkerService(const WorkerService&) = delete;
  WorkerService& operator=(const WorkerService&) = delete;

  grpc::Status Generate(grpc::ServerContext* context, const mlaserve::v1::GenerateRequest* request,
                        grpc::ServerWriter<mlaserve::v1::GenerateResponse>* writer) override;
  // cancelled = true if the request was running (queued or in the engine) here.
  grpc::Status Cancel(grpc::ServerContext* context, const mlaserve::v1::CancelRequest* request,
                      mlaserve::v1::CancelResponse* response) override;

  // A snapshot of the cache and queues, as the step loop last saw them (requests not yet
  // taken from the inbox count as waiting), and the tokens generated per second over the
  // last load_window_ms.
  mlaserve::v1::WorkerLoad load() const;
  // What this worker serves, for registration.
  const mlaserve::v1::ModelInfo& model_info() const { return model_info_; }
  const std::string& worker_id() const { return options_.worker_id; }

  // Publishes this worker's RequestMetrics and CacheMetrics (rpc/metrics.h), labelled
  // worker=<worker_id>, into `registry`, which must outlive this service. At most once
  // (kFailedPrecondition otherwise); requests that ended before are not counted.
  void attach_metrics(MetricsRegistry& registry);

  // Stops accepting new requests (they get UNAVAILABLE "draining", with trailing metadata
  // `mlaserve-worker-state: draining`); running ones finish. Idempotent.
  void drain();
  // Accepts requests again after drain(), unless drain_for_shutdown() or shutdown() came.
  void undrain();
  // drain() that undrain() cannot reverse: the process is stopping.
  void drain_for_shutdown();
  bool draining() const;
  // Requests running (queued or in the engine) now.
  size_t running() const;
  // Polls until nothing runs (true), `timeout` passes or `give_up` (if set) returns true.
  bool wait_until_idle(std::chrono::milliseconds timeout,
                       const std::function<bool()>& give_up = {});

  // Stops accepting, ends every open stream with UNAVAILABLE, frees their pages, and stops
  // and joins the step loop. Idempotent. The engine's followers are the owner's to release
  // (engine.shutdown()) afterwards.
  void shutdown();

 private:
  struct Call;
  struct Metrics;
  using Clock = std::chrono::steady_clock;

  // Generate without the requests_total count.
  grpc::Status generate(grpc::ServerContext* context, const mlaserve::v1::GenerateRequest* request,
                        grpc::ServerWriter<mlaserve::v1::GenerateResponse>* writer);
  // Checks a request against the protocol and the model (validate_request) and returns it
  // as the engine's Request, resume_ids not yet applied; throws kInvalidArgument naming the
  // field.
  Request validated(const mlaserve::v1::GenerateRequest& r) const;
  // UNAVAILABLE, saying whether the worker drains or shuts down; the caller holds mu_.
  grpc::Status refusal_locked(grpc::ServerContext& context) const;
  // Enqueues a cancellation for the step loop; false if the call was not running.
  bool cancel_call(const std::shared_ptr<Call>& call);

  // Step-loop thread only.
  void step_loop();
  // Takes the inbox's new requests and cancellations to the engine, runs one step and
  // delivers its outputs. Throws what the engine throws.
  void run_iteration(const std::deque<std::shared_ptr<Call>>& adds,
                     const std::deque<std::shared_ptr<Call>>& cancels);
  void add_to_engine(const std::shared_ptr<Call>& call);
  mlaserve::v1::GenerateResponse new_message(const Call& call) const;
  void deliver(const StepOutput& out, Clock::time_point now);
  // Ends a call with OK after `last`, which gets the finish reason, usage and timings.
  void finish_call(Call& call, mlaserve::v1::GenerateResponse last,
                   mlaserve::v1::FinishReason reason, Clock::time_point now);
  void fail_call(Call& call, const grpc::Status& status);
  void fail_all_running(const grpc::Status& status);
  // Copies the engine's cache and queue sizes into load_; the caller holds mu_.
  void update_load_locked();

  Engine& engine_;
  const WorkerServiceOptions options_;
  const ModelLimits model_limits_;
  const mlaserve::v1::ModelInfo model_info_;

  std::unique_ptr<Metrics> metrics_owner_;  // set once, under mu_
  std::atomic<Metrics*> metrics_{nullptr};  // null until attach_metrics()

  // Guards everything below up to step_thread_.
  mutable std::mutex mu_;
  std::condition_variable wake_;  // the step loop waits here for inbox work
  bool accepting_ = true;
  bool stopping_ = false;
  bool shutting_down_soon_ = false;  // drain_for_shutdown() was called
  std::deque<std::shared_ptr<Call>> adds_;
  std::deque<std::shared_ptr<Call>> cancels_;
  std::map<std::string, std::shared_ptr<Call>> calls_;  // running requests by request_id
  uint64_t next_request_number_ = 1;
  mlaserve::v1::WorkerLoad load_;  // tokens_per_second left at 0
  mutable std::deque<std::pair<Clock::time_point, int64_t>> token_events_;

  std::thread step_thread_;  // started last in the constructor

  // Step-loop thread only.
  std::map<RequestId, std::shared_ptr<Call>> in_engine_;
  std::vector<std::shared_ptr<Call>> not_yet_stepped_;  // added since the last step (queue_ms)
  Clock::time_point last_plan_ = Clock::now();          // the last step or heartbeat
};

struct CoordinatorLinkOptions {
  // host:port of the coordinator's control plane (its Control service). Required.
  std::string coordinator_address;
  std::string worker_id;       // Required.
  std::string worker_address;  // host:port where this worker's Worker service listens. Required.
  mlaserve::v1::ModelInfo model;
  std::function<mlaserve::v1::WorkerLoad()> load;  // called for every heartbeat. Required.
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
  bool registered_ = false;
  std::string session_;  // from the last registration
  int64_t registrations_ = 0;
  int64_t failed_registrations_ = 0;  // since the last success, to log an outage once
  int32_t heartbeat_ms_ = 0;
  grpc::ClientContext* in_flight_ = nullptr;  // cancelled by the destructor

  std::thread thread_;  // started last in the constructor
};

}  // namespace mla
