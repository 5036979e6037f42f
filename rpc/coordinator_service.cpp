#include "rpc/coordinator_service.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <random>
#include <set>

#include "kernels/error.h"
#include "rpc/generate_request.h"
#include "rpc/model_identity.h"
#include "rpc/request_limits.h"
#include "rpc/status.h"
#include "runtime/request_validation.h"

namespace mla {

namespace v1 = mlaserve::v1;

namespace {

// Longest worker address (host:port) accepted.
constexpr size_t kMaxAddressLength = 256;

bool printable_ascii(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= 0x21 && c < 0x7f; });
}

// 128 random bits in hex: sessions and the coordinator's instance tag.
std::string random_hex(int bytes) {
  std::random_device rd;
  std::string out;
  for (int i = 0; i < bytes; i += 4) out += fmt::format("{:08x}", rd());
  return out.substr(0, 2 * bytes);
}

}  // namespace

void CoordinatorOptions::validate() const {
  MLA_REQUIRE(max_in_flight >= 1, "coordinator: max_in_flight must be >= 1, got {}", max_in_flight);
  MLA_REQUIRE(heartbeat_interval_ms >= 1, "coordinator: heartbeat_interval_ms must be >= 1, got {}",
              heartbeat_interval_ms);
  MLA_REQUIRE(dead_after_ms > heartbeat_interval_ms,
              "coordinator: dead_after_ms ({}) must exceed heartbeat_interval_ms ({})",
              dead_after_ms, heartbeat_interval_ms);
  MLA_REQUIRE(max_failovers >= 0, "coordinator: max_failovers must be >= 0, got {}", max_failovers);
  MLA_REQUIRE(max_prompt_ids >= 1, "coordinator: max_prompt_ids must be >= 1");
  MLA_REQUIRE(affinity_block >= 1, "coordinator: affinity_block must be >= 1, got {}",
              affinity_block);
  MLA_REQUIRE(forget_dead_after_ms >= dead_after_ms,
              "coordinator: forget_dead_after_ms ({}) must be >= dead_after_ms ({})",
              forget_dead_after_ms, dead_after_ms);
  MLA_REQUIRE(max_workers >= 1, "coordinator: max_workers must be >= 1, got {}", max_workers);
  MLA_REQUIRE(stream_write_timeout_ms >= 1,
              "coordinator: stream_write_timeout_ms must be >= 1, got {}", stream_write_timeout_ms);
  MLA_REQUIRE(0 <= rebalance_low_free && rebalance_low_free <= rebalance_high_free &&
                  rebalance_high_free <= 1,
              "coordinator: rebalancing needs 0 <= rebalance_low_free <= rebalance_high_free <= 1, "
              "got {} and {}",
              rebalance_low_free, rebalance_high_free);
  MLA_REQUIRE(rebalance_interval_ms >= 1, "coordinator: rebalance_interval_ms must be >= 1, got {}",
              rebalance_interval_ms);
}

namespace {
CoordinatorOptions validated(CoordinatorOptions options) {
  options.validate();
  return options;
}
}  // namespace

CoordinatorService::CoordinatorService(CoordinatorOptions options)
    : options_(validated(options)),
      router_(RouterOptions{.policy = options.policy, .affinity_block = options.affinity_block}),
      instance_(random_hex(4)) {
  monitor_ = std::thread([this] { monitor_loop(); });
  // A drained worker's requests move a few at a time: each migration is mostly waiting.
  constexpr int kMigrationThreads = 4;
  for (int i = 0; i < kMigrationThreads; ++i) migrators_.emplace_back([this] { migrator_loop(); });
  spdlog::info("coordinator: routing {}, max_in_flight {}, heartbeat {} ms, dead after {} ms",
               routing_policy_name(options_.policy), options_.max_in_flight,
               options_.heartbeat_interval_ms, options_.dead_after_ms);
}

CoordinatorService::~CoordinatorService() { shutdown(); }

void CoordinatorService::shutdown() {
  {
    std::lock_guard lock(mu_);
    if (!shutting_down_) {
      shutting_down_ = true;
      accepting_ = false;
      publish_readiness_locked();
      for (auto& [id, request] : requests_) {
        if (request.worker_call) request.worker_call->TryCancel();
      }
    }
  }
  monitor_cv_.notify_all();
  migrator_cv_.notify_all();
  idle_cv_.notify_all();
  if (monitor_.joinable()) monitor_.join();
  for (std::thread& t : migrators_) {
    if (t.joinable()) t.join();
  }
}

