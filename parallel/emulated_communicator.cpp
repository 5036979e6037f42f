#include "parallel/emulated_communicator.h"

#include <cstring>

#include "kernels/error.h"

namespace mla {

EmulatedCommunicator::EmulatedCommunicator(int size, Copy copy, StreamOps stream_ops)
    : size_(size), copy_(std::move(copy)), stream_ops_(std::move(stream_ops)) {
  MLA_REQUIRE(size >= 1, "an emulated group needs at least one rank, not {}", size);
  MLA_REQUIRE(static_cast<bool>(stream_ops_.copy_async) == static_cast<bool>(stream_ops_.drain),
              "an emulated group's stream operations need both copy_async and drain");
  if (!copy_)
    copy_ = [](void* dst, const void* src, int64_t bytes) {
      std::memcpy(dst, src, static_cast<size_t>(bytes));
    };
}

void EmulatedCommunicator::fill_blocks(const float* block, int64_t n, float* recv) {
  for (int r = 0; r < size_; ++r) {
    float* dst = recv + r * n;
    if (dst == block) continue;
    const int64_t bytes = n * static_cast<int64_t>(sizeof(float));
    if (ordered_ != nullptr) {
      stream_ops_.copy_async(dst, block, bytes, ordered_);
    } else {
      copy_(dst, block, bytes);
    }
  }
}

void EmulatedCommunicator::all_reduce_sum(float*, int64_t n) {
  if (n == 0) return;
  stats_.add(CommOp::kAllReduce, n * static_cast<int64_t>(sizeof(float)));
}

void EmulatedCommunicator::all_gather(const float* send, int64_t n, float* recv) {
  if (n == 0) return;
  fill_blocks(send, n, recv);
  stats_.add(CommOp::kAllGather, n * size_ * static_cast<int64_t>(sizeof(float)));
}

void EmulatedCommunicator::all_to_all(const float* send, int64_t n, float* recv) {
  if (n == 0) return;
  fill_blocks(send, n, recv);
  stats_.add(CommOp::kAllToAll, n * size_ * static_cast<int64_t>(sizeof(float)));
}

void EmulatedCommunicator::broadcast(void*, int64_t bytes, int root) {
  if (root != 0) {
    MLA_THROW(kFailedPrecondition, "an emulated group has only rank 0: no broadcast from rank {}",
              root);
  }
  if (bytes == 0) return;
  stats_.add(CommOp::kBroadcast, bytes);
}

bool EmulatedCommunicator::begin_stream_ordered(void* stream) {
  if (!stream_ops_.copy_async || stream == nullptr) return false;
  ordered_ = stream;
  return true;
}

void EmulatedCommunicator::end_stream_ordered() {
  if (ordered_ == nullptr) return;
  void* stream = ordered_;
  ordered_ = nullptr;
  stream_ops_.drain(stream);
}

void EmulatedCommunicator::send(const void*, int64_t, int peer) {
  MLA_THROW(kFailedPrecondition, "an emulated group has only rank 0: nothing to send to rank {}",
            peer);
}

void EmulatedCommunicator::recv(void*, int64_t, int peer) {
  MLA_THROW(kFailedPrecondition,
            "an emulated group has only rank 0: nothing to receive from rank {}", peer);
}

}  // namespace mla
