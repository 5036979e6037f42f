// WorkerService's side of live migration (mlaserve.proto, "Live migration"): Export on the
// source, Import on the destination, and the hand-over of an imported cache to the migrated
// Generate that follows. The engine stays the step loop's: every engine call here goes
// through on_step_loop and runs between steps, so the request keeps decoding while its pages
// are sent.
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <future>
#include <optional>

#include "kernels/error.h"
#include "rpc/generate_request.h"
#include "rpc/latent_chunks.h"
#include "rpc/model_identity.h"
#include "rpc/request_limits.h"
#include "rpc/status.h"
#include "rpc/worker_service.h"

namespace mla {

namespace v1 = mlaserve::v1;

namespace {

using Clock = std::chrono::steady_clock;

// One copy takes at most this many bytes of latents (in the cache's dtype) off the cache, so a long
// context is copied over several step-loop turns instead of stalling one step.
constexpr size_t kCopyBytesPerTurn = 16 << 20;
// Chunk writes an import keeps queued for the step loop before waiting for the oldest.
constexpr size_t kImportWritesInFlight = 32;

grpc::Status status_of(const Error& e) { return to_grpc_status(e); }

// What a step-loop copy found: the latents of tokens [from, end) of a request still running,
// and how many tokens it has computed by now.
struct Copied {
  bool running = false;
  bool queued = false;  // not in the engine yet: nothing to copy, nothing to stop
  Tensor latents;
  int32_t end = 0;
  int32_t computed = 0;
};

}  // namespace

grpc::Status WorkerService::Export(grpc::ServerContext* context, const v1::ExportRequest* request,
                                   grpc::ServerWriter<v1::ExportMessage>* writer) {
  if (options_.secret) {
    if (grpc::Status auth = options_.secret->check(*context, "Worker.Export"); !auth.ok()) {
      return auth;
    }
  }
  try {
    return export_request(*context, *request, *writer);
  } catch (const Error& e) {
    spdlog::info("worker {}: export of request '{}' failed: {}", options_.worker_id,
                 request->request_id(), e.what());
    return status_of(e);
  }
}

grpc::Status WorkerService::export_request(grpc::ServerContext& context,
                                           const v1::ExportRequest& request,
                                           grpc::ServerWriter<v1::ExportMessage>& writer) {
  check_request_id(request.request_id());
  MLA_REQUIRE(request.max_chunk_bytes() >= 0 && request.max_chunk_bytes() <= kMaxChunkBytes,
              "max_chunk_bytes: {} (0 for the default, at most {})", request.max_chunk_bytes(),
              kMaxChunkBytes);
  if (const char* field = model_difference(request.model(), model_info_)) {
    return {
        grpc::StatusCode::FAILED_PRECONDITION,
        fmt::format("cannot migrate to a worker with another model: {} is '{}' there, '{}' "
                    "here",
                    field, model_field(request.model(), field), model_field(model_info_, field))};
  }
  const size_t max_chunk =
      request.max_chunk_bytes() == 0 ? kDefaultChunkBytes : request.max_chunk_bytes();
  const std::string& id = request.request_id();
  std::shared_ptr<Call> call;
  {
    std::lock_guard lk(mu_);
    auto it = calls_.find(id);
    if (it == calls_.end()) {
      return {grpc::StatusCode::NOT_FOUND,
              fmt::format("request '{}' is not running on worker {}", id, options_.worker_id)};
    }
    if (it->second->exporting) {
      return {grpc::StatusCode::FAILED_PRECONDITION,
              fmt::format("request '{}' is already being migrated", id)};
    }
    call = it->second;
    call->exporting = true;
  }
  // Unless the request stops here for good, it may be exported again later.
  bool stopped = false;
  struct Unmark {
    WorkerService& service;
    Call& call;
    const bool& stopped;
    ~Unmark() {
      if (stopped) return;
      std::lock_guard lk(service.mu_);
      call.exporting = false;
    }
  } unmark{*this, *call, stopped};

  const CacheGeometry& geometry = engine_.cache().geometry();
  const std::string& dtype = model_info_.dtype();
  const auto turn_tokens = static_cast<int32_t>(std::max<size_t>(
      1, kCopyBytesPerTurn /
             latent_token_bytes(geometry.num_layers, engine_.cache().row_width(), dtype)));
  // Step loop: the next latents of the request, if it still runs here. A request not yet in
  // the engine (still in the inbox) has computed nothing.
  // With stop_first nothing is copied live: the first turn only reads the computed count.
  const int32_t copy_tokens = request.stop_first() ? 0 : turn_tokens;
  auto copy = [this, call, copy_tokens](int32_t from) {
    Copied c;
    c.running = !call->ended && !call->cancelled;
    c.end = from;
    c.queued = call->engine_id == 0;
    if (!c.running || c.queued) return c;
    c.latents = engine_.copy_latents(call->engine_id, from, &c.end, copy_tokens);
    c.computed = engine_.computed_tokens(call->engine_id);
    return c;
  };
  // Over MPI when the destination is a rank of this job (and MPI allows it), else gRPC.
  const bool over_mpi =
      options_.mpi != nullptr && request.has_mpi_receiver() &&
      options_.mpi->reaches({request.mpi_receiver().job_id(), request.mpi_receiver().world_rank()});
  const int mpi_peer = request.mpi_receiver().world_rank();
  const int mpi_tag = over_mpi ? options_.mpi->next_tag() : 0;
  auto send = [&](const Tensor& latents, int32_t first) {
    if (!latents.defined()) return true;
    for (v1::LatentChunk& chunk : encode_latent_chunks(latents, first, dtype, max_chunk)) {
      v1::ExportMessage message;
      std::shared_ptr<const std::string> data;
      if (over_mpi) {
        data = std::make_shared<const std::string>(std::move(*chunk.mutable_data()));
        chunk.clear_data();
        chunk.set_mpi_bytes(static_cast<int32_t>(data->size()));
      }
      *message.mutable_chunk() = std::move(chunk);
      if (!writer.Write(message)) return false;
      if (over_mpi && !options_.mpi->send(data, mpi_peer, mpi_tag,
                                          [&context] { return context.IsCancelled(); })) {
        return false;
      }
    }
    return true;
  };
  const grpc::Status destination_gone(grpc::StatusCode::CANCELLED,
                                      "the destination went away; the request runs on here");
  const grpc::Status ended(grpc::StatusCode::ABORTED,
                           fmt::format("request '{}' ended during its migration", id));

  // Live stages: the request keeps running while what it has computed is sent; each stage
  // sends what the previous ones left, until less than a page is left or the stages run out.
  // A turn's copy out of the cache runs on the step loop while the turn before it is sent.
  int32_t from = 0;
  int32_t stages = 0;
  int32_t stage_end = -1;  // the computed count the current stage copies up to
  bool header_sent = false;
  std::optional<std::future<Copied>> next;
  struct WaitForCopy {  // a copy still queued reads `copy`: it must end before `copy` does
    std::optional<std::future<Copied>>& next;
    ~WaitForCopy() {
      if (next && next->valid()) next->wait();
    }
  } wait_for_copy{next};
  auto copy_from = [&](int32_t at) { next = on_step_loop([&copy, at] { return copy(at); }); };
  copy_from(0);
  while (true) {
    Copied c = next->get();
    next.reset();
    if (!c.running) return ended;
    if (c.queued) {
      return {grpc::StatusCode::FAILED_PRECONDITION,
              fmt::format("request '{}' has not started on worker {} yet", id, options_.worker_id)};
    }
    if (!header_sent) {
      v1::ExportMessage header;
      header.mutable_header()->set_num_layers(geometry.num_layers);
      header.mutable_header()->set_width(engine_.cache().row_width());
      header.mutable_header()->set_dtype(dtype);
      header.mutable_header()->set_computed(c.computed);
      header.mutable_header()->set_transport(over_mpi ? "mpi" : "grpc");
      if (over_mpi) {
        header.mutable_header()->set_mpi_sender_rank(options_.mpi->self().world_rank);
        header.mutable_header()->set_mpi_tag(mpi_tag);
      }
      if (!writer.Write(header)) return destination_gone;
      header_sent = true;
      stage_end = c.computed;
    }
    // Whether another live turn follows, decided before this one is sent so that its copy
    // overlaps the send.
    bool more = !request.stop_first();
    if (more && c.end >= stage_end) {
      ++stages;
      if (c.computed - c.end < geometry.block_size || stages >= options_.export_max_live_stages) {
        more = false;
      } else {
        stage_end = c.computed;
      }
    }
    if (more) copy_from(c.end);
    if (!send(c.latents, from)) return destination_gone;
    from = c.end;
    if (context.IsCancelled()) return destination_gone;
    if (!more) break;
  }

  // Stop and copy: the request leaves the engine; its stream here ends and the coordinator
  // continues it on the destination.
  const auto stop = Clock::now();
  struct Stopped {
    bool running = false;
    RequestSnapshot snapshot;
  };
  Stopped last =
      on_step_loop([this, call, from] {
        Stopped s;
        s.running = !call->ended && !call->cancelled && call->engine_id != 0;
        if (!s.running) return s;
        s.snapshot = engine_.export_request(call->engine_id, from);
        in_engine_.erase(call->engine_id);
        spdlog::info("worker {}: request {} stopped here after {} tokens: migrating",
                     options_.worker_id, call->request_id, call->generated);
        fail_call(*call, {grpc::StatusCode::ABORTED,
                          fmt::format("request {} moved to another worker", call->request_id)});
        return s;
      }).get();
  if (!last.running) return ended;
  stopped = true;
  ++stages;
  const RequestSnapshot& snap = last.snapshot;
  if (!send(snap.latents, snap.latents_from)) return destination_gone;
  v1::ExportMessage tail;
  tail.mutable_tail()->mutable_tokens()->Assign(snap.tokens.begin(), snap.tokens.end());
  tail.mutable_tail()->set_computed(snap.latents_from +
                                    (snap.latents.defined() ? snap.latents.dim(1) : 0));
  tail.mutable_tail()->set_stages(stages);
  tail.mutable_tail()->set_stop_ms(ms_between(stop, Clock::now()));
  if (!writer.Write(tail)) return destination_gone;
  return grpc::Status::OK;
}

grpc::Status WorkerService::Import(grpc::ServerContext* context, const v1::ImportRequest* request,
                                   v1::ImportResponse* response) {
  if (options_.secret) {
    if (grpc::Status auth = options_.secret->check(*context, "Worker.Import"); !auth.ok()) {
      return auth;
    }
  }
  try {
    return import_request(*context, *request, *response);
  } catch (const Error& e) {
    spdlog::info("worker {}: import of request '{}' failed: {}", options_.worker_id,
                 request->request_id(), e.what());
    return status_of(e);
  }
}

grpc::Status WorkerService::import_request(grpc::ServerContext& context,
                                           const v1::ImportRequest& request,
                                           v1::ImportResponse& response) {
  const auto start = Clock::now();
  check_request_id(request.request_id());
  MLA_REQUIRE(!request.source_address().empty() && request.source_address().size() <= 256,
              "source_address: must be host:port, at most 256 characters");
  MLA_REQUIRE(
      request.expected_tokens() >= 0 && request.expected_tokens() <= model_limits_.max_context,
      "expected_tokens: {} (the context is {})", request.expected_tokens(),
      model_limits_.max_context);
  const std::string& id = request.request_id();
  {
    std::lock_guard lk(mu_);
    if (!accepting_) return refusal_locked(context);
    if (calls_.count(id) != 0 || importing_.count(id) != 0 || held_imports_.count(id) != 0) {
      return {grpc::StatusCode::ALREADY_EXISTS,
              fmt::format("request '{}' is already running or arriving on worker {}", id,
                          options_.worker_id)};
    }
    importing_.emplace(id, 0);  // claims the id; the handle follows
  }
  int64_t handle = 0;
  bool held = false;
  // Whatever ends the import before it is held frees its pages.
  struct Release {
    WorkerService& service;
    const std::string& id;
    const int64_t& handle;
    const bool& held;
    ~Release() {
      if (!held && handle != 0) {
        try {
          service.on_step_loop([&s = service, h = handle] { s.engine_.abort_import(h); }).get();
        } catch (const std::exception& e) {
          spdlog::warn("worker {}: freeing import of '{}': {}", service.options_.worker_id, id,
                       e.what());
        }
      }
      {
        std::lock_guard lk(service.mu_);
        service.importing_.erase(id);
      }
      service.import_done_.notify_all();
    }
  } release{*this, id, handle, held};

  // Before anything is copied: room for the request as it is now.
  handle =
      on_step_loop([this, n = request.expected_tokens()] { return engine_.begin_import(n); }).get();
  {
    std::lock_guard lk(mu_);
    importing_[id] = handle;
  }

  const auto stub = v1::Worker::NewStub(peer_channel(request.source_address()));
  // The coordinator's deadline and cancellation reach the source too.
  auto call = grpc::ClientContext::FromServerContext(context);
  if (options_.secret) options_.secret->attach(*call);
  v1::ExportRequest ask;
  ask.set_request_id(id);
  *ask.mutable_model() = model_info_;
  ask.set_stop_first(request.stop_first());
  if (options_.mpi != nullptr && options_.mpi->usable()) {
    ask.mutable_mpi_receiver()->set_job_id(options_.mpi->self().job_id);
    ask.mutable_mpi_receiver()->set_world_rank(options_.mpi->self().world_rank);
  }
  auto reader = stub->Export(call.get(), ask);

  const CacheGeometry& geometry = engine_.cache().geometry();
  const int32_t width = engine_.cache().row_width();  // elements of dtype per token and layer
  const std::string& dtype = model_info_.dtype();
  const std::string source = request.source_worker_id();
  v1::MigrationStats& stats = *response.mutable_stats();
  stats.set_source_worker_id(source);
  stats.set_destination_worker_id(options_.worker_id);
  stats.set_transport("grpc");
  std::deque<std::future<void>> writes;
  auto finish_with = [&](grpc::Status status) {
    call->TryCancel();
    reader->Finish();
    return status;
  };
  v1::ExportMessage message;
  bool have_header = false;
  bool over_mpi = false;  // the chunks' data follows each chunk as an MPI message
  int mpi_sender = -1, mpi_tag = 0;
  std::optional<v1::ExportTail> tail;
  int32_t covered = 0;
  while (!tail && reader->Read(&message)) {
    switch (message.part_case()) {
      case v1::ExportMessage::kHeader: {
        const v1::ExportHeader& h = message.header();
        const char* field = h.num_layers() != geometry.num_layers ? "num_layers"
                            : h.width() != width                  ? "width"
                            : h.dtype() != dtype                  ? "dtype"
                                                                  : nullptr;
        if (field) {
          return finish_with(
              {grpc::StatusCode::FAILED_PRECONDITION,
               fmt::format("worker {}'s cache differs from worker {}'s in {}: {} layers x {} "
                           "values in {} there, {} x {} in {} here",
                           source, options_.worker_id, field, h.num_layers(), h.width(), h.dtype(),
                           geometry.num_layers, width, dtype)});
        }
        if (h.transport() == "mpi") {
          if (options_.mpi == nullptr ||
              !options_.mpi->reaches({options_.mpi->self().job_id, h.mpi_sender_rank()})) {
            return finish_with({grpc::StatusCode::FAILED_PRECONDITION,
                                fmt::format("worker {} would send over MPI from rank {}, which "
                                            "this worker cannot reach",
                                            source, h.mpi_sender_rank())});
          }
          over_mpi = true;
          mpi_sender = h.mpi_sender_rank();
          mpi_tag = h.mpi_tag();
          stats.set_transport("mpi");
        }
        have_header = true;
        break;
      }
      case v1::ExportMessage::kChunk: {
        if (!have_header) break;
        v1::LatentChunk& chunk = *message.mutable_chunk();
        Tensor latents;
        try {
          if (over_mpi) {
            MLA_REQUIRE(chunk.data().empty() && chunk.mpi_bytes() >= 0,
                        "latent chunk over MPI: {} bytes inline, mpi_bytes {}", chunk.data().size(),
                        chunk.mpi_bytes());
            auto data = options_.mpi->recv(chunk.mpi_bytes(), mpi_sender, mpi_tag,
                                           [&context] { return context.IsCancelled(); });
            if (!data)
              return finish_with({grpc::StatusCode::CANCELLED, "the import was cancelled"});
            chunk.set_data(std::move(*data));
          }
          latents = decode_latent_chunk(chunk, geometry.num_layers, width, dtype);
        } catch (const Error& e) {
          return finish_with(status_of(e));
        }
        if (chunk.first_token() != covered) {
          return finish_with(
              {grpc::StatusCode::DATA_LOSS, fmt::format("latent chunk from token {}, expected {}",
                                                        chunk.first_token(), covered)});
        }
        covered += chunk.num_tokens();
        stats.set_bytes(stats.bytes() + static_cast<int64_t>(chunk.data().size()));
        stats.set_chunks(stats.chunks() + 1);
        writes.push_back(
            on_step_loop([this, handle, first = chunk.first_token(), latents = std::move(latents)] {
              engine_.write_import(handle, first, latents);
            }));
        while (writes.size() > kImportWritesInFlight) {
          writes.front().get();  // throws what write_import threw
          writes.pop_front();
        }
        break;
      }
      case v1::ExportMessage::kTail:
        tail = message.tail();
        break;
      case v1::ExportMessage::PART_NOT_SET:
        break;
    }
  }
  const grpc::Status status = reader->Finish();
  if (!status.ok()) {
    return {status.error_code(),
            fmt::format("source worker {}: {}", source, status.error_message())};
  }
  if (!have_header || !tail) {
    return {grpc::StatusCode::DATA_LOSS,
            fmt::format("source worker {} ended the export without its {}", source,
                        have_header ? "tail" : "header")};
  }
  for (auto& write : writes) write.get();
  if (tail->computed() != covered || tail->tokens_size() > model_limits_.max_context ||
      tail->tokens_size() < covered) {
    return {grpc::StatusCode::DATA_LOSS,
            fmt::format("source worker {} sent latents of {} tokens but says {} of {} tokens",
                        source, covered, tail->computed(), tail->tokens_size())};
  }
  stats.set_tokens(covered);
  stats.set_stages(tail->stages());
  stats.set_stop_ms(tail->stop_ms());
  {
    std::lock_guard lk(mu_);
    held_imports_[id] =
        HeldImport{handle, std::vector<int32_t>(tail->tokens().begin(), tail->tokens().end()),
                   Clock::now() + std::chrono::milliseconds(options_.import_hold_ms)};
    held = true;
  }
  wake_.notify_one();  // the step loop's next wake-up must see the expiry
  stats.set_duration_ms(ms_between(start, Clock::now()));
  spdlog::info(
      "worker {}: imported request {} from {}: {} tokens, {} bytes in {} chunks, {} stages, "
      "{:.1f} ms (source stopped {:.1f} ms)",
      options_.worker_id, id, source, stats.tokens(), stats.bytes(), stats.chunks(), stats.stages(),
      stats.duration_ms(), stats.stop_ms());
  return grpc::Status::OK;
}

std::shared_ptr<grpc::Channel> WorkerService::peer_channel(const std::string& address) {
  std::lock_guard lk(mu_);
  auto it = peer_channels_.find(address);
  if (it != peer_channels_.end()) return it->second;
  // Bounded: a worker talks to the other groups of its deployment, not to strangers (the
  // addresses come from the authenticated coordinator), but a long-lived worker sees
  // groups come and go.
  if (peer_channels_.size() >= 256) peer_channels_.clear();
  auto channel =
      grpc::CreateChannel(address, options_.peer_credentials ? options_.peer_credentials
                                                             : grpc::InsecureChannelCredentials());
  peer_channels_.emplace(address, channel);
  return channel;
}

void WorkerService::take_import(Call& call, const std::vector<int32_t>& tokens) {
  std::optional<HeldImport> held;
  {
    std::unique_lock lk(mu_);
    // The source's stream ends before its last message reaches the import: wait for it.
    const auto arrived = Clock::now();
    import_done_.wait_for(lk, std::chrono::milliseconds(options_.import_hold_ms),
                          [&] { return stopping_ || importing_.count(call.request_id) == 0; });
    auto it = held_imports_.find(call.request_id);
    if (it != held_imports_.end()) {
      held = std::move(it->second);
      held_imports_.erase(it);
      spdlog::info(
          "worker {}: migrated request {} takes its imported cache ({} tokens; waited "
          "{:.1f} ms for the import)",
          options_.worker_id, call.request_id, held->tokens.size(),
          ms_between(arrived, Clock::now()));
    }
  }
  if (!held) {
    spdlog::warn("worker {}: migrated request {} arrived without its cache; recomputing it",
                 options_.worker_id, call.request_id);
    return;
  }
  if (held->tokens != tokens) {
    spdlog::warn(
        "worker {}: migrated request {}: the imported cache is of {} tokens, the request has "
        "{}; recomputing it",
        options_.worker_id, call.request_id, held->tokens.size(), tokens.size());
    try {
      on_step_loop([this, h = held->handle] { engine_.abort_import(h); }).get();
    } catch (const std::exception& e) {
      spdlog::warn("worker {}: freeing an import: {}", options_.worker_id, e.what());
    }
    return;
  }
  call.import_handle = held->handle;
}

bool WorkerService::drop_held_import(const std::string& request_id) {
  int64_t handle = 0;
  {
    std::lock_guard lk(mu_);
    auto it = held_imports_.find(request_id);
    if (it == held_imports_.end()) return false;
    handle = it->second.handle;
    held_imports_.erase(it);
  }
  try {
    on_step_loop([this, handle] { engine_.abort_import(handle); }).get();
  } catch (const std::exception& e) {
    spdlog::warn("worker {}: freeing the import of '{}': {}", options_.worker_id, request_id,
                 e.what());
  }
  return true;
}

void WorkerService::release_import(Call& call) {
  if (call.import_handle == 0) return;
  engine_.abort_import(call.import_handle);
  call.import_handle = 0;
}

void WorkerService::expire_held_imports(Clock::time_point now) {
  std::vector<std::pair<std::string, int64_t>> expired;
  {
    std::lock_guard lk(mu_);
    for (auto it = held_imports_.begin(); it != held_imports_.end();) {
      if (it->second.expires > now) {
        ++it;
        continue;
      }
      expired.emplace_back(it->first, it->second.handle);
      it = held_imports_.erase(it);
    }
  }
  for (const auto& [id, handle] : expired) {
    spdlog::warn("worker {}: no migrated Generate came for request {} in {} ms; freeing its cache",
                 options_.worker_id, id, options_.import_hold_ms);
    engine_.abort_import(handle);
  }
}

}  // namespace mla
