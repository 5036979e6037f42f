#include "parallel/nccl/nccl_communicator.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cstring>
#include <thread>

#include "kernels/cuda/cuda_check.h"

namespace mla {
namespace {

using Clock = std::chrono::steady_clock;

// A non-blocking communicator answers ncclInProgress while work is still being set up or
// enqueued by NCCL's own threads; that is not a failure.
bool is_ok(ncclResult_t r) { return r == ncclSuccess || r == ncclInProgress; }

std::string nccl_failure(ncclComm_t comm, ncclResult_t r) {
  const char* last = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  const bool has_last = last != nullptr && *last != '\0';
  return fmt::format("failed: {}{}{}", ncclGetErrorString(r), has_last ? ": " : "",
                     has_last ? last : "");
}

// Polls the communicator's asynchronous state until it leaves ncclInProgress or the
// deadline passes; returns the last state seen (ncclInProgress means timed out).
ncclResult_t poll_comm(ncclComm_t comm, Clock::time_point deadline) {
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t got = ncclCommGetAsyncError(comm, &state);
    if (got != ncclSuccess) return got;
    if (state != ncclInProgress || Clock::now() >= deadline) return state;
    // Set-up and teardown take milliseconds; no need to spin.
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

}  // namespace

NcclCommunicator::NcclCommunicator(MPI_Comm comm, int cuda_device,
                                   std::chrono::milliseconds timeout)
    : device_(cuda_device), timeout_(timeout) {
  MLA_REQUIRE(timeout.count() > 0, "NcclCommunicator: timeout must be positive, got {} ms",
              timeout.count());
  if (MPI_Comm_rank(comm, &rank_) != MPI_SUCCESS || MPI_Comm_size(comm, &size_) != MPI_SUCCESS) {
    MLA_THROW(kUnavailable, "NcclCommunicator: cannot read rank and size of the MPI group");
  }

  // Rank 0 sends its verdict along with the id, so that a failure there does not leave the
  // other ranks waiting for an id that never comes.
  struct {
    int ok;
    ncclUniqueId id;
  } hello;
  std::memset(&hello, 0, sizeof hello);
  ncclResult_t id_result = ncclSuccess;
  if (rank_ == 0) {
    id_result = ncclGetUniqueId(&hello.id);
    hello.ok = id_result == ncclSuccess;
  }
  if (MPI_Bcast(&hello, sizeof hello, MPI_BYTE, 0, comm) != MPI_SUCCESS) {
    MLA_THROW(kUnavailable, "rank {} of {} (nccl): broadcasting the NCCL id over MPI failed", rank_,
              size_);
  }
  if (!hello.ok) {
    MLA_THROW(kUnavailable, "rank {} of {} (nccl): rank 0 could not make an NCCL id{}", rank_,
              size_, rank_ == 0 ? ": " + nccl_failure(nullptr, id_result) : "");
  }

  // Checked after the broadcast: a rank that stops here leaves the others to time out in
  // the NCCL set-up below rather than block in MPI forever.
  const int visible = cuda::device_count();
  MLA_REQUIRE(cuda_device >= 0 && cuda_device < visible,
              "rank {} of {} (nccl): CUDA device {} does not exist ({} visible)", rank_, size_,
              cuda_device, visible);
  MLA_CUDA_CHECK(cudaSetDevice(device_));
  MLA_CUDA_CHECK(cudaStreamCreate(&stream_));

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclResult_t state = ncclCommInitRankConfig(&comm_, size_, hello.id, rank_, &config);
  if (is_ok(state) && comm_ != nullptr) state = poll_comm(comm_, Clock::now() + timeout_);
  if (state != ncclSuccess) {
    const std::string why = state == ncclInProgress
                                ? fmt::format("did not finish within {} ms", timeout_.count())
                                : nccl_failure(comm_, state);
    abort_comm();
    cudaStreamDestroy(stream_);
    throw Error(state == ncclInProgress ? ErrorCode::kDeadlineExceeded : ErrorCode::kUnavailable,
                fmt::format("rank {} of {} (nccl): joining the communicator on CUDA device {} {}",
                            rank_, size_, device_, why));
  }
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ != nullptr) {
    // Finalize flushes outstanding work and meets the other local ranks; it may wait for
    // peers, so it is bounded like every operation and falls back to abort.
    ncclResult_t state = ncclCommFinalize(comm_);
    if (state == ncclInProgress) state = poll_comm(comm_, Clock::now() + timeout_);
    if (state == ncclSuccess) {
      ncclCommDestroy(comm_);
      comm_ = nullptr;
    } else {
      spdlog::warn(
          "rank {} of {} (nccl): finalizing the communicator {}; aborting it", rank_, size_,
          state == ncclInProgress ? fmt::format("did not finish within {} ms", timeout_.count())
                                  : nccl_failure(comm_, state));
      abort_comm();
    }
  }
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

void NcclCommunicator::set_timeout(std::chrono::milliseconds timeout) {
  MLA_REQUIRE(timeout.count() > 0, "NcclCommunicator: timeout must be positive, got {} ms",
              timeout.count());
  timeout_ = timeout;
}

void NcclCommunicator::all_reduce_sum(float* data, int64_t n) {
  const OpDesc op{CommOp::kAllReduce, "all_reduce", n * 4};
  if (!start(op)) return;
  finish(op,
         ncclAllReduce(data, data, static_cast<size_t>(n), ncclFloat32, ncclSum, comm_, active()));
}

void NcclCommunicator::all_gather(const float* send, int64_t n, float* recv) {
  const OpDesc op{CommOp::kAllGather, "all_gather", n * 4 * size_};
  if (!start(op)) return;
  finish(op, ncclAllGather(send, recv, static_cast<size_t>(n), ncclFloat32, comm_, active()));
}

void NcclCommunicator::all_to_all(const float* send, int64_t n, float* recv) {
  const OpDesc op{CommOp::kAllToAll, "all_to_all", n * 4 * size_};
  if (!start(op)) return;
  // One group: NCCL schedules all the pairs together, so the order of the calls cannot
  // deadlock. ncclGroupEnd must follow ncclGroupStart even when a call in between failed.
  ncclResult_t r = ncclGroupStart();
  if (r == ncclSuccess) {
    const auto count = static_cast<size_t>(n);
    for (int peer = 0; peer < size_ && is_ok(r); ++peer) {
      r = ncclSend(send + peer * n, count, ncclFloat32, peer, comm_, active());
      if (is_ok(r)) r = ncclRecv(recv + peer * n, count, ncclFloat32, peer, comm_, active());
    }
    const ncclResult_t end = ncclGroupEnd();
    if (is_ok(r)) r = end;
  }
  finish(op, r);
}

void NcclCommunicator::broadcast(void* data, int64_t bytes, int root) {
  const OpDesc op{CommOp::kBroadcast, "broadcast", bytes, root};
  const bool work = start(op);
  MLA_REQUIRE(root >= 0 && root < size_, "rank {} of {} (nccl): broadcast root {} is not a rank",
              rank_, size_, root);
  if (!work) return;
  finish(op,
         ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, comm_, active()));
}

void NcclCommunicator::send(const void* data, int64_t bytes, int peer) {
  const OpDesc op{CommOp::kSendRecv, "send", bytes, peer};
  const bool work = start(op);
  MLA_REQUIRE(peer >= 0 && peer < size_ && peer != rank_,
              "rank {} of {} (nccl): cannot send to rank {}", rank_, size_, peer);
  if (!work) return;
  finish(op, ncclSend(data, static_cast<size_t>(bytes), ncclUint8, peer, comm_, active()));
}

void NcclCommunicator::recv(void* data, int64_t bytes, int peer) {
  const OpDesc op{CommOp::kSendRecv, "recv", bytes, peer};
  const bool work = start(op);
  MLA_REQUIRE(peer >= 0 && peer < size_ && peer != rank_,
              "rank {} of {} (nccl): cannot receive from rank {}", rank_, size_, peer);
  if (!work) return;
  finish(op, ncclRecv(data, static_cast<size_t>(bytes), ncclUint8, peer, comm_, active()));
}

bool NcclCommunicator::start(const OpDesc& op) const {
  if (comm_ == nullptr) {
    MLA_THROW(kFailedPrecondition,
              "rank {} of {} (nccl): {}: the communicator was aborted after an earlier failure",
              rank_, size_, op.name);
  }
  MLA_REQUIRE(op.bytes >= 0, "rank {} of {} (nccl): {} of {} bytes", rank_, size_, op.name,
              op.bytes);
  return op.bytes > 0;
}

bool NcclCommunicator::begin_stream_ordered(void* stream) {
  MLA_REQUIRE(stream != nullptr, "rank {} of {} (nccl): stream-ordered mode needs a stream", rank_,
              size_);
  // Graphs replay their collectives without calling in here: an aborted communicator must
  // stop the step before any of them launches.
  if (comm_ == nullptr) {
    MLA_THROW(kFailedPrecondition,
              "rank {} of {} (nccl): the communicator was aborted after an earlier failure", rank_,
              size_);
  }
  ordered_ = static_cast<cudaStream_t>(stream);
  return true;
}

void NcclCommunicator::end_stream_ordered() {
  if (ordered_ == nullptr) return;
  const cudaStream_t stream = ordered_;
  ordered_ = nullptr;
  drain(OpDesc{CommOp::kAllReduce, "stream-ordered collectives", 0}, stream);
}

void NcclCommunicator::finish(const OpDesc& op, ncclResult_t issued) {
  if (!is_ok(issued)) fail(op, ErrorCode::kUnavailable, nccl_failure(comm_, issued));
  if (ordered_ != nullptr) {
    // Enqueued on the caller's stream: only wait for NCCL to leave ncclInProgress.
    const auto deadline = Clock::now() + timeout_;
    for (;;) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t got = ncclCommGetAsyncError(comm_, &state);
      if (got != ncclSuccess) state = got;
      if (!is_ok(state)) fail(op, ErrorCode::kUnavailable, nccl_failure(comm_, state));
      if (state == ncclSuccess) break;
      if (Clock::now() >= deadline) {
        fail(op, ErrorCode::kDeadlineExceeded,
             fmt::format("was not enqueued within {} ms", timeout_.count()));
      }
      std::this_thread::yield();
    }
    stats_.add(op.op, op.bytes);
    return;
  }
  drain(op, stream_);
  stats_.add(op.op, op.bytes);
}

