// The C++ client of the mlaserve Coordinator (rpc/proto/mlaserve/v1/mlaserve.proto).
//
//   mla::Client client("127.0.0.1:50051");
//   client.wait_until_ready(std::chrono::seconds(30));
//   mlaserve::v1::GenerateRequest req;
//   req.add_prompt_ids(1); req.set_max_tokens(16);
//   auto result = client.generate(req, [](const auto& msg) { /* tokens as they come */ });
//
// Failures throw mla::Error whose code follows the gRPC status (error_code_from_grpc) and
// whose message is "<STATUS_NAME>: <the server's message>", e.g.
// "INVALID_ARGUMENT: prompt_ids: must not be empty".
//
// Thread safety: a Client is thread-safe; all calls may run concurrently on one Client (they
// share one channel; each call has its own context), e.g. cancel() from one thread while
// generate() streams on another.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "rpc/status.h"
#include "mlaserve/v1/mlaserve.pb.h"

namespace mla {

struct ClientOptions {
  // Largest message the client accepts. Default: 64 MiB.
  int max_receive_message_bytes = 64 << 20;
  // Deadline of each unary call (cancel, health, list_workers, drain); 0 = none.
  // Default: 10 s.
  std::chrono::milliseconds unary_deadline{10000};
};

struct GenerateResult {
  std::string request_id;       // as the server reported it (assigned when the request had none)
  std::vector<int32_t> tokens;  // all generated tokens, in order
  std::vector<float> logprobs;  // parallel to tokens when return_logprobs was set
  mlaserve::v1::FinishReason finish = mlaserve::v1::FINISH_REASON_UNSPECIFIED;
  mlaserve::v1::Usage usage;      // from the last message
  mlaserve::v1::Timings timings;  // server-side, from the last message
  // Distinct worker groups that produced tokens, in order of first appearance (more than
  // one after a failover or migration).
  std::vector<std::string> worker_ids;
  int32_t num_messages = 0;
  // Measured by the client from the call's start.
  double client_ttft_ms = 0.0;   // to the first message with tokens
  double client_total_ms = 0.0;  // to the end of the stream
};

// The ErrorCode for a gRPC status code (codes without a counterpart map to the closest:
// CANCELLED and ABORTED -> kUnavailable, ALREADY_EXISTS -> kInvalidArgument,
// PERMISSION_DENIED / UNAUTHENTICATED -> kFailedPrecondition, others -> kInternal).
ErrorCode error_code_from_grpc(grpc::StatusCode code);
// mla::Error(error_code_from_grpc(code), "<NAME>: <message>") for a failed status.
Error error_from_grpc_status(const grpc::Status& status);

class Client {
 public:
  // Creates the channel (insecure) to `address` ("host:port"); connecting is lazy, so this
  // does not fail when the server is not up yet.
  explicit Client(const std::string& address, ClientOptions options = {});

  // Sends a request and reads its stream to the end, calling on_message (if set) for each
  // message as it arrives, on the calling thread. deadline 0 = none; otherwise the whole
  // call must finish within it (kDeadlineExceeded). If on_message throws, the call is
  // cancelled and the exception propagates. Throws mla::Error when the server answers with
  // an error or cannot be reached.
  GenerateResult generate(
      const mlaserve::v1::GenerateRequest& request,
      const std::function<void(const mlaserve::v1::GenerateResponse&)>& on_message = {},
      std::chrono::milliseconds deadline = std::chrono::milliseconds{0});

  // Cancels a running request; false when it is not running (finished or unknown).
  bool cancel(const std::string& request_id);
  mlaserve::v1::HealthResponse health();
  mlaserve::v1::ListWorkersResponse list_workers();
  // Asks the coordinator to route nothing new to a worker; true when it is now draining.
  bool drain(const std::string& worker_id);

  // Polls health() until the coordinator is serving with at least one live worker (true)
  // or `timeout` passes (false). Errors while polling (server not up yet) are not thrown.
  bool wait_until_ready(std::chrono::milliseconds timeout);

  const std::string& address() const { return address_; }

 private:
  void set_unary_deadline(grpc::ClientContext& ctx) const;

  std::string address_;
  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<mlaserve::v1::Coordinator::Stub> stub_;
};

// A readable table of the cluster (worker id, address, state, tp, free/total pages, running,
// waiting, tokens/s, in flight, ms since heartbeat), then a line with the totals. Ends with
// a newline.
std::string format_cluster_status(const mlaserve::v1::ListWorkersResponse& status);

}  // namespace mla
