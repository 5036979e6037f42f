#include "rpc/client.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <optional>
#include <thread>

namespace mla {
namespace {

namespace v1 = mlaserve::v1;
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

void throw_if_failed(const grpc::Status& status) {
  if (!status.ok()) throw error_from_grpc_status(status);
}

}  // namespace

ErrorCode error_code_from_grpc(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::INVALID_ARGUMENT:
      return ErrorCode::kInvalidArgument;
    case grpc::StatusCode::ALREADY_EXISTS:
      return ErrorCode::kInvalidArgument;
    case grpc::StatusCode::NOT_FOUND:
      return ErrorCode::kNotFound;
    case grpc::StatusCode::OUT_OF_RANGE:
      return ErrorCode::kOutOfRange;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return ErrorCode::kResourceExhausted;
    case grpc::StatusCode::FAILED_PRECONDITION:
      return ErrorCode::kFailedPrecondition;
    case grpc::StatusCode::PERMISSION_DENIED:
      return ErrorCode::kFailedPrecondition;
    case grpc::StatusCode::UNAUTHENTICATED:
      return ErrorCode::kFailedPrecondition;
    case grpc::StatusCode::DATA_LOSS:
      return ErrorCode::kDataLoss;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return ErrorCode::kDeadlineExceeded;
    case grpc::StatusCode::UNAVAILABLE:
      return ErrorCode::kUnavailable;
    // The request did not run to its end through no fault of the caller's input.
    case grpc::StatusCode::CANCELLED:
      return ErrorCode::kUnavailable;
    case grpc::StatusCode::ABORTED:
      return ErrorCode::kUnavailable;
    default:
      return ErrorCode::kInternal;  // UNKNOWN, INTERNAL, UNIMPLEMENTED
  }
}

Error error_from_grpc_status(const grpc::Status& status) {
  return Error(error_code_from_grpc(status.error_code()),
               fmt::format("{}: {}", grpc_code_name(status.error_code()), status.error_message()));
}

namespace {

std::vector<std::string> split_addresses(const std::string& list) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin <= list.size()) {
    const size_t comma = std::min(list.find(',', begin), list.size());
    out.push_back(list.substr(begin, comma - begin));
    begin = comma + 1;
  }
  return out;
}

// A stream that ended this way broke on the coordinator's side (it died or stops), not
// because of the request: another coordinator can take it up.
bool resumable(grpc::StatusCode code) {
  return code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::INTERNAL ||
         code == grpc::StatusCode::UNKNOWN;
}

}  // namespace

Client::Client(const std::string& addresses, ClientOptions options)
    : Client(split_addresses(addresses), std::move(options)) {}

Client::Client(const std::vector<std::string>& addresses, ClientOptions options)
    : addresses_(addresses), options_(std::move(options)) {
  MLA_REQUIRE(!addresses_.empty(), "client: no coordinator address");
  MLA_REQUIRE(options_.max_resumes >= 0, "client: max_resumes must be >= 0, got {}",
              options_.max_resumes);
  for (const std::string& address : addresses_) {
    MLA_REQUIRE(!address.empty(), "client: empty coordinator address in '{}'",
                fmt::join(addresses_, ","));
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(options_.max_receive_message_bytes);
    // gRPC's reconnect backoff grows to two minutes by default: a client that saw the
    // coordinator restart would wait that long before trying again.
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    if (options_.own_connections) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    Coordinator c;
    c.address = address;
    c.channel = grpc::CreateCustomChannel(
        address, options_.credentials ? options_.credentials : grpc::InsecureChannelCredentials(),
        args);
    c.stub = v1::Coordinator::NewStub(c.channel);
    coordinators_.push_back(std::move(c));
  }
}

void Client::set_unary_deadline(grpc::ClientContext& ctx) const {
  if (options_.unary_deadline.count() > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() + options_.unary_deadline);
  }
}

