// CoordinatorService: the coordinator (docs/ARCHITECTURE.md section 8). It serves the client plane
// (mlaserve.v1.Coordinator: Generate, Cancel, Health, ListWorkers) and holds the registry of
// worker groups that the control plane (rpc/control_service.h, on its own authenticated
// listener) fills through register_worker() and heartbeat() and steers with drain() and
// undrain().
//
// Contracts:
// - Generate validates the request before routing: INVALID_ARGUMENT naming the field (empty
//   or oversized prompt_ids, ids outside the vocabulary, max_tokens < 1, prompt +
//   max_tokens beyond the context, bad sampling values, bad stop_ids, a request_id over
//   128 characters or not printable, resume_ids set by a client, received_ids not fewer than
//   max_tokens or outside the vocabulary); ALREADY_EXISTS for a request_id already in flight;
//   UNAVAILABLE when no worker is alive or the coordinator is stopping; RESOURCE_EXHAUSTED
//   beyond max_in_flight. The vocabulary and context are those of the live workers (all serve
//   the same model; register_worker refuses a different one).
// - received_ids (a client resuming a broken stream, perhaps begun on another coordinator)
//   count as tokens already sent: the worker continues after them and they are not sent
//   again.
// - The client's deadline and cancellation propagate to the worker call at once.
// - Failover: when a worker's stream fails (UNAVAILABLE, INTERNAL, UNKNOWN, ABORTED,
//   DATA_LOSS, a CANCELLED the client did not cause (its cancel not heard within 100 ms), a
//   stream ending without a final message, or the worker going silent), the request is resubmitted
//   to another worker it has not tried yet, with resume_ids = every token already sent to the
//   client and max_tokens unchanged, up to max_failovers times; then, or when no untried worker is
//   alive, the client gets UNAVAILABLE naming the failed worker. The client sees one
//   stream: nothing lost, nothing repeated. Other worker errors (INVALID_ARGUMENT,
//   RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...) go to the client unchanged.
// - Every relayed message carries the request id and the producing worker's id; the last
//   one carries usage counting all tokens of all attempts and the coordinator's timings.
// - Cancel(request_id) ends the request: the worker call is cancelled, and the client gets
//   a last message with finish_reason CANCELLED and status OK.
// - Workers: a worker id is bound to the address and peer (host, and TLS identity when
//   clients present certificates) that registered it; registering it from elsewhere is
//   PERMISSION_DENIED until the entry is forgotten. Heartbeats carry the session the
//   registration returned. A worker is dead after dead_after_ms without a heartbeat (its
//   running attempts are cancelled and fail over), or when a stream to it fails with
//   UNAVAILABLE; a heartbeat from a dead or unknown worker, or with another session, answers
//   known = false and the worker registers again. Dead workers are forgotten after
//   forget_dead_after_ms. A worker is draining (no new requests routed) while it says so in
//   its heartbeats or after drain(); undrain() asks it to take requests again.
// - Readiness: ready() while at least one worker is alive and the coordinator is not
//   stopping; the grpc.health status of "mlaserve.v1.Coordinator" follows it (attach_health).
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
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_set>

#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "rpc/metrics.h"
#include "rpc/routing.h"
#include "rpc/shared_secret.h"
#include "runtime/request_validation.h"
#include "runtime/sequence.h"
#include "runtime/tokenizer.h"