void CoordinatorService::stop_accepting() {
  std::lock_guard lock(mu_);
  if (!accepting_) return;
  accepting_ = false;
  publish_readiness_locked();
  spdlog::info("coordinator: taking no new requests; {} in flight", requests_.size());
}

bool CoordinatorService::wait_until_idle(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return idle_cv_.wait_for(lock, timeout, [&] { return requests_.empty(); });
}

size_t CoordinatorService::in_flight() const {
  std::lock_guard lock(mu_);
  return requests_.size();
}

bool CoordinatorService::ready_locked() const {
  if (!accepting_) return false;
  return std::any_of(workers_.begin(), workers_.end(),
                     [](const auto& w) { return w.second.state == WorkerState::kAlive; });
}

bool CoordinatorService::ready() const {
  std::lock_guard lock(mu_);
  return ready_locked();
}

void CoordinatorService::attach_health(grpc::HealthCheckServiceInterface* health) {
  std::lock_guard lock(mu_);
  health_ = health;
  published_ready_.reset();
  publish_readiness_locked();
}

void CoordinatorService::publish_readiness_locked() {
  if (metrics_) {
    metrics_->workers_alive.set(
        static_cast<double>(std::count_if(workers_.begin(), workers_.end(), [](const auto& w) {
          return w.second.state == WorkerState::kAlive;
        })));
  }
  const bool ready = ready_locked();
  if (published_ready_ == ready) return;
  published_ready_ = ready;
  if (health_ != nullptr) health_->SetServingStatus("mlaserve.v1.Coordinator", ready);
  spdlog::info("coordinator: {}", ready ? "ready (a worker is alive)" : "not ready");
}

const char* CoordinatorService::state_name(WorkerState state) {
  switch (state) {
    case WorkerState::kAlive:
      return "alive";
    case WorkerState::kDraining:
      return "draining";
    case WorkerState::kDead:
      return "dead";
  }
  return "?";
}

void CoordinatorService::mark_dead_locked(WorkerEntry& worker, const std::string& why,
                                          bool cancel_attempts) {
  if (worker.state == WorkerState::kDead) return;
  worker.state = WorkerState::kDead;
  router_.forget(worker.id);
  spdlog::warn("worker {} ({}) is dead: {}; {} requests in flight there", worker.id, worker.address,
               why, worker.in_flight);
  publish_readiness_locked();
  if (!cancel_attempts) return;
  for (auto& [id, request] : requests_) {
    if (request.worker_id == worker.id && request.worker_call) {
      request.worker_lost = true;
      request.worker_call->TryCancel();
    }
  }
}

void CoordinatorService::monitor_loop() {
  const auto dead_after = std::chrono::milliseconds(options_.dead_after_ms);
  const auto period = std::chrono::milliseconds(std::clamp(options_.dead_after_ms / 5, 5, 250));
  std::unique_lock lock(mu_);
  while (!shutting_down_) {
    monitor_cv_.wait_for(lock, period, [&] { return shutting_down_; });
    if (shutting_down_) break;
    const auto now = Clock::now();
    cancel_stalled_writes_locked(now);
    const auto forget_after = std::chrono::milliseconds(options_.forget_dead_after_ms);
    for (auto it = workers_.begin(); it != workers_.end();) {
      WorkerEntry& worker = it->second;
      if (worker.state != WorkerState::kDead && now - worker.last_heartbeat > dead_after) {
        mark_dead_locked(
            worker,
            fmt::format("no heartbeat for {:.0f} ms", ms_between(worker.last_heartbeat, now)),
            /*cancel_attempts=*/true);
      }
      if (worker.state == WorkerState::kDead && worker.in_flight == 0 &&
          now - worker.last_heartbeat > forget_after) {
        spdlog::info("worker {} ({}) forgotten: dead for {:.0f} s", worker.id, worker.address,
                     ms_between(worker.last_heartbeat, now) / 1000);
        it = workers_.erase(it);
      } else {
        ++it;
      }
    }
  }
}

void CoordinatorService::update_state_locked(WorkerEntry& worker) {
  if (worker.state == WorkerState::kDead) return;
  // An undrained worker is routed to once its heartbeat says it takes requests again.
  const bool draining = worker.command == Command::kDrain || worker.worker_draining;
  worker.state = draining ? WorkerState::kDraining : WorkerState::kAlive;
}

