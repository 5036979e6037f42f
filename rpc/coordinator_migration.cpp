// CoordinatorService's side of live migration (mlaserve.proto, "Live migration"): Migrate
// picks the target and has it Import the request's cache from the source; the relay
// (generate_relay.cpp) moves the client's stream when the source stops the request. Drain
// queues a migration per running request, rebalancing one per worker short of pages, and a
// prefill group's request its hand-off; the migrator threads run them.
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include "kernels/error.h"
#include "rpc/coordinator_service.h"
#include "rpc/migration_policy.h"
#include "rpc/model_identity.h"
#include "rpc/status.h"

namespace mla {

namespace v1 = mlaserve::v1;

grpc::Status CoordinatorService::migrate(const v1::MigrateRequest& request,
                                         v1::MigrateResponse* response) {
  const std::string& id = request.request_id();
  v1::ImportRequest ask;
  std::shared_ptr<v1::Worker::StubInterface> target_stub;
  std::string source_id, target_id;
  auto refuse = [this](grpc::StatusCode code, std::string message) {
    if (metrics_) metrics_->migrations_total("refused").inc();
    spdlog::info("migration refused: {}", message);
    return grpc::Status(code, std::move(message));
  };
  {
    std::lock_guard lock(mu_);
    if (shutting_down_) return refuse(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down");
    auto it = requests_.find(id);
    if (it == requests_.end()) {
      return refuse(grpc::StatusCode::NOT_FOUND,
                    fmt::format("request_id: no request '{}' is in flight here", id));
    }
    InFlight& flight = it->second;
    if (flight.worker_call == nullptr) {
      return refuse(grpc::StatusCode::FAILED_PRECONDITION,
                    fmt::format("request '{}' is between workers; try again", id));
    }
    if (!flight.migrating_to.empty()) {
      return refuse(
          grpc::StatusCode::FAILED_PRECONDITION,
          fmt::format("request '{}' is already migrating to {}", id, flight.migrating_to));
    }
    const WorkerEntry& source = workers_.at(flight.worker_id);
    WorkerEntry* target = nullptr;
    if (!request.to_worker().empty()) {
      grpc::Status status;
      target = find_worker_locked(request.to_worker(), &status);
      if (!target) return refuse(status.error_code(), "to_worker: " + status.error_message());
      if (target->id == source.id) {
        return refuse(grpc::StatusCode::FAILED_PRECONDITION,
                      fmt::format("to_worker: request '{}' already runs on {}", id, source.id));
      }
      // Alive as the worker itself last said: one just undrained takes requests again only
      // once it has heard so.
      if (target->state != WorkerState::kAlive || target->worker_draining) {
        return refuse(
            grpc::StatusCode::FAILED_PRECONDITION,
            fmt::format(
                "to_worker: worker {} is {}", target->id,
                target->state == WorkerState::kAlive ? "draining" : state_name(target->state)));
      }
    } else {
      target = migration_target_locked(source.id);
      if (!target) {
        return refuse(
            grpc::StatusCode::UNAVAILABLE,
            fmt::format("no live worker other than {} to take request '{}'", source.id, id));
      }
    }
    if (const char* field = model_difference(source.model, target->model)) {
      return refuse(grpc::StatusCode::FAILED_PRECONDITION,
                    fmt::format("workers {} and {} serve different models: {} '{}' vs '{}'",
                                source.id, target->id, field, model_field(source.model, field),
                                model_field(target->model, field)));
    }
    flight.migrating_to = target->id;
    source_id = source.id;
    target_id = target->id;
    target_stub = target->stub;
    ask.set_request_id(id);
    ask.set_source_worker_id(source.id);
    ask.set_source_address(source.address);
    ask.set_expected_tokens(context_tokens(*flight.relay));
    ask.set_stop_first(request.stop_first());
  }
  spdlog::info("request {}: migrating from {} to {} ({} tokens so far)", id, source_id, target_id,
               ask.expected_tokens());

  grpc::ClientContext call;
  if (options_.secret) options_.secret->attach(call);
  call.set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(options_.migration_timeout_ms));
  v1::ImportResponse imported;
  const grpc::Status status = target_stub->Import(&call, ask, &imported);

  bool still_in_flight = false;
  {
    std::lock_guard lock(mu_);
    auto it = requests_.find(id);
    still_in_flight = it != requests_.end();
    // A failed import leaves the request where it runs; had the source already stopped it,
    // the relay has taken the target and continues there (recomputing what did not arrive).
    if (!status.ok() && still_in_flight && it->second.migrating_to == target_id) {
      it->second.migrating_to.clear();
    }
  }
  if (status.ok() && !still_in_flight) {
    // The client went away while its cache moved: free the target's copy now.
    grpc::ClientContext cancel_call;
    if (options_.secret) options_.secret->attach(cancel_call);
    cancel_call.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::CancelRequest cancel;
    cancel.set_request_id(id);
    v1::CancelResponse cancelled;
    target_stub->Cancel(&cancel_call, cancel, &cancelled);
  }

  if (status.ok() && !still_in_flight) {
    // Copied, but the request had ended meanwhile: it runs nowhere, and the copy is freed.
    response->set_outcome("ended");
    *response->mutable_stats() = imported.stats();
    if (metrics_) metrics_->migrations_total("ended").inc();
    spdlog::info("request {}: ended while its cache moved to {}; the copy is freed", id, target_id);
    return grpc::Status::OK;
  }
  if (status.ok()) {
    const v1::MigrationStats& stats = imported.stats();
    response->set_outcome("migrated");
    *response->mutable_stats() = stats;
    if (metrics_) {
      metrics_->migrations_total("migrated").inc();
      metrics_->migration_bytes.inc(static_cast<double>(stats.bytes()));
      metrics_->migration_stop_seconds.observe(stats.stop_ms() / 1000.0);
    }
    spdlog::info(
        "request {}: migrated from {} to {}: {} tokens, {} bytes, {} stages, {:.1f} ms, source "
        "stopped {:.1f} ms",
        id, source_id, target_id, stats.tokens(), stats.bytes(), stats.stages(),
        stats.duration_ms(), stats.stop_ms());
    return grpc::Status::OK;
  }
  if (status.error_code() == grpc::StatusCode::ABORTED) {
    // The request ended (finished, or its client cancelled) before it could stop: nothing
    // to move.
    response->set_outcome("ended");
    response->mutable_stats()->set_source_worker_id(source_id);
    response->mutable_stats()->set_destination_worker_id(target_id);
    if (metrics_) metrics_->migrations_total("ended").inc();
    spdlog::info("request {}: ended during its migration to {}", id, target_id);
    return grpc::Status::OK;
  }
  const bool refused = status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
                       status.error_code() == grpc::StatusCode::FAILED_PRECONDITION;
  if (metrics_) metrics_->migrations_total(refused ? "refused" : "failed").inc();
  spdlog::warn("request {}: migration from {} to {} failed: {}", id, source_id, target_id,
               status.error_message());
  return {status.error_code(), fmt::format("migrating request '{}' from {} to {}: {}", id,
                                           source_id, target_id, status.error_message())};
}

const char* CoordinatorService::role_name(Role role) {
  switch (role) {
    case Role::kPrefill:
      return "prefill";
    case Role::kDecode:
      return "decode";
    case Role::kBoth:
      break;
  }
  return "both";
}

CoordinatorService::WorkerEntry* CoordinatorService::migration_target_locked(
    const std::string& source) {
  std::vector<MigrationPeer> peers;
  std::vector<WorkerEntry*> entries;
  for (auto& [id, w] : workers_) {
    peers.push_back({id,
                     id != source && w.state == WorkerState::kAlive && !w.worker_draining &&
                         w.role != Role::kPrefill,
                     w.role == Role::kDecode, w.load.free_pages(), w.load.total_pages(),
                     w.in_flight});
    entries.push_back(&w);
  }
  const int best = migration_target(peers);
  return best < 0 ? nullptr : entries[static_cast<size_t>(best)];
}

void CoordinatorService::queue_handoff_locked(const std::string& request_id) {
  migration_queue_.push_back(request_id);
  migrator_cv_.notify_all();
}

void CoordinatorService::rebalance_locked(WorkerEntry& worker, int64_t preemptions_before) {
  const v1::WorkerLoad& load = worker.load;
  const int64_t preempted = load.preemptions() - preemptions_before;
  const RebalanceThresholds thresholds{options_.rebalance_low_free, options_.rebalance_high_free};
  if (!short_of_cache(load.free_pages(), load.total_pages(), preempted, thresholds)) return;
  const auto now = Clock::now();
  if (now - worker.last_rebalance < std::chrono::milliseconds(options_.rebalance_interval_ms)) {
    return;
  }
  const WorkerEntry* target = migration_target_locked(worker.id);
  if (!target) return;
  std::vector<MovableRequest> running;
  std::vector<const std::string*> ids;
  for (const auto& [id, flight] : requests_) {
    if (flight.worker_id != worker.id || flight.worker_call == nullptr) continue;
    if (!flight.migrating_to.empty()) continue;
    running.push_back({context_tokens(*flight.relay), tokens_left(*flight.relay)});
    ids.push_back(&id);
  }
  const MigrationPeer target_view{target->id,
                                  true,
                                  target->role == Role::kDecode,
                                  target->load.free_pages(),
                                  target->load.total_pages(),
                                  target->in_flight};
  const int chosen = rebalance_choice(running, target_view, target->model.block_size(), thresholds);
  if (chosen < 0) return;
  const std::string& id = *ids[static_cast<size_t>(chosen)];
  worker.last_rebalance = now;
  spdlog::info(
      "rebalancing: worker {} is short of cache ({} of {} pages free, {} preempted since its "
      "last heartbeat); moving request {} ({} tokens) to {}",
      worker.id, load.free_pages(), load.total_pages(), std::max<int64_t>(preempted, 0), id,
      running[static_cast<size_t>(chosen)].context_tokens, target->id);
  if (metrics_) metrics_->rebalances_total.inc();
  migration_queue_.push_back(id);
  migrator_cv_.notify_all();
}

void CoordinatorService::queue_migrations_locked(const WorkerEntry& worker) {
  int32_t queued = 0;
  for (const auto& [id, flight] : requests_) {
    if (flight.worker_id != worker.id || flight.worker_call == nullptr) continue;
    if (!flight.migrating_to.empty()) continue;
    migration_queue_.push_back(id);
    ++queued;
  }
  if (queued > 0) {
    spdlog::info("worker {} drains: moving its {} running requests to other workers", worker.id,
                 queued);
    migrator_cv_.notify_all();
  }
}

void CoordinatorService::migrator_loop() {
  std::unique_lock lock(mu_);
  while (true) {
    migrator_cv_.wait(lock, [&] { return shutting_down_ || !migration_queue_.empty(); });
    if (shutting_down_) return;
    v1::MigrateRequest request;
    request.set_request_id(migration_queue_.front());
    migration_queue_.pop_front();
    lock.unlock();
    v1::MigrateResponse response;
    const grpc::Status status = migrate(request, &response);
    if (!status.ok()) {
      spdlog::warn("request {} stays where it runs: {}", request.request_id(),
                   status.error_message());
    }
    lock.lock();
  }
}

}  // namespace mla
