#include "rpc/client.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
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

Client::Client(const std::string& address, ClientOptions options)
    : address_(address), options_(options) {
  MLA_REQUIRE(!address.empty(), "client: empty coordinator address");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options_.max_receive_message_bytes);
  // gRPC's reconnect backoff grows to two minutes by default: a client that saw the
  // coordinator restart would wait that long before trying again.
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  channel_ = grpc::CreateCustomChannel(address_, grpc::InsecureChannelCredentials(), args);
  stub_ = v1::Coordinator::NewStub(channel_);
}

void Client::set_unary_deadline(grpc::ClientContext& ctx) const {
  if (options_.unary_deadline.count() > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() + options_.unary_deadline);
  }
}

GenerateResult Client::generate(const v1::GenerateRequest& request,
                                const std::function<void(const v1::GenerateResponse&)>& on_message,
                                std::chrono::milliseconds deadline) {
  const Clock::time_point start = Clock::now();
  grpc::ClientContext ctx;
  if (deadline.count() > 0) ctx.set_deadline(std::chrono::system_clock::now() + deadline);

  GenerateResult result;
  result.request_id = request.request_id();
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = stub_->Generate(&ctx, request);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    ++result.num_messages;
    if (!msg.request_id().empty()) result.request_id = msg.request_id();
    if (msg.token_ids_size() > 0 && result.tokens.empty()) {
      result.client_ttft_ms = ms_since(start);
    }
    result.tokens.insert(result.tokens.end(), msg.token_ids().begin(), msg.token_ids().end());
    result.logprobs.insert(result.logprobs.end(), msg.logprobs().begin(), msg.logprobs().end());
    if (!msg.worker_id().empty() && std::find(result.worker_ids.begin(), result.worker_ids.end(),
                                              msg.worker_id()) == result.worker_ids.end()) {
      result.worker_ids.push_back(msg.worker_id());
    }
    if (msg.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
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
  throw_if_failed(reader->Finish());
  result.client_total_ms = ms_since(start);
  return result;
}

bool Client::cancel(const std::string& request_id) {
  grpc::ClientContext ctx;
  set_unary_deadline(ctx);
  v1::CancelRequest req;
  req.set_request_id(request_id);
  v1::CancelResponse resp;
  throw_if_failed(stub_->Cancel(&ctx, req, &resp));
  return resp.cancelled();
}

v1::HealthResponse Client::health() {
  grpc::ClientContext ctx;
  set_unary_deadline(ctx);
  v1::HealthResponse resp;
  throw_if_failed(stub_->Health(&ctx, v1::HealthRequest(), &resp));
  return resp;
}

v1::ListWorkersResponse Client::list_workers() {
  grpc::ClientContext ctx;
  set_unary_deadline(ctx);
  v1::ListWorkersResponse resp;
  throw_if_failed(stub_->ListWorkers(&ctx, v1::ListWorkersRequest(), &resp));
  return resp;
}

bool Client::drain(const std::string& worker_id) {
  grpc::ClientContext ctx;
  set_unary_deadline(ctx);
  v1::DrainRequest req;
  req.set_worker_id(worker_id);
  v1::DrainResponse resp;
  throw_if_failed(stub_->Drain(&ctx, req, &resp));
  return resp.draining();
}

bool Client::wait_until_ready(std::chrono::milliseconds timeout) {
  const Clock::time_point end = Clock::now() + timeout;
  constexpr auto kPollInterval = std::chrono::milliseconds(100);
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now());
    if (left.count() <= 0) return false;
    // wait_for_ready makes one poll ride out the connection attempt instead of failing at
    // once while the server is not listening yet.
    grpc::ClientContext ctx;
    ctx.set_wait_for_ready(true);
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::min<std::chrono::milliseconds>(left, std::chrono::seconds(1)));
    v1::HealthResponse resp;
    const grpc::Status status = stub_->Health(&ctx, v1::HealthRequest(), &resp);
    if (status.ok() && resp.serving() && resp.workers_alive() >= 1) return true;
    if (!status.ok()) {
      spdlog::debug("client: {} not ready: {}", address_, error_from_grpc_status(status).what());
    }
    const auto now = Clock::now();
    if (now >= end) return false;
    std::this_thread::sleep_for(std::min<Clock::duration>(kPollInterval, end - now));
  }
}

// ---------------------------------------------------------------------------------------
// Cluster status table

std::string format_cluster_status(const v1::ListWorkersResponse& status) {
  const std::vector<std::string> header = {"WORKER",           "ADDRESS",      "STATE",   "TP",
                                           "PAGES FREE/TOTAL", "RUNNING",      "WAITING", "TOK/S",
                                           "IN FLIGHT",        "HEARTBEAT AGO"};
  std::vector<std::vector<std::string>> rows;
  int alive = 0;
  for (const v1::WorkerStatus& w : status.workers()) {
    if (w.state() == "alive") ++alive;
    rows.push_back({w.worker_id(), w.address(), w.state(), fmt::format("{}", w.model().tp_size()),
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
        line += c < 3 ? fmt::format("{:<{}}", row[c], width[c])
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