grpc::Status Client::first_answer(
    const std::function<grpc::Status(Coordinator&, grpc::ClientContext&)>& call) {
  const size_t first = preferred_.load();
  grpc::Status status;
  for (size_t i = 0; i < coordinators_.size(); ++i) {
    const size_t index = (first + i) % coordinators_.size();
    grpc::ClientContext ctx;
    set_unary_deadline(ctx);
    status = call(coordinators_[index], ctx);
    if (status.error_code() != grpc::StatusCode::UNAVAILABLE) {
      preferred_ = index;
      return status;
    }
  }
  return status;
}

grpc::Status Client::stream_once(Coordinator& coordinator, const v1::GenerateRequest& request,
                                 const std::function<void(const v1::GenerateResponse&)>& on_message,
                                 std::chrono::system_clock::time_point deadline,
                                 Clock::time_point start, GenerateResult& result, bool& finished) {
  grpc::ClientContext ctx;
  if (deadline != std::chrono::system_clock::time_point::max()) ctx.set_deadline(deadline);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      coordinator.stub->Generate(&ctx, request);
  v1::GenerateResponse msg;
  bool recorded = false;  // which coordinator serves the stream now, for cancel()
  while (reader->Read(&msg)) {
    ++result.num_messages;
    if (!msg.request_id().empty() && (!recorded || msg.request_id() != result.request_id)) {
      result.request_id = msg.request_id();
      recorded = true;
      std::lock_guard lock(mu_);
      streams_[result.request_id] = static_cast<size_t>(&coordinator - coordinators_.data());
    }
    if (msg.token_ids_size() > 0 && result.tokens.empty()) {
      result.client_ttft_ms = ms_since(start);
    }
    result.tokens.insert(result.tokens.end(), msg.token_ids().begin(), msg.token_ids().end());
    result.text += msg.text();
    result.logprobs.insert(result.logprobs.end(), msg.logprobs().begin(), msg.logprobs().end());
    if (!msg.worker_id().empty() && std::find(result.worker_ids.begin(), result.worker_ids.end(),
                                              msg.worker_id()) == result.worker_ids.end()) {
      result.worker_ids.push_back(msg.worker_id());
    }
    if (msg.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      finished = true;
      result.finish = msg.finish_reason();
      result.usage = msg.usage();
      result.timings = msg.timings();
    }
    if (on_message) {
      try {
        on_message(msg);
      } catch (...) {
        // Tell the server to stop and free the request's pages; Finish() still has to run.
        ctx.TryCancel();
        while (reader->Read(&msg)) {
        }
        reader->Finish();
        throw;
      }
    }
  }
  return reader->Finish();
}

GenerateResult Client::generate(const v1::GenerateRequest& request,
                                const std::function<void(const v1::GenerateResponse&)>& on_message,
                                std::chrono::milliseconds deadline) {
  const Clock::time_point start = Clock::now();
  const auto until = deadline.count() > 0 ? std::chrono::system_clock::now() + deadline
                                          : std::chrono::system_clock::time_point::max();
  GenerateResult result;
  result.request_id = request.request_id();
  size_t index = preferred_.load();
  auto backoff = std::chrono::milliseconds(100);
  grpc::Status status;
  for (int attempt = 0;; ++attempt) {
    Coordinator& coordinator = coordinators_[index];
    result.coordinators.push_back(coordinator.address);
    v1::GenerateRequest sent = request;
    if (attempt > 0) {
      // Everything received so far, under the id the first coordinator gave the request.
      sent.set_request_id(result.request_id);
      sent.mutable_received_ids()->Add(result.tokens.begin(), result.tokens.end());
    }
    bool finished = false;
    status = stream_once(coordinator, sent, on_message, until, start, result, finished);
    if (status.ok() || finished) break;
    // A resumed request can still be running on a worker that has not yet seen its old
    // stream end; it is gone in a moment.
    const bool retry = resumable(status.error_code()) ||
                       (attempt > 0 && status.error_code() == grpc::StatusCode::ALREADY_EXISTS);
    if (!retry || attempt >= options_.max_resumes ||
        std::chrono::system_clock::now() + backoff >= until) {
      break;
    }
    if (!result.tokens.empty() &&
        result.tokens.size() >= static_cast<size_t>(request.max_tokens())) {
      // Every token arrived; only the final message was lost.
      result.finish = v1::FINISH_REASON_LENGTH;
      status = grpc::Status::OK;
      break;
    }
    spdlog::warn(
        "client: stream of request '{}' on coordinator {} broke after {} tokens ({}); "
        "resuming on {}",
        result.request_id, coordinator.address, result.tokens.size(),
        error_from_grpc_status(status).what(),
        coordinators_[(index + 1) % coordinators_.size()].address);
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(1000));
    index = (index + 1) % coordinators_.size();
  }
  {
    std::lock_guard lock(mu_);
    streams_.erase(result.request_id);
  }
  throw_if_failed(status);
  preferred_ = index;
  result.client_total_ms = ms_since(start);
  return result;
}

