// CoordinatorService: the client-facing mlaserve.v1.Coordinator (DESIGN.md section 7).
//
// Keeps a registry of worker groups (registered through RegisterWorker, kept alive by
// Heartbeat), routes each Generate to one of them (rpc/routing.h) and relays the worker's
// token stream to the client as it arrives.
//
// Contracts:
// - Generate validates the request before routing: INVALID_ARGUMENT naming the field (empty
//   or oversized prompt_ids, ids outside the vocabulary, max_tokens < 1, prompt +
//   max_tokens beyond the context, bad sampling values, bad stop_ids, a request_id over
//   128 characters or not printable, resume_ids set by a client); ALREADY_EXISTS for a
//   request_id already in flight; UNAVAILABLE when no worker is alive; RESOURCE_EXHAUSTED
//   beyond max_in_flight. The vocabulary and context are those of the live workers (all
//   must serve the same model; RegisterWorker refuses a different one).
// - The client's deadline and cancellation propagate to the worker call at once.
// - Failover: when a worker's stream fails (UNAVAILABLE, INTERNAL, UNKNOWN, ABORTED,
//   DATA_LOSS, a CANCELLED the client did not cause, a stream ending without a final
//   message, or the worker going silent), the request is resubmitted to another worker
//   it has not tried yet, with resume_ids = every token already sent to the client and
//   max_tokens unchanged, up to max_failovers times; then, or when no untried worker is
//   alive, the client gets UNAVAILABLE naming the failed worker. The client sees one
//   stream: nothing lost, nothing repeated. Other worker errors (INVALID_ARGUMENT,
//   RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...) go to the client unchanged.
// - Every relayed message carries the request id and the producing worker's id; the last
//   one carries usage counting all tokens of all attempts and the coordinator's timings.
// - Cancel(request_id) ends the request: the worker call is cancelled, and the client gets
//   a last message with finish_reason CANCELLED and status OK.
// - A worker is dead after dead_after_ms without a heartbeat (its running attempts are
//   cancelled and fail over), or when a stream to it fails with UNAVAILABLE. A heartbeat
//   from a dead or unknown worker (e.g. after a coordinator restart) answers known = false;
//   the worker re-registers, which makes it alive again at its new address (and ends a
//   drain).
//
// Thread safety: all methods are safe to call concurrently (gRPC calls them from its
// thread pool). One mutex guards the registry and the in-flight table; it is never held
// across a blocking RPC. Lifetime: call shutdown() before grpc::Server::Shutdown(), so
// relays blocked on workers end at once; destroy the service after the server.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "rpc/metrics.h"
#include "rpc/routing.h"

namespace mla {

struct CoordinatorOptions {
  RoutingPolicy policy = RoutingPolicy::kLeastLoaded;  // Default: least-loaded.
  // Requests in flight at once; beyond it Generate answers RESOURCE_EXHAUSTED. Default: 4096.
  int32_t max_in_flight = 4096;
  // Heartbeat period the workers are told to keep. Default: 500 ms.
  int32_t heartbeat_interval_ms = 500;
  // A worker silent this long is dead. Default: 1500 ms (3 missed heartbeats).
  int32_t dead_after_ms = 1500;
  // Times one request may move to another worker after a failure. Default: 3.
  int32_t max_failovers = 3;
  // Longest prompt accepted, in token ids. Default: 1 << 20.
  size_t max_prompt_ids = size_t{1} << 20;
  // Prefix-affinity key length in tokens (the workers' cache block size). Default: 64.
  int32_t affinity_block = 64;

  // Throws mla::Error(kInvalidArgument) naming the first bad field.
  void validate() const;
};

class CoordinatorService final : public mlaserve::v1::Coordinator::Service {
 public:
  // Starts the heartbeat monitor thread. Throws mla::Error(kInvalidArgument) on bad options.
  explicit CoordinatorService(CoordinatorOptions options = {});
  ~CoordinatorService() override;  // calls shutdown()

  CoordinatorService(const CoordinatorService&) = delete;
  CoordinatorService& operator=(const CoordinatorService&) = delete;

  // Stops the monitor thread, cancels every in-flight worker call and makes new Generate
  // calls answer UNAVAILABLE. Relays end with UNAVAILABLE ("coordinator shutting down").
  // Idempotent; does not wait for the relays.
  void shutdown();

