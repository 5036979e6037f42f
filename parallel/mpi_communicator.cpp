#include "parallel/mpi_communicator.h"

#include <climits>
#include <memory>
#include <utility>

#include "kernels/error.h"
#include "parallel/mpi_poll.h"

namespace mla {
namespace {

using Clock = std::chrono::steady_clock;

// How long a cancelled receive may take to complete before it is left to MPI.
constexpr std::chrono::milliseconds kCancelGrace{100};

std::string format_duration(std::chrono::milliseconds d) {
  if (d.count() % 1000 == 0) return fmt::format("{} s", d.count() / 1000);
  return fmt::format("{} ms", d.count());
}

// Polls until `request` completes or `deadline` passes; returns whether it completed.
bool poll_until(MPI_Request* request, Clock::time_point deadline, MPI_Status* status, int* rc) {
  return poll_mpi_request(request, deadline, status, rc) == PollResult::kCompleted;
}

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::chrono::milliseconds timeout,
                                 std::string label)
    : timeout_(timeout), label_(std::move(label)) {
  MLA_REQUIRE(comm != MPI_COMM_NULL, "MpiCommunicator ({}): the MPI communicator is null", label_);
  MLA_REQUIRE(timeout.count() > 0, "MpiCommunicator ({}): timeout must be positive, got {} ms",
              label_, timeout.count());
  const OpInfo op{"communicator set-up"};
  check_mpi(MPI_Comm_rank(comm, &rank_), op);
  check_mpi(MPI_Comm_size(comm, &size_), op);
  // MPI writes the new handle when the duplication completes, which after a timeout may
  // be never or after this constructor has thrown: give it a place that outlives us.
  auto pending = std::make_unique<MPI_Comm>(MPI_COMM_NULL);
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Comm_idup(comm, pending.get(), &request), op);
  try {
    wait(&request, op);
  } catch (...) {
    if (request != MPI_REQUEST_NULL) static_cast<void>(pending.release());
    throw;
  }
  comm_ = MpiComm(*pending);
  MPI_Comm_set_errhandler(comm_.get(), MPI_ERRORS_RETURN);
}

MpiCommunicator::~MpiCommunicator() {
  // Requests abandoned after a failure may still refer to the communicator.
  if (broken_) static_cast<void>(comm_.release());
}

std::string MpiCommunicator::where(const OpInfo& op) const {
  std::string text = fmt::format("rank {} of {} ({}): {}", rank_, size_, label_, op.name);
  if (op.bytes >= 0) text += fmt::format(" of {} bytes", op.bytes);
  if (op.peer_prep != nullptr) text += fmt::format(" {} rank {}", op.peer_prep, op.peer);
  return text;
}

void MpiCommunicator::check_usable(const OpInfo& op) const {
  if (broken_) {
    MLA_THROW(kFailedPrecondition, "{}: the communicator is unusable after an earlier failure",
              where(op));
  }
}

int MpiCommunicator::to_count(int64_t n, const OpInfo& op) const {
  if (n < 0 || n > INT_MAX) {
    MLA_THROW(kInvalidArgument, "{}: count {} is outside [0, {}]", where(op), n, INT_MAX);
  }
  return static_cast<int>(n);
}

void MpiCommunicator::check_rank(int r, const char* what, const OpInfo& op) const {
  if (r < 0 || r >= size_) {
    MLA_THROW(kInvalidArgument, "{}: {} {} is not a rank of this group of {}", where(op), what, r,
              size_);
  }
}

void MpiCommunicator::check_mpi(int rc, const OpInfo& op) {
  if (rc == MPI_SUCCESS) return;
  broken_ = true;
  MLA_THROW(kUnavailable, "{} failed: {}", where(op), mpi_error_string(rc));
}