bool Client::cancel(const std::string& request_id) {
  std::optional<size_t> serving;
  {
    std::lock_guard lock(mu_);
    if (auto it = streams_.find(request_id); it != streams_.end()) serving = it->second;
  }
  v1::CancelRequest req;
  req.set_request_id(request_id);
  for (size_t i = 0; i < coordinators_.size(); ++i) {
    if (serving && i != *serving) continue;
    grpc::ClientContext ctx;
    set_unary_deadline(ctx);
    v1::CancelResponse resp;
    const grpc::Status status = coordinators_[i].stub->Cancel(&ctx, req, &resp);
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE && !serving) continue;
    throw_if_failed(status);
    if (resp.cancelled()) return true;
  }
  return false;
}

v1::HealthResponse Client::health() {
  v1::HealthResponse resp;
  throw_if_failed(first_answer([&](Coordinator& c, grpc::ClientContext& ctx) {
    resp.Clear();
    return c.stub->Health(&ctx, v1::HealthRequest(), &resp);
  }));
  return resp;
}

v1::ListWorkersResponse Client::list_workers() {
  v1::ListWorkersResponse resp;
  throw_if_failed(first_answer([&](Coordinator& c, grpc::ClientContext& ctx) {
    resp.Clear();
    return c.stub->ListWorkers(&ctx, v1::ListWorkersRequest(), &resp);
  }));
  return resp;
}

bool Client::wait_until_ready(std::chrono::milliseconds timeout) {
  const Clock::time_point end = Clock::now() + timeout;
  constexpr auto kPollInterval = std::chrono::milliseconds(100);
  for (;;) {
    for (size_t i = 0; i < coordinators_.size(); ++i) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now());
      if (left.count() <= 0) return false;
      // wait_for_ready makes one poll ride out the connection attempt instead of failing at
      // once while the server is not listening yet.
      grpc::ClientContext ctx;
      ctx.set_wait_for_ready(true);
      const auto per_coordinator = std::chrono::milliseconds(1000 / coordinators_.size());
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::min<std::chrono::milliseconds>(left, per_coordinator));
      v1::HealthResponse resp;
      const grpc::Status status = coordinators_[i].stub->Health(&ctx, v1::HealthRequest(), &resp);
      if (status.ok() && resp.serving() && resp.workers_alive() >= 1) {
        preferred_ = i;
        return true;
      }
      if (!status.ok()) {
        spdlog::debug("client: {} not ready: {}", coordinators_[i].address,
                      error_from_grpc_status(status).what());
      }
    }
    const auto now = Clock::now();
    if (now >= end) return false;
    std::this_thread::sleep_for(std::min<Clock::duration>(kPollInterval, end - now));
  }
}

// ---------------------------------------------------------------------------------------
// AdminClient

AdminClient::AdminClient(const std::string& control_address,
                         std::shared_ptr<const SharedSecret> secret,
                         std::shared_ptr<grpc::ChannelCredentials> credentials,
                         std::chrono::milliseconds deadline)
    : secret_(std::move(secret)), deadline_(deadline) {
  MLA_REQUIRE(!control_address.empty(), "admin: empty control-plane address");
  MLA_REQUIRE(secret_ != nullptr, "admin: the control plane needs the shared secret");
  stub_ = v1::Control::NewStub(grpc::CreateChannel(
      control_address, credentials ? credentials : grpc::InsecureChannelCredentials()));
}