  const CoordinatorOptions& options() const { return options_; }
  // Records request metrics (requests by status code, tokens, TTFT, inter-token latency,
  // requests in flight, and as queue depth the live workers' waiting requests from their
  // heartbeats) into `registry`, which must outlive the service. Call before serving.
  void attach_metrics(MetricsRegistry& registry);

  grpc::Status Generate(grpc::ServerContext* context, const mlaserve::v1::GenerateRequest* request,
                        grpc::ServerWriter<mlaserve::v1::GenerateResponse>* writer) override;
  grpc::Status Cancel(grpc::ServerContext* context, const mlaserve::v1::CancelRequest* request,
                      mlaserve::v1::CancelResponse* response) override;
  grpc::Status Health(grpc::ServerContext* context, const mlaserve::v1::HealthRequest* request,
                      mlaserve::v1::HealthResponse* response) override;
  grpc::Status ListWorkers(grpc::ServerContext* context,
                           const mlaserve::v1::ListWorkersRequest* request,
                           mlaserve::v1::ListWorkersResponse* response) override;
  // Routes nothing new to the worker and answers drain = true to its heartbeats; it
  // finishes what it runs. NOT_FOUND for an unknown id; draining = false for a dead worker.
  grpc::Status Drain(grpc::ServerContext* context, const mlaserve::v1::DrainRequest* request,
                     mlaserve::v1::DrainResponse* response) override;
  // INVALID_ARGUMENT for an empty id or address or a model without vocab_size/max_context;
  // FAILED_PRECONDITION for a model (type, vocab_size) other than the live workers'.
  grpc::Status RegisterWorker(grpc::ServerContext* context,
                              const mlaserve::v1::RegisterWorkerRequest* request,
                              mlaserve::v1::RegisterWorkerResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext* context,
                         const mlaserve::v1::HeartbeatRequest* request,
                         mlaserve::v1::HeartbeatResponse* response) override;

 private:
  using Clock = std::chrono::steady_clock;
  enum class WorkerState { kAlive, kDraining, kDead };

  struct WorkerEntry {
    std::string id;
    std::string address;
    std::shared_ptr<mlaserve::v1::Worker::StubInterface> stub;
    mlaserve::v1::ModelInfo model;
    mlaserve::v1::WorkerLoad load;
    Clock::time_point last_heartbeat;
    WorkerState state = WorkerState::kAlive;
    int32_t in_flight = 0;
  };

  // One Generate being relayed; its current worker attempt.
  struct InFlight {
    grpc::ClientContext* worker_call = nullptr;  // null between attempts
    std::string worker_id;
    bool cancel_requested = false;  // Cancel RPC
    bool worker_lost = false;       // the monitor declared the attempt's worker dead
  };

  static const char* state_name(WorkerState state);
  // Checks the request against the live workers' model, the in-flight table and the
  // admission limit, and enters it in requests_ under its (possibly assigned) id.
  grpc::Status admit(const mlaserve::v1::GenerateRequest& request, std::string* request_id);
  // Routes, relays and fails over until the request finishes or fails for good.
  grpc::Status generate(grpc::ServerContext* context, const mlaserve::v1::GenerateRequest& request,
                        grpc::ServerWriter<mlaserve::v1::GenerateResponse>* writer);
  grpc::Status relay(grpc::ServerContext* context, const mlaserve::v1::GenerateRequest& request,
                     const std::string& request_id, Clock::time_point arrival,
                     grpc::ServerWriter<mlaserve::v1::GenerateResponse>* writer);
  // Model-dependent checks against the live workers; mu_ held.
  void validate_for_model_locked(const mlaserve::v1::GenerateRequest& request) const;
  // Marks a worker dead, cancels the attempts running on it when `cancel_attempts`; mu_ held.
  void mark_dead_locked(WorkerEntry& worker, const std::string& why, bool cancel_attempts);
  void monitor_loop();

  const CoordinatorOptions options_;
  Router router_;

  mutable std::mutex mu_;
  std::map<std::string, WorkerEntry> workers_;  // by id
  std::map<std::string, InFlight> requests_;    // by request id
  uint64_t next_request_number_ = 0;
  bool shutting_down_ = false;
  std::condition_variable monitor_cv_;
  std::thread monitor_;
  std::unique_ptr<RequestMetrics> metrics_;  // null unless attach_metrics() was called
};

}  // namespace mla