std::optional<ModelLimits> CoordinatorService::model_limits_locked() const {
  ModelLimits model;
  for (const auto& [id, worker] : workers_) {
    if (worker.state != WorkerState::kAlive) continue;
    model.vocab_size = worker.model.vocab_size();  // equal across live workers (RegisterWorker)
    model.max_context = model.max_context == 0
                            ? worker.model.max_context()
                            : std::min<int64_t>(model.max_context, worker.model.max_context());
  }
  if (model.vocab_size == 0) return std::nullopt;
  return model;
}

std::optional<ModelLimits> CoordinatorService::model_limits() const {
  std::lock_guard lock(mu_);
  return model_limits_locked();
}

void CoordinatorService::validate_for_model_locked(const Request& wanted,
                                                   const v1::GenerateRequest& r) const {
  const std::optional<ModelLimits> found = model_limits_locked();
  if (!found) MLA_THROW(kUnavailable, "no worker is alive");
  const ModelLimits& model = *found;
  validate_request(wanted, model, kPromptField);
  check_token_ids({r.received_ids().data(), static_cast<size_t>(r.received_ids_size())},
                  "received_ids", model.vocab_size);
}

grpc::Status CoordinatorService::admit(const v1::GenerateRequest& request, const Request& wanted,
                                       std::string* request_id, Relay* relay) {
  std::lock_guard lock(mu_);
  if (shutting_down_) return {grpc::StatusCode::UNAVAILABLE, "coordinator shutting down"};
  if (!accepting_) {
    return {grpc::StatusCode::UNAVAILABLE, "coordinator stopping: it takes no new requests"};
  }
  validate_for_model_locked(wanted, request);
  if (requests_.size() >= static_cast<size_t>(options_.max_in_flight)) {
    return {
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        fmt::format("{} requests in flight (limit {})", requests_.size(), options_.max_in_flight)};
  }
  *request_id = request.request_id();
  if (request_id->empty()) {
    do {
      *request_id = fmt::format("req-{}-{}", instance_, next_request_number_++);
    } while (requests_.contains(*request_id));
  } else if (requests_.contains(*request_id)) {
    return {grpc::StatusCode::ALREADY_EXISTS,
            fmt::format("request_id: '{}' is already in flight", *request_id)};
  }
  requests_.emplace(*request_id, InFlight{.relay = relay});
  return grpc::Status::OK;
}

void CoordinatorService::attach_metrics(MetricsRegistry& registry) {
  metrics_ = std::make_unique<CoordinatorMetrics>(registry);
}

bool CoordinatorService::cancel(const std::string& request_id) {
  std::lock_guard lock(mu_);
  auto it = requests_.find(request_id);
  if (it == requests_.end() || it->second.cancel_requested) return false;
  it->second.cancel_requested = true;
  if (it->second.worker_call) it->second.worker_call->TryCancel();
  return true;
}

grpc::Status CoordinatorService::Health(grpc::ServerContext*, const v1::HealthRequest*,
                                        v1::HealthResponse* response) {
  std::lock_guard lock(mu_);
  int32_t alive = 0;
  for (const auto& [id, worker] : workers_) alive += worker.state == WorkerState::kAlive;
  response->set_workers_alive(alive);
  response->set_serving(ready_locked());
  return grpc::Status::OK;
}

grpc::Status CoordinatorService::ListWorkers(grpc::ServerContext*, const v1::ListWorkersRequest*,
                                             v1::ListWorkersResponse* response) {
  list_workers(response);
  return grpc::Status::OK;
}

void CoordinatorService::list_workers(v1::ListWorkersResponse* response) const {
  std::lock_guard lock(mu_);
  const auto now = Clock::now();
  for (const auto& [id, worker] : workers_) {
    v1::WorkerStatus* status = response->add_workers();
    status->set_worker_id(id);
    status->set_address(worker.address);
    status->set_state(state_name(worker.state));
    status->set_role(role_name(worker.role));
    *status->mutable_load() = worker.load;
    *status->mutable_model() = worker.model;
    status->set_in_flight(worker.in_flight);
    status->set_ms_since_heartbeat(ms_between(worker.last_heartbeat, now));
  }
  response->set_in_flight(static_cast<int32_t>(requests_.size()));
  response->set_max_in_flight(options_.max_in_flight);
}