void AdminClient::prepare(grpc::ClientContext& ctx) const {
  secret_->attach(ctx);
  if (deadline_.count() > 0) ctx.set_deadline(std::chrono::system_clock::now() + deadline_);
}

v1::DrainResponse AdminClient::drain(const std::string& worker_id, bool finish_in_place) {
  grpc::ClientContext ctx;
  prepare(ctx);
  v1::DrainRequest req;
  req.set_worker_id(worker_id);
  req.set_finish_in_place(finish_in_place);
  v1::DrainResponse resp;
  throw_if_failed(stub_->Drain(&ctx, req, &resp));
  return resp;
}

v1::MigrateResponse AdminClient::migrate(const std::string& request_id,
                                         const std::string& to_worker, bool stop_first) {
  grpc::ClientContext ctx;
  secret_->attach(ctx);
  // A migration takes as long as its cache takes to move: the coordinator bounds it.
  v1::MigrateRequest req;
  req.set_request_id(request_id);
  req.set_to_worker(to_worker);
  req.set_stop_first(stop_first);
  v1::MigrateResponse resp;
  throw_if_failed(stub_->Migrate(&ctx, req, &resp));
  return resp;
}

bool AdminClient::undrain(const std::string& worker_id) {
  grpc::ClientContext ctx;
  prepare(ctx);
  v1::UndrainRequest req;
  req.set_worker_id(worker_id);
  v1::UndrainResponse resp;
  throw_if_failed(stub_->Undrain(&ctx, req, &resp));
  return resp.alive();
}

v1::ListWorkersResponse AdminClient::list_workers() {
  grpc::ClientContext ctx;
  prepare(ctx);
  v1::ListWorkersResponse resp;
  throw_if_failed(stub_->ListWorkers(&ctx, v1::ListWorkersRequest(), &resp));
  return resp;
}

// ---------------------------------------------------------------------------------------
// Cluster status table

std::string format_cluster_status(const v1::ListWorkersResponse& status) {
  const std::vector<std::string> header = {"WORKER", "ADDRESS",          "STATE",        "ROLE",
                                           "TP",     "PAGES FREE/TOTAL", "RUNNING",      "WAITING",
                                           "TOK/S",  "IN FLIGHT",        "HEARTBEAT AGO"};
  std::vector<std::vector<std::string>> rows;
  int alive = 0;
  for (const v1::WorkerStatus& w : status.workers()) {
    if (w.state() == "alive") ++alive;
    rows.push_back({w.worker_id(), w.address(), w.state(), w.role().empty() ? "both" : w.role(),
                    fmt::format("{}", w.model().tp_size()),
                    fmt::format("{}/{}", w.load().free_pages(), w.load().total_pages()),
                    fmt::format("{}", w.load().running()), fmt::format("{}", w.load().waiting()),
                    fmt::format("{:.1f}", w.load().tokens_per_second()),
                    fmt::format("{}", w.in_flight()),
                    fmt::format("{:.0f} ms", w.ms_since_heartbeat())});
  }

  std::string out;
  if (rows.empty()) {
    out += "no workers registered\n";
  } else {
    std::vector<size_t> width(header.size());
    for (size_t c = 0; c < header.size(); ++c) {
      width[c] = header[c].size();
      for (const auto& row : rows) width[c] = std::max(width[c], row[c].size());
    }
    // Text columns align left, numbers right.
    auto append_row = [&](const std::vector<std::string>& row) {
      std::string line;
      for (size_t c = 0; c < row.size(); ++c) {
        if (c > 0) line += "  ";
        line += c < 4 ? fmt::format("{:<{}}", row[c], width[c])
                      : fmt::format("{:>{}}", row[c], width[c]);
      }
      while (!line.empty() && line.back() == ' ') line.pop_back();
      out += line;
      out += '\n';
    };
    append_row(header);
    for (const auto& row : rows) append_row(row);
  }
  out += fmt::format("workers: {} ({} alive); requests in flight: {} (max {})\n",
                     status.workers_size(), alive, status.in_flight(), status.max_in_flight());
  return out;
}

}  // namespace mla