void NcclCommunicator::drain(const OpDesc& op, cudaStream_t stream) {
  // Done when NCCL has enqueued everything (its state leaves ncclInProgress) and the stream
  // has drained. A peer that never joins leaves the kernel spinning: only the deadline ends
  // that, and the abort in fail() stops the kernel.
  const auto deadline = Clock::now() + timeout_;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t got = ncclCommGetAsyncError(comm_, &state);
    if (got != ncclSuccess) state = got;
    if (!is_ok(state)) fail(op, ErrorCode::kUnavailable, nccl_failure(comm_, state));
    if (state == ncclSuccess) {
      const cudaError_t q = cudaStreamQuery(stream);
      if (q == cudaSuccess) break;
      if (q != cudaErrorNotReady) {
        fail(op, ErrorCode::kInternal, fmt::format("failed on the GPU: {}", cudaGetErrorString(q)));
      }
    }
    if (Clock::now() >= deadline) {
      fail(op, ErrorCode::kDeadlineExceeded,
           fmt::format("did not finish within {} ms", timeout_.count()));
    }
    std::this_thread::yield();
  }
}

void NcclCommunicator::fail(const OpDesc& op, ErrorCode code, const std::string& why) {
  abort_comm();
  std::string peer;
  if (op.peer >= 0) {
    const char* relation = op.op == CommOp::kBroadcast         ? "from root"
                           : std::strcmp(op.name, "send") == 0 ? "to rank"
                                                               : "from rank";
    peer = fmt::format(" {} {}", relation, op.peer);
  }
  throw Error(code, fmt::format("rank {} of {} (nccl): {} of {} bytes{} {}", rank_, size_, op.name,
                                op.bytes, peer, why));
}

void NcclCommunicator::abort_comm() noexcept {
  if (comm_ == nullptr) return;
  ncclCommAbort(comm_);
  comm_ = nullptr;
}

}  // namespace mla