namespace mla {

struct CoordinatorOptions {
  RoutingPolicy policy = RoutingPolicy::kLeastLoaded;  // Default: least-loaded.
  // Requests in flight at once; beyond it Generate answers RESOURCE_EXHAUSTED. Default: 4096.
  int32_t max_in_flight = 4096;
  // A stream whose client has not taken a message for this long (it stopped reading) is
  // cancelled: the worker's request ends and its pages and admission slot are freed.
  // Default: 30 s.
  int32_t stream_write_timeout_ms = 30000;
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
  // A dead worker is forgotten (its id free to register from elsewhere) after this long
  // without a heartbeat. Default: 60 s.
  int32_t forget_dead_after_ms = 60000;
  // Workers registered at once, dead ones included; beyond it RegisterWorker answers
  // RESOURCE_EXHAUSTED. Default: 1024.
  int32_t max_workers = 1024;
  // Drain moves a worker's running requests, with their caches, to other workers (four at a
  // time, each as Migrate with the coordinator's choice of target), whether an operator
  // drains it (unless DrainRequest.finish_in_place) or it drains itself (SIGTERM); a request
  // that cannot move finishes where it runs. Off: drained workers finish what they run.
  // Default: on.
  bool migrate_on_drain = true;
  // The longest a migration's Import may take. Default: 120 s.
  int32_t migration_timeout_ms = 120000;
  // Rebalancing by live migration. When a worker's heartbeat shows cache pressure (free pages
  // below rebalance_low_free of its total, or a preemption since its previous heartbeat), the
  // coordinator moves the running request that would hold the most pages there until it ends
  // (context plus the tokens it may still generate; not one within a page of its end) to the
  // migration target (a live worker other than a prefill-only one, the most free pages
  // first), if that one has at least rebalance_high_free of its pages free and room for the
  // request; at most one move per worker per rebalance_interval_ms. Default: off; 0.1, 0.3,
  // 1000 ms.
  bool rebalance = false;
  double rebalance_low_free = 0.1;
  double rebalance_high_free = 0.3;
  int32_t rebalance_interval_ms = 1000;
  // Turns GenerateRequest.prompt into ids and the generated tokens into text (stop strings
  // too). Default: none (requests must give prompt_ids; text fields are refused).
  std::shared_ptr<const Tokenizer> tokenizer;
  // Sent with every call to a worker (the workers check it). Default: none (workers that
  // check a secret refuse the calls).
  std::shared_ptr<const SharedSecret> secret;
  // For the channels to workers. Default: null, meaning plaintext.
  std::shared_ptr<grpc::ChannelCredentials> worker_credentials;