CoordinatorService::WorkerEntry* CoordinatorService::find_worker_locked(const std::string& id,
                                                                        grpc::Status* status) {
  auto it = workers_.find(id);
  if (it != workers_.end()) return &it->second;
  *status = {grpc::StatusCode::NOT_FOUND,
             fmt::format("worker_id: no worker '{}' is registered", id)};
  return nullptr;
}

void CoordinatorService::set_command_locked(WorkerEntry& worker, Command command) {
  worker.command = command;
  update_state_locked(worker);
  publish_readiness_locked();
}

void CoordinatorService::take_load(WorkerEntry& worker, const v1::WorkerLoad& load) {
  worker.load = load;
  if (load.prefix_unit_tokens() > 0) {
    worker.cached_units = std::make_shared<const std::unordered_set<uint64_t>>(
        load.cached_units().begin(), load.cached_units().end());
    worker.unit_tokens = load.prefix_unit_tokens();
    ++worker.units_epoch;
  } else {
    worker.cached_units.reset();
    worker.unit_tokens = 0;
  }
  worker.load.clear_cached_units();
}

grpc::Status CoordinatorService::drain(const v1::DrainRequest& request,
                                       v1::DrainResponse* response) {
  std::lock_guard lock(mu_);
  grpc::Status status;
  WorkerEntry* found = find_worker_locked(request.worker_id(), &status);
  if (!found) return status;
  WorkerEntry& worker = *found;
  if (worker.state != WorkerState::kDead) {
    set_command_locked(worker, Command::kDrain);
    spdlog::info("worker {} draining (operator); {} requests in flight there", worker.id,
                 worker.in_flight);
    if (options_.migrate_on_drain && !request.finish_in_place()) {
      const size_t before = migration_queue_.size();
      queue_migrations_locked(worker);
      response->set_migrating(static_cast<int32_t>(migration_queue_.size() - before));
    }
  }
  response->set_draining(worker.state == WorkerState::kDraining);
  return grpc::Status::OK;
}

grpc::Status CoordinatorService::undrain(const v1::UndrainRequest& request,
                                         v1::UndrainResponse* response) {
  std::lock_guard lock(mu_);
  grpc::Status status;
  WorkerEntry* found = find_worker_locked(request.worker_id(), &status);
  if (!found) return status;
  WorkerEntry& worker = *found;
  if (worker.state != WorkerState::kDead) {
    set_command_locked(worker, worker.worker_draining ? Command::kUndrain : Command::kNone);
    spdlog::info("worker {} undrained (operator)", worker.id);
  }
  response->set_alive(worker.state != WorkerState::kDead);
  return grpc::Status::OK;
}

