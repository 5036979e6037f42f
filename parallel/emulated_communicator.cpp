#include "parallel/emulated_communicator.h"

#include <cstring>

#include "kernels/error.h"

namespace mla {

EmulatedCommunicator::EmulatedCommunicator(int size, Copy copy)
    : size_(size), copy_(std::move(copy)) {
  MLA_REQUIRE(size >= 1, "an emulated group needs at least one rank, not {}", size);
  if (!copy_)
    copy_ = [](void* dst, const void* src, int64_t bytes) {
      std::memcpy(dst, src, static_cast<size_t>(bytes));
    };
}

void EmulatedCommunicator::fill_blocks(const float* block, int64_t n, float* recv) {
  for (int r = 0; r < size_; ++r) {
    float* dst = recv + r * n;
    if (dst != block) copy_(dst, block, n * static_cast<int64_t>(sizeof(float)));
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

void EmulatedCommunicator::send(const void*, int64_t, int peer) {
  MLA_THROW(kFailedPrecondition, "an emulated group has only rank 0: nothing to send to rank {}",
            peer);
}

void EmulatedCommunicator::recv(void*, int64_t, int peer) {
  MLA_THROW(kFailedPrecondition,
            "an emulated group has only rank 0: nothing to receive from rank {}", peer);
}

}  // namespace mla