  // Throws mla::Error(kInvalidArgument) naming the first bad field.
  void validate() const;
};

// Generate is served with gRPC's callback API (a reactor per stream, rpc/generate_relay.cpp):
// open streams cost memory, not threads, so thousands of them run on gRPC's small thread
// pool. Generate and Cancel take their requests as raw bytes and parse them here, so that
// bytes that are not a request get INVALID_ARGUMENT saying so (gRPC's own parse failure is
// INTERNAL with no message). Health and ListWorkers are short and synchronous.
class CoordinatorService final : public mlaserve::v1::Coordinator::WithRawCallbackMethod_Generate<
                                     mlaserve::v1::Coordinator::WithRawCallbackMethod_Cancel<
                                         mlaserve::v1::Coordinator::Service>> {
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
  // Records CoordinatorMetrics (rpc/metrics.h: requests by status code, prompt and generated
  // tokens, TTFT, inter-token latency, time per output token, request duration, requests in
  // flight, the live workers' waiting requests from their heartbeats, workers alive,
  // failovers, admission rejections, stream write timeouts) into `registry`, which must
  // outlive the service. Call before serving.
  void attach_metrics(MetricsRegistry& registry);

  // The client plane.
  // A serialized GenerateRequest in, serialized GenerateResponses out.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  // A serialized CancelRequest in, a serialized CancelResponse out.
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;
  grpc::Status Health(grpc::ServerContext* context, const mlaserve::v1::HealthRequest* request,
                      mlaserve::v1::HealthResponse* response) override;
  grpc::Status ListWorkers(grpc::ServerContext* context,
                           const mlaserve::v1::ListWorkersRequest* request,
                           mlaserve::v1::ListWorkersResponse* response) override;

  // The control plane's work, for ControlService (which authenticates the caller first).
  //
  // INVALID_ARGUMENT for an id or address that is empty, too long or malformed, or a model
  // without vocab_size/max_context; PERMISSION_DENIED for an id bound to another address or
  // peer; FAILED_PRECONDITION naming the field for a model (model_type, vocab_size,
  // max_context, dtype, config_hash) other than the live workers'; RESOURCE_EXHAUSTED beyond
  // max_workers. `peer` is the caller's host (from grpc::ServerContext::peer()) and identity
  // (its TLS certificate's, or empty).
  struct Peer {
    std::string host;
    std::string identity;
  };
  grpc::Status register_worker(const Peer& peer, const mlaserve::v1::RegisterWorkerRequest& request,
                               mlaserve::v1::RegisterWorkerResponse* response);
  grpc::Status heartbeat(const mlaserve::v1::HeartbeatRequest& request,
                         mlaserve::v1::HeartbeatResponse* response);
  // Routes nothing new to the worker and tells it, in its next heartbeat, to take no new
  // requests; it finishes what it runs. NOT_FOUND for an unknown id; draining = false for a
  // dead worker.
  grpc::Status drain(const mlaserve::v1::DrainRequest& request,
                     mlaserve::v1::DrainResponse* response);
  // Tells a draining worker to take requests again; it is routed to once its heartbeat says
  // it does. NOT_FOUND for an unknown id; alive = false for a dead worker.
  grpc::Status undrain(const mlaserve::v1::UndrainRequest& request,
                       mlaserve::v1::UndrainResponse* response);
  // Live migration (rpc/coordinator_migration.cpp; statuses as Control.Migrate documents):
  // picks the target (request.to_worker, or the live worker other than the source with the
  // most free pages), has it Import the request's cache from the source, and lets the relay
  // continue the client's stream there when the source stops the request. Blocks until the
  // import ends.
  grpc::Status migrate(const mlaserve::v1::MigrateRequest& request,
                       mlaserve::v1::MigrateResponse* response);
  void list_workers(mlaserve::v1::ListWorkersResponse* response) const;

  // At least one worker alive and not stopping.
  bool ready() const;
  // The live workers' vocabulary and context (the smallest), or nothing when none is alive.
  std::optional<ModelLimits> model_limits() const;
  // Keeps the grpc.health status of "mlaserve.v1.Coordinator" equal to ready(). `health`
  // must outlive the service (it belongs to the grpc::Server). Call once, before serving.
  void attach_health(grpc::HealthCheckServiceInterface* health);

  // Graceful stop, step 1: new Generate calls answer UNAVAILABLE ("stopping") and ready()
  // turns false; what is in flight goes on. Idempotent.
  void stop_accepting();
  // Waits until no request is in flight or `timeout` passes; true when none is left.
  bool wait_until_idle(std::chrono::milliseconds timeout);
  // Requests in flight now.
  size_t in_flight() const;

 private:
  using Clock = std::chrono::steady_clock;
  enum class WorkerState { kAlive, kDraining, kDead };
  // RegisterWorkerRequest.role.
  enum class Role { kBoth, kPrefill, kDecode };
  static const char* role_name(Role role);

  // An operator's drain or undrain, not yet confirmed by the worker's heartbeats.
  enum class Command { kNone, kDrain, kUndrain };

  struct WorkerEntry {
    std::string id;
    std::string address;
    Peer peer;            // who registered it: re-registration must come from the same
    std::string session;  // what its heartbeats must carry
    std::shared_ptr<mlaserve::v1::Worker::StubInterface> stub;
    mlaserve::v1::ModelInfo model;
    mlaserve::v1::WorkerLoad load;
    Clock::time_point last_heartbeat;
    WorkerState state = WorkerState::kAlive;
    bool worker_draining = false;  // as the worker last said
    Command command = Command::kNone;
    int32_t in_flight = 0;
    Role role = Role::kBoth;
    Clock::time_point last_rebalance{};  // when rebalancing last moved a request off it
    // The prefix units its cache reported keeping (WorkerLoad.cached_units, taken out of
    // `load`), for cache-aware routing; null when it reports none.
    std::shared_ptr<const std::unordered_set<uint64_t>> cached_units;
    int32_t unit_tokens = 0;
    uint64_t units_epoch = 0;  // reports of cached_units taken (WorkerView::units_epoch)
  };
  // Sets worker.load to `load`, moving its reported prefix units into cached_units.
  static void take_load(WorkerEntry& worker, const mlaserve::v1::WorkerLoad& load);

  class Relay;  // one Generate stream: rpc/generate_relay.cpp
  // The request's tokens so far (prompt and every token the client has); any thread.
  static int32_t context_tokens(const Relay& relay);
  // Tokens it may still generate (up to max_tokens); any thread.
  static int32_t tokens_left(const Relay& relay);

  // One Generate being relayed; its current worker attempt.
  struct InFlight {
    Relay* relay = nullptr;                      // alive while the entry is
    grpc::ClientContext* worker_call = nullptr;  // null between attempts
    std::string worker_id;
    bool cancel_requested = false;  // Cancel RPC
    bool worker_lost = false;       // the monitor declared the attempt's worker dead
    // A migration's target while it imports the request: when the current attempt ends, the
    // stream continues there (GenerateRequest.migrated).
    std::string migrating_to;
  };

  static const char* state_name(WorkerState state);
  // An operator's command for a live worker, and the state and readiness it gives; mu_ held.
  void set_command_locked(WorkerEntry& worker, Command command);
  // The worker an operator names, or null with `status` NOT_FOUND naming the id; mu_ held.
  WorkerEntry* find_worker_locked(const std::string& id, grpc::Status* status);
  // Cancel's work: true when the request was in flight here and is now being cancelled.
  bool cancel(const std::string& request_id);
  // Checks the request (`wanted`, as the engine's Request) against the live workers' model,
  // the in-flight table and the admission limit, and enters it in requests_ under its
  // (possibly assigned) id.
  grpc::Status admit(const mlaserve::v1::GenerateRequest& request, const Request& wanted,
                     std::string* request_id, Relay* relay);
  // Cancels the streams whose client has not taken a message for stream_write_timeout_ms;
  // mu_ held.
  void cancel_stalled_writes_locked(Clock::time_point now);
  // validate_request against the live workers' model, and received_ids inside its
  // vocabulary; kUnavailable when no worker is alive; mu_ held.
  std::optional<ModelLimits> model_limits_locked() const;
  void validate_for_model_locked(const Request& wanted,
                                 const mlaserve::v1::GenerateRequest& request) const;
  // Marks a worker dead, cancels the attempts running on it when `cancel_attempts`; mu_ held.
  void mark_dead_locked(WorkerEntry& worker, const std::string& why, bool cancel_attempts);
  // A live worker's state from what it says and what an operator asked; mu_ held.
  static void update_state_locked(WorkerEntry& worker);
  // Pushes ready() to the health service when it changed; mu_ held.
  void publish_readiness_locked();
  bool ready_locked() const;
  void monitor_loop();
  // Queues the migration of every request running on `worker` (drain); mu_ held.
  void queue_migrations_locked(const WorkerEntry& worker);
  // Queues the hand-off of a request from a prefill worker to a decode one; mu_ held.
  void queue_handoff_locked(const std::string& request_id);
  // Rebalancing (CoordinatorOptions::rebalance): after `worker`'s heartbeat, whose previous
  // one counted `preemptions_before`, queues a move of one of its requests if it is under
  // cache pressure.
  void rebalance_locked(WorkerEntry& worker, int64_t preemptions_before);
  // The live worker other than `source` with the most free pages, or null; mu_ held. A
  // prefill-only worker is never chosen; decode workers come before those that do both.
  WorkerEntry* migration_target_locked(const std::string& source);
  // Runs queued migrations, one at a time per migrator thread, until shutdown.
  void migrator_loop();

  const CoordinatorOptions options_;
  Router router_;

  mutable std::mutex mu_;
  std::map<std::string, WorkerEntry> workers_;  // by id
  std::map<std::string, InFlight> requests_;    // by request id
  uint64_t next_request_number_ = 0;
  const std::string instance_;  // random; keeps assigned request ids unique across coordinators
  bool accepting_ = true;
  bool shutting_down_ = false;
  std::condition_variable idle_cv_;  // notified when a request leaves requests_
  grpc::HealthCheckServiceInterface* health_ = nullptr;
  std::optional<bool> published_ready_;
  std::condition_variable monitor_cv_;
  std::thread monitor_;
  std::unique_ptr<CoordinatorMetrics> metrics_;  // null unless attach_metrics() was called
  std::deque<std::string> migration_queue_;      // request ids, under mu_
  std::condition_variable migrator_cv_;
  std::vector<std::thread> migrators_;  // kMigrationThreads running migrator_loop
};

}  // namespace mla
