#include "rpc/coordinator_link.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "kernels/error.h"

namespace mla {

namespace v1 = mlaserve::v1;

CoordinatorLink::CoordinatorLink(CoordinatorLinkOptions options) : options_(std::move(options)) {
  MLA_REQUIRE(!options_.coordinator_address.empty(), "coordinator_address must not be empty");
  MLA_REQUIRE(!options_.worker_id.empty(), "worker_id must not be empty");
  MLA_REQUIRE(!options_.worker_address.empty(), "worker_address must not be empty");
  MLA_REQUIRE(options_.load != nullptr, "a load function is required");
  MLA_REQUIRE(options_.rpc_timeout_ms >= 1, "rpc_timeout_ms must be >= 1, got {}",
              options_.rpc_timeout_ms);
  MLA_REQUIRE(options_.min_backoff_ms >= 1 && options_.max_backoff_ms >= options_.min_backoff_ms,
              "backoff must satisfy 1 <= min_backoff_ms <= max_backoff_ms, got {} and {}",
              options_.min_backoff_ms, options_.max_backoff_ms);
  MLA_REQUIRE(options_.default_heartbeat_ms >= 1, "default_heartbeat_ms must be >= 1, got {}",
              options_.default_heartbeat_ms);
  // gRPC's own reconnect backoff grows to minutes by default; cap it at ours so a restarted
  // coordinator is found again within max_backoff_ms.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, options_.min_backoff_ms);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, options_.min_backoff_ms);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, options_.max_backoff_ms);
  channel_ = grpc::CreateCustomChannel(
      options_.coordinator_address,
      options_.credentials ? options_.credentials : grpc::InsecureChannelCredentials(), args);
  stub_ = v1::Control::NewStub(channel_);
  heartbeat_ms_ = options_.default_heartbeat_ms;
  thread_ = std::thread([this] { run(); });
}

CoordinatorLink::~CoordinatorLink() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
    if (in_flight_ != nullptr) in_flight_->TryCancel();
  }
  stop_cv_.notify_all();
  thread_.join();
}

bool CoordinatorLink::registered() const {
  std::lock_guard lk(mu_);
  return registered_;
}

int64_t CoordinatorLink::registrations() const {
  std::lock_guard lk(mu_);
  return registrations_;
}

void CoordinatorLink::heartbeat_now() {
  {
    std::lock_guard lk(mu_);
    wake_ = true;
  }
  stop_cv_.notify_all();
}

bool CoordinatorLink::sleep_for(int64_t ms) {
  std::unique_lock lk(mu_);
  stop_cv_.wait_for(lk, std::chrono::milliseconds(ms), [&] { return stop_ || wake_; });
  wake_ = false;
  return !stop_;
}

void CoordinatorLink::run() {
  int64_t backoff_ms = options_.min_backoff_ms;
  while (true) {
    bool ok = false;
    int32_t interval_ms = 0;
    bool was_registered = false;
    {
      std::lock_guard lk(mu_);
      if (stop_) return;
      was_registered = registered_;
      interval_ms = heartbeat_ms_;
    }
    // Never let an exception end this thread: a worker that stops heartbeating is dead to
    // the coordinator.
    try {
      ok = was_registered ? sleep_for(interval_ms) && heartbeat_once() : register_once();
    } catch (const std::exception& e) {
      spdlog::error("worker {}: coordinator link: {}", options_.worker_id, e.what());
    }
    if (ok) {
      backoff_ms = options_.min_backoff_ms;
      continue;
    }
    {
      std::lock_guard lk(mu_);
      if (stop_) return;
      registered_ = false;
    }
    // A heartbeat that failed re-registers at once; failed registrations back off.
    if (was_registered) continue;
    if (!sleep_for(backoff_ms)) return;
    backoff_ms = std::min<int64_t>(backoff_ms * 2, options_.max_backoff_ms);
  }
}

bool CoordinatorLink::register_once() {
  // Our own backoff paces the attempts; gRPC's reconnect backoff on top of it would make an
  // attempt fail at once while the channel waits, stretching the outage past ours.
  grpc::experimental::ChannelResetConnectionBackoff(channel_.get());
  v1::RegisterWorkerRequest req;
  req.set_worker_id(options_.worker_id);
  req.set_address(options_.worker_address);
  req.set_role(options_.role);
  *req.mutable_model() = options_.model;
  *req.mutable_load() = options_.load();
  req.set_draining(options_.draining && options_.draining());
  v1::RegisterWorkerResponse resp;
  const std::optional<grpc::Status> status = call_cancellable(
      [&](grpc::ClientContext* ctx) { return stub_->RegisterWorker(ctx, req, &resp); });
  if (!status) return false;
  std::lock_guard lk(mu_);
  if (!status->ok()) {
    // Warn once per outage; the retries of a long one would flood the log.
    if (failed_registrations_++ == 0) {
      spdlog::warn("worker {}: registering with coordinator {} failed ({}); retrying with backoff",
                   options_.worker_id, options_.coordinator_address, status->error_message());
    } else {
      spdlog::debug("worker {}: registering with coordinator {} failed again: {}",
                    options_.worker_id, options_.coordinator_address, status->error_message());
    }
    return false;
  }
  registered_ = true;
  session_ = resp.session();
  ++registrations_;
  failed_registrations_ = 0;
  heartbeat_ms_ = resp.heartbeat_interval_ms() > 0 ? resp.heartbeat_interval_ms()
                                                   : options_.default_heartbeat_ms;
  spdlog::info("worker {}: registered with coordinator {} at {}, heartbeat every {} ms",
               options_.worker_id, options_.coordinator_address, options_.worker_address,
               heartbeat_ms_);
  return true;
}

std::optional<grpc::Status> CoordinatorLink::call_cancellable(
    const std::function<grpc::Status(grpc::ClientContext*)>& rpc) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(options_.rpc_timeout_ms));
  if (options_.secret) options_.secret->attach(ctx);
  {
    std::lock_guard lk(mu_);
    if (stop_) return std::nullopt;
    in_flight_ = &ctx;
  }
  const grpc::Status status = rpc(&ctx);
  std::lock_guard lk(mu_);
  in_flight_ = nullptr;
  return status;
}

bool CoordinatorLink::heartbeat_once() {
  v1::HeartbeatRequest req;
  req.set_worker_id(options_.worker_id);
  *req.mutable_load() = options_.load();
  req.set_draining(options_.draining && options_.draining());
  {
    std::lock_guard lk(mu_);
    req.set_session(session_);
  }
  v1::HeartbeatResponse resp;
  const std::optional<grpc::Status> status =
      call_cancellable([&](grpc::ClientContext* ctx) { return stub_->Heartbeat(ctx, req, &resp); });
  if (!status) return false;
  if (!status->ok()) {
    spdlog::warn("worker {}: heartbeat to coordinator {} failed ({}); registering again",
                 options_.worker_id, options_.coordinator_address, status->error_message());
    return false;
  }
  if (!resp.known()) {
    spdlog::warn(
        "worker {}: coordinator {} does not know this worker (restarted?); registering "
        "again",
        options_.worker_id, options_.coordinator_address);
    return false;
  }
  if (resp.drain() && options_.on_drain) options_.on_drain();
  if (resp.undrain() && options_.on_undrain) options_.on_undrain();
  return true;
}

}  // namespace mla
