#include "parallel/mpi_transport.h"

#include <climits>
#include <random>

#include "kernels/error.h"
#include "parallel/mpi_poll.h"

namespace mla {
namespace {

using Clock = std::chrono::steady_clock;

// How long a cancelled transfer may take to complete before it is left to MPI.
constexpr std::chrono::milliseconds kCancelGrace{100};
constexpr int kMaxTag = 32767;  // the least MPI_TAG_UB the standard allows

void check_rc(int rc, const std::string& what) {
  if (rc != MPI_SUCCESS) MLA_THROW(kUnavailable, "{} failed: {}", what, mpi_error_string(rc));
}

}  // namespace

MpiTransport::MpiTransport(int thread_level, std::chrono::milliseconds timeout)
    : timeout_(timeout) {
  MLA_REQUIRE(timeout.count() > 0, "MpiTransport: timeout must be positive, got {} ms",
              timeout.count());
  check_rc(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_), "MpiTransport: MPI_Comm_rank");
  check_rc(MPI_Comm_size(MPI_COMM_WORLD, &world_size_), "MpiTransport: MPI_Comm_size");
  MPI_Comm dup = MPI_COMM_NULL;
  check_rc(MPI_Comm_dup(MPI_COMM_WORLD, &dup), "MpiTransport: MPI_Comm_dup");
  comm_ = MpiComm(dup);
  MPI_Comm_set_errhandler(comm_.get(), MPI_ERRORS_RETURN);
  if (world_rank_ == 0) {
    std::random_device device;
    job_id_ = (uint64_t{device()} << 32) ^ device();
    if (job_id_ == 0) job_id_ = 1;  // 0 means "no job" on the wire
  }
  check_rc(MPI_Bcast(&job_id_, 1, MPI_UINT64_T, 0, comm_.get()), "MpiTransport: job id broadcast");
  if (thread_level < MPI_THREAD_MULTIPLE) {
    why_not_ =
        "MPI does not provide MPI_THREAD_MULTIPLE (RPC threads cannot use it beside the "
        "step loop)";
  } else if (world_size_ < 2) {
    why_not_ = "the job has one rank";
  }
}

bool MpiTransport::reaches(const MpiEndpoint& peer) const {
  return usable() && peer.job_id == job_id_ && peer.world_rank >= 0 &&
         peer.world_rank < world_size_ && peer.world_rank != world_rank_;
}

int MpiTransport::next_tag() { return tag_.fetch_add(1, std::memory_order_relaxed) % kMaxTag + 1; }

void MpiTransport::check_peer(int peer, int64_t bytes, const char* what) const {
  if (!usable()) MLA_THROW(kFailedPrecondition, "MPI transport: {}", why_not_);
  MLA_REQUIRE(peer >= 0 && peer < world_size_ && peer != world_rank_,
              "MPI transport: cannot {} world rank {} (this is rank {} of {})", what, peer,
              world_rank_, world_size_);
  MLA_REQUIRE(bytes >= 0 && bytes <= INT_MAX, "MPI transport: {} bytes is outside [0, {}]", bytes,
              INT_MAX);
}

bool MpiTransport::send(std::shared_ptr<const std::string> data, int peer, int tag,
                        const std::function<bool()>& stop) {
  const auto bytes = static_cast<int64_t>(data->size());
  check_peer(peer, bytes, "send to");
  MPI_Request request = MPI_REQUEST_NULL;
  check_rc(
      MPI_Isend(data->data(), static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_.get(), &request),
      fmt::format("MPI transport: send of {} bytes to rank {}", bytes, peer));
  return finish(&request, Op::kSend, bytes, peer, tag, stop, std::move(data));
}

std::shared_ptr<std::string> MpiTransport::recv(int64_t bytes, int peer, int tag,
                                                const std::function<bool()>& stop) {
  check_peer(peer, bytes, "receive from");
  auto data = std::make_shared<std::string>(static_cast<size_t>(bytes), '\0');
  MPI_Request request = MPI_REQUEST_NULL;
  check_rc(
      MPI_Irecv(data->data(), static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_.get(), &request),
      fmt::format("MPI transport: receive of {} bytes from rank {}", bytes, peer));
  if (!finish(&request, Op::kRecv, bytes, peer, tag, stop, data)) return nullptr;
  return data;
}

bool MpiTransport::finish(MPI_Request* request, Op op, int64_t bytes, int peer, int tag,
                          const std::function<bool()>& stop, std::shared_ptr<const void> buffer) {
  const std::string what = fmt::format("MPI transport: {} of {} bytes {} rank {} (tag {})",
                                       op == Op::kSend ? "send" : "receive", bytes,
                                       op == Op::kSend ? "to" : "from", peer, tag);
  MPI_Status status;
  int rc = MPI_SUCCESS;
  const PollResult result = poll_mpi_request(request, Clock::now() + timeout_, &status, &rc, stop);
  if (result == PollResult::kCompleted) {
    check_rc(rc, what);
    if (op == Op::kRecv) {
      int received = 0;
      MPI_Get_count(&status, MPI_BYTE, &received);
      if (received != bytes) {
        MLA_THROW(kInternal, "{}: the peer sent {} bytes; both sides must agree on the size", what,
                  received);
      }
    }
    return true;
  }
  // Given up: cancel, and keep the buffer while MPI may still use it.
  MPI_Cancel(request);
  if (poll_mpi_request(request, Clock::now() + kCancelGrace, MPI_STATUS_IGNORE, &rc) !=
      PollResult::kCompleted) {
    MPI_Request_free(request);
    std::lock_guard lk(abandoned_mu_);
    abandoned_.push_back(std::move(buffer));
  }
  if (result == PollResult::kStopped) return false;
  MLA_THROW(kDeadlineExceeded, "{} did not finish within {} ms", what, timeout_.count());
}

}  // namespace mla
