// WorkerService: the Worker side of serving (docs/ARCHITECTURE.md section 8). It serves the
// mlaserve.v1 Worker RPCs around one tensor-parallel group's leader Engine; CoordinatorLink
// (rpc/coordinator_link.h) keeps the worker registered with the coordinators.
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
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "parallel/mpi_transport.h"
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
  // For the channels to other workers (an Import pulls a cache from its source). Default:
  // null, meaning plaintext.
  std::shared_ptr<grpc::ChannelCredentials> peer_credentials;
  // An imported cache waits this long for its migrated Generate, then its pages are freed.
  // Default: 10000 ms.
  int32_t import_hold_ms = 10000;
  // Live copies an export makes before its stop-and-copy, however much the request computes
  // meanwhile; it stops earlier once less than a cache page is left to copy. Default: 8.
  int32_t export_max_live_stages = 8;
  // This process's transport to the other ranks of its mpirun job: a migration between two
  // groups of one job moves the latents over it (ExportHeader.transport mpi) when it is usable.
  // Default: null, meaning gRPC for every migration.
  std::shared_ptr<MpiTransport> mpi;
  // Where to append one JSON line per step (workers.step_trace, `--step-trace`): when it
  // ended (seconds since the service started), its shape (StepShape's fields), the engine's
  // step_ms, and loop_ms, the step loop's whole iteration (requests added, the step, the
  // tokens handed to their streams): what `mlaserve simulate --check-trace` holds a profile
  // against. Default: empty, no trace.
  std::string step_trace;
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
// under the raw logits (temperature 1), and with top_logprobs the most likely tokens with
// theirs; only such requests pay for copying logits.
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
  // Live migration, source side (rpc/worker_migration.cpp): streams the request's latents in
  // stages while it keeps running, then stops it (its Generate stream ends with ABORTED) and
  // sends the last latents and its tokens. A failed write (the destination went away) leaves
  // the request running here.
  grpc::Status Export(grpc::ServerContext* context, const mlaserve::v1::ExportRequest* request,
                      grpc::ServerWriter<mlaserve::v1::ExportMessage>* writer) override;
  // Destination side: reserves pages for request->expected_tokens (RESOURCE_EXHAUSTED before
  // anything is copied), pulls the cache with the source's Export, and holds it for a
  // Generate with `migrated` set for the same request id, for import_hold_ms. Any failure
  // frees the pages.
  grpc::Status Import(grpc::ServerContext* context, const mlaserve::v1::ImportRequest* request,
                      mlaserve::v1::ImportResponse* response) override;

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
  // Imports copying or holding pages now (for tests: every migration leaves none).
  size_t imports_in_progress() const;
  // Polls until nothing runs (true), `timeout` passes or `give_up` (if set) returns true.
  bool wait_until_idle(std::chrono::milliseconds timeout,
                       const std::function<bool()>& give_up = {});

  // Stops accepting, ends every open stream with UNAVAILABLE, frees their pages, and stops
  // and joins the step loop. Idempotent. The engine's followers are the owner's to release
  // (engine.shutdown()) afterwards.
  void shutdown();

 private:
  struct Metrics;
  using Clock = std::chrono::steady_clock;

  // One Generate stream. The handler thread creates it and then only reads `outbox`/`end`;
  // the step loop produces them.
  struct Call {
    // Set before the call is enqueued, then read-only.
    std::string request_id;
    Request request;  // what the engine runs: prompt_ids + resume_ids
    int32_t prompt_tokens = 0;
    int32_t resumed = 0;
    bool return_logprobs = false;
    int32_t top_logprobs = 0;
    Clock::time_point arrival;
    int64_t import_handle = 0;  // a migrated request's imported cache; 0 = none

    // Set under WorkerService::mu_, read by the step loop without it.
    std::atomic<bool> cancelled{false};
    bool exporting = false;  // guarded by WorkerService::mu_: an Export is copying it

    // Step-loop thread only.
    RequestId engine_id = 0;
    bool ended = false;
    int32_t generated = 0;
    std::optional<Clock::time_point> first_step;
    std::optional<Clock::time_point> first_token;
    Clock::time_point last_token;

    std::mutex mu;
    std::condition_variable ready;
    std::deque<mlaserve::v1::GenerateResponse> outbox;  // guarded by mu
    std::optional<grpc::Status> end;                    // guarded by mu; set after the last message
  };

  // Generate without the requests_total count.
  grpc::Status generate(grpc::ServerContext* context, const mlaserve::v1::GenerateRequest* request,
                        grpc::ServerWriter<mlaserve::v1::GenerateResponse>* writer);
  // Checks a request against the protocol and the model (validate_request) and returns it
  // as the engine's Request, resume_ids not yet applied; throws kInvalidArgument naming the
  // field.
  Request validated(const mlaserve::v1::GenerateRequest& r) const;
  // Writes an enqueued call's messages as the step loop produces them, until it ends, the
  // client goes away or cancels, or its deadline passes (the call is then cancelled).
  grpc::Status stream(const std::shared_ptr<Call>& call, grpc::ServerContext& context,
                      grpc::ServerWriter<mlaserve::v1::GenerateResponse>& writer);
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

  // Work on the engine for other threads (the migration handlers): runs `fn` on the step-loop
  // thread between steps; the future gets its result or exception (kUnavailable if the loop
  // has stopped).
  template <typename F>
  std::future<std::invoke_result_t<F&>> on_step_loop(F fn) {
    using R = std::invoke_result_t<F&>;
    auto task = std::make_shared<std::packaged_task<R()>>(std::move(fn));
    std::future<R> result = task->get_future();
    post_task([task] { (*task)(); });
    return result;
  }
  // Queues a task for the step loop; throws kUnavailable once the loop has stopped.
  void post_task(std::function<void()> task);

  // Migration (rpc/worker_migration.cpp).
  // A copied cache waiting for its migrated Generate.
  struct HeldImport {
    int64_t handle = 0;           // the engine's import
    std::vector<int32_t> tokens;  // the request's tokens at the source's stop
    Clock::time_point expires;
  };
  grpc::Status export_request(grpc::ServerContext& context,
                              const mlaserve::v1::ExportRequest& request,
                              grpc::ServerWriter<mlaserve::v1::ExportMessage>& writer);
  grpc::Status import_request(grpc::ServerContext& context,
                              const mlaserve::v1::ImportRequest& request,
                              mlaserve::v1::ImportResponse& response);
  // For a migrated Generate: waits while an import of the request is copying, then takes
  // its held cache if it holds exactly `tokens`; otherwise frees it (the request recomputes).
  void take_import(Call& call, const std::vector<int32_t>& tokens);
  // The channel to another worker, kept per address: a warm connection has its TCP and
  // HTTP/2 flow-control windows grown already.
  std::shared_ptr<grpc::Channel> peer_channel(const std::string& address);
  // Frees the held import of a request id, if any (Cancel of a request that never came).
  bool drop_held_import(const std::string& request_id);
  // Step loop: frees a call's imported cache that did not become its request's.
  void release_import(Call& call);
  // Step loop: frees the held imports no Generate took in time.
  void expire_held_imports(Clock::time_point now);
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
  std::deque<std::function<void()>> tasks_;             // on_step_loop's queue
  bool loop_stopped_ = false;                           // no task runs any more
  std::map<std::string, int64_t> importing_;            // request id -> import handle, copying
  std::map<std::string, HeldImport> held_imports_;      // request id -> a copied cache
  std::condition_variable import_done_;                 // an import left importing_
  std::map<std::string, std::shared_ptr<grpc::Channel>> peer_channels_;  // by address
  uint64_t next_request_number_ = 1;
  mlaserve::v1::WorkerLoad load_;  // tokens_per_second left at 0
  // With prefix caching: at most this many kept units are reported (WorkerLoad.cached_units),
  // and the index's inserts, evictions and lookups when they were last listed.
  static constexpr size_t kReportedUnits = 4096;
  int64_t reported_units_version_ = -1;
  // The step thread's: the engine has work but its last try ran no step (see step_loop).
  bool stalled_ = false;
  std::ofstream step_trace_;  // open when options_.step_trace is set; the step thread's
  Clock::time_point started_ = Clock::now();
  mutable std::deque<std::pair<Clock::time_point, int64_t>> token_events_;

  std::thread step_thread_;  // started last in the constructor

  // Step-loop thread only.
  std::map<RequestId, std::shared_ptr<Call>> in_engine_;
  std::vector<std::shared_ptr<Call>> not_yet_stepped_;  // added since the last step (queue_ms)
  Clock::time_point last_plan_ = Clock::now();          // the last step or heartbeat
};

}  // namespace mla