grpc::Status CoordinatorService::register_worker(const Peer& peer,
                                                 const v1::RegisterWorkerRequest& request,
                                                 v1::RegisterWorkerResponse* response) {
  const v1::ModelInfo& model = request.model();
  const std::string& id = request.worker_id();
  const std::string& address = request.address();
  if (id.empty() || id.size() > kMaxRequestIdLength || !printable_ascii(id)) {
    return {grpc::StatusCode::INVALID_ARGUMENT,
            fmt::format("worker_id: must be 1 to {} printable characters without spaces (got {})",
                        kMaxRequestIdLength, id.size())};
  }
  const size_t colon = address.rfind(':');
  if (address.size() > kMaxAddressLength || !printable_ascii(address) ||
      colon == std::string::npos || colon == 0 || colon + 1 == address.size() ||
      !std::all_of(address.begin() + colon + 1, address.end(),
                   [](char c) { return c >= '0' && c <= '9'; })) {
    return {grpc::StatusCode::INVALID_ARGUMENT,
            fmt::format("address: must be host:port, at most {} characters", kMaxAddressLength)};
  }
  const std::string role = request.role().empty() ? "both" : request.role();
  if (role != "prefill" && role != "decode" && role != "both") {
    return {grpc::StatusCode::INVALID_ARGUMENT,
            fmt::format("role: prefill, decode or both, got '{}'", request.role().substr(0, 16))};
  }
  if (model.vocab_size() <= 0 || model.max_context() <= 0) {
    return {grpc::StatusCode::INVALID_ARGUMENT,
            fmt::format("model: vocab_size ({}) and max_context ({}) must be > 0",
                        model.vocab_size(), model.max_context())};
  }

  std::lock_guard lock(mu_);
  auto existing = workers_.find(id);
  if (existing != workers_.end()) {
    const WorkerEntry& known = existing->second;
    if (known.address != address || known.peer.host != peer.host ||
        known.peer.identity != peer.identity) {
      spdlog::warn("refused to re-register worker {} from {} ({}): it is bound to {} ({})", id,
                   address, peer.host, known.address, known.peer.host);
      return {grpc::StatusCode::PERMISSION_DENIED,
              fmt::format("worker_id: '{}' is registered at another address or from another "
                          "peer; it can move only after it has been dead {} s",
                          id, options_.forget_dead_after_ms / 1000)};
    }
  } else if (workers_.size() >= static_cast<size_t>(options_.max_workers)) {
    return {grpc::StatusCode::RESOURCE_EXHAUSTED,
            fmt::format("{} workers registered (limit {})", workers_.size(), options_.max_workers)};
  }
  for (const auto& [other_id, other] : workers_) {
    if (other_id == id || other.state == WorkerState::kDead) continue;
    if (const char* field = model_difference(model, other.model)) {
      return {grpc::StatusCode::FAILED_PRECONDITION,
              fmt::format("model.{}: worker {} has {}, but the cluster's workers (e.g. {}) have "
                          "{}",
                          field, id, model_field(model, field), other_id,
                          model_field(other.model, field))};
    }
  }
  // Channel creation does not block: connecting happens on the first call.
  std::shared_ptr<v1::Worker::StubInterface> stub = v1::Worker::NewStub(grpc::CreateChannel(
      address, options_.worker_credentials ? options_.worker_credentials
                                           : grpc::InsecureChannelCredentials()));
  const bool added = existing == workers_.end();
  WorkerEntry& worker = workers_[id];
  worker.id = id;
  worker.address = address;
  worker.peer = peer;
  worker.session = random_hex(16);
  worker.stub = std::move(stub);
  worker.model = model;
  worker.role = role == "prefill" ? Role::kPrefill : role == "decode" ? Role::kDecode : Role::kBoth;
  take_load(worker, request.load());
  worker.last_heartbeat = Clock::now();
  worker.worker_draining = request.draining();
  // An operator's pending drain or undrain survives the worker registering again.
  if (added) worker.command = Command::kNone;
  worker.state = WorkerState::kAlive;
  update_state_locked(worker);
  publish_readiness_locked();
  spdlog::info("worker {} {} at {} ({}, vocab {}, context {}, tp {}, {}){}", worker.id,
               added ? "registered" : "re-registered", worker.address, model.model_type(),
               model.vocab_size(), model.max_context(), model.tp_size(), model.dtype(),
               worker.worker_draining ? " draining" : "");
  response->set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  response->set_session(worker.session);
  return grpc::Status::OK;
}

grpc::Status CoordinatorService::heartbeat(const v1::HeartbeatRequest& request,
                                           v1::HeartbeatResponse* response) {
  std::lock_guard lock(mu_);
  auto it = workers_.find(request.worker_id());
  // A dead worker registers again too, so its channel and model info are fresh.
  if (it == workers_.end() || it->second.state == WorkerState::kDead ||
      it->second.session != request.session()) {
    response->set_known(false);
    return grpc::Status::OK;
  }
  WorkerEntry& worker = it->second;
  const int64_t preemptions_before = worker.load.preemptions();
  take_load(worker, request.load());
  worker.last_heartbeat = Clock::now();
  if (options_.rebalance && !request.draining()) rebalance_locked(worker, preemptions_before);
  // A worker that starts draining by itself (it is stopping) hands its requests on.
  if (request.draining() && !worker.worker_draining && worker.command != Command::kDrain &&
      options_.migrate_on_drain) {
    queue_migrations_locked(worker);
  }
  worker.worker_draining = request.draining();
  // A command is repeated until the worker's heartbeats show it took effect.
  if ((worker.command == Command::kDrain && worker.worker_draining) ||
      (worker.command == Command::kUndrain && !worker.worker_draining)) {
    worker.command = Command::kNone;
  }
  response->set_known(true);
  response->set_drain(worker.command == Command::kDrain);
  response->set_undrain(worker.command == Command::kUndrain);
  update_state_locked(worker);
  publish_readiness_locked();
  if (metrics_) {
    // The cluster's queue: requests waiting in the live workers' schedulers.
    int64_t waiting = 0;
    for (const auto& [id, w] : workers_) {
      if (w.state != WorkerState::kDead) waiting += w.load.waiting();
    }
    metrics_->queue_depth.set(static_cast<double>(waiting));
  }
  return grpc::Status::OK;
}

}  // namespace mla