void MpiCommunicator::wait(MPI_Request* request, const OpInfo& op, MPI_Status* status) {
  int rc = MPI_SUCCESS;
  if (poll_until(request, Clock::now() + timeout_, status, &rc)) {
    check_mpi(rc, op);
    return;
  }
  broken_ = true;
  switch (op.kind) {
    case Kind::kCollective:
      break;  // MPI forbids cancelling or freeing a pending collective
    case Kind::kSend:
      MPI_Request_free(request);
      break;
    case Kind::kRecv:
      MPI_Cancel(request);
      poll_until(request, Clock::now() + kCancelGrace, MPI_STATUS_IGNORE, &rc);
      break;
  }
  MLA_THROW(kDeadlineExceeded, "{} did not finish within {}", where(op), format_duration(timeout_));
}

void MpiCommunicator::all_reduce_sum(float* data, int64_t n) {
  const OpInfo op{"all_reduce", n * static_cast<int64_t>(sizeof(float))};
  check_usable(op);
  const int count = to_count(n, op);
  if (count == 0) return;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data, count, MPI_FLOAT, MPI_SUM, comm_.get(), &request),
            op);
  wait(&request, op);
  stats_.add(CommOp::kAllReduce, op.bytes);
}

void MpiCommunicator::all_gather(const float* send, int64_t n, float* recv) {
  const OpInfo op{"all_gather", n * size_ * static_cast<int64_t>(sizeof(float))};
  check_usable(op);
  const int count = to_count(n, op);
  if (count == 0) return;
  const void* source = send == recv + static_cast<int64_t>(rank_) * n ? MPI_IN_PLACE : send;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Iallgather(source, count, MPI_FLOAT, recv, count, MPI_FLOAT, comm_.get(), &request),
            op);
  wait(&request, op);
  stats_.add(CommOp::kAllGather, op.bytes);
}

void MpiCommunicator::all_to_all(const float* send, int64_t n, float* recv) {
  const OpInfo op{"all_to_all", n * size_ * static_cast<int64_t>(sizeof(float))};
  check_usable(op);
  const int count = to_count(n, op);
  if (count == 0) return;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Ialltoall(send, count, MPI_FLOAT, recv, count, MPI_FLOAT, comm_.get(), &request),
            op);
  wait(&request, op);
  stats_.add(CommOp::kAllToAll, op.bytes);
}

void MpiCommunicator::broadcast(void* data, int64_t bytes, int root) {
  const OpInfo op{"broadcast", bytes, Kind::kCollective, "from root", root};
  check_usable(op);
  check_rank(root, "root", op);
  const int count = to_count(bytes, op);
  if (count == 0) return;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Ibcast(data, count, MPI_BYTE, root, comm_.get(), &request), op);
  wait(&request, op);
  stats_.add(CommOp::kBroadcast, bytes);
}

void MpiCommunicator::send(const void* data, int64_t bytes, int peer) {
  const OpInfo op{"send", bytes, Kind::kSend, "to", peer};
  check_usable(op);
  check_rank(peer, "peer", op);
  MLA_REQUIRE(peer != rank_, "{}: a rank cannot send to itself", where(op));
  const int count = to_count(bytes, op);
  if (count == 0) return;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Isend(data, count, MPI_BYTE, peer, 0, comm_.get(), &request), op);
  wait(&request, op);
  stats_.add(CommOp::kSendRecv, bytes);
}

void MpiCommunicator::recv(void* data, int64_t bytes, int peer) {
  const OpInfo op{"recv", bytes, Kind::kRecv, "from", peer};
  check_usable(op);
  check_rank(peer, "peer", op);
  MLA_REQUIRE(peer != rank_, "{}: a rank cannot receive from itself", where(op));
  const int count = to_count(bytes, op);
  if (count == 0) return;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Irecv(data, count, MPI_BYTE, peer, 0, comm_.get(), &request), op);
  MPI_Status status;
  wait(&request, op, &status);
  int received = 0;
  MPI_Get_count(&status, MPI_BYTE, &received);
  if (received != count) {
    broken_ = true;
    MLA_THROW(kInternal, "{}: the peer sent {} bytes; both sides must agree on the size", where(op),
              received);
  }
  stats_.add(CommOp::kSendRecv, bytes);
}

void MpiCommunicator::barrier() {
  const OpInfo op{"barrier"};
  check_usable(op);
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Ibarrier(comm_.get(), &request), op);
  wait(&request, op);
}

}  // namespace mla
