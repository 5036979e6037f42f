// EmulatedCommunicator: rank 0 of a tensor-parallel group of P ranks of which only this process
// exists, so one machine can measure what one rank of a larger group computes (`mlaserve profile
// --emulate-tp P`: a rank's share of a TP8 group on one GPU).
//
// Every call returns at once with its outputs shaped as the real collective's, as if each absent
// rank had contributed a copy of this rank's data: all_reduce_sum leaves the data as it is;
// all_gather fills every block of recv with send; all_to_all fills every block of recv with
// send's block 0 (what this rank sends itself, standing in for what each peer would send it).
// The values are therefore not a real group's, but every shape, and so every kernel's work, is,
// and stats() counts the bytes and calls the real collective would (as MpiCommunicator and
// NcclCommunicator count them), so a caller can add the collectives' time from a link model.
// A broadcast from this rank (a leader's step plan) is a no-op, counted; anything that needs
// an absent rank's data (a broadcast from another root, send, recv) throws kFailedPrecondition.
//
// Buffers are in whatever memory `copy` moves (host memcpy by default; a CUDA caller passes a
// device-to-device copy). Zero-sized operations are no-ops and are not counted.
// Given StreamOps, it is stream-ordered as NcclCommunicator is (begin_stream_ordered): the
// copies are enqueued on the caller's stream and nothing waits, so the emulated rank's steps run
// as a real group's do, with no host synchronisation around collectives and in CUDA graphs.
// Thread safety: one thread at a time.
#pragma once

#include <cstdint>
#include <functional>

#include "parallel/communicator.h"

namespace mla {

class EmulatedCommunicator final : public Communicator {
 public:
  // Copies `bytes` from src to dst (non-overlapping), in the memory the buffers live in.
  using Copy = std::function<void(void* dst, const void* src, int64_t bytes)>;

  // Stream-ordered copies (device memory): copy_async enqueues a copy on `stream`; drain waits
  // until `stream` has finished its work.
  struct StreamOps {
    std::function<void(void* dst, const void* src, int64_t bytes, void* stream)> copy_async;
    std::function<void(void* stream)> drain;
  };

  // Throws kInvalidArgument unless size >= 1, or for StreamOps with one function missing.
  explicit EmulatedCommunicator(int size, Copy copy = nullptr, StreamOps stream_ops = {});

  int rank() const override { return 0; }
  int size() const override { return size_; }

  void all_reduce_sum(float* data, int64_t n) override;
  // `send` may alias block 0 of `recv`.
  void all_gather(const float* send, int64_t n, float* recv) override;
  void all_to_all(const float* send, int64_t n, float* recv) override;
  void broadcast(void* data, int64_t bytes, int root) override;
  void send(const void* data, int64_t bytes, int peer) override;
  void recv(void* data, int64_t bytes, int peer) override;
  // True (and ordered on `stream` until end_stream_ordered) when StreamOps were given.
  bool begin_stream_ordered(void* stream) override;
  void end_stream_ordered() override;

 private:
  // recv block r <- block (r's source) for every r whose block is not the source itself.
  void fill_blocks(const float* block, int64_t n, float* recv);

  int size_;
  Copy copy_;
  StreamOps stream_ops_;
  void* ordered_ = nullptr;  // the stream collectives enqueue on; null: blocking copies
};

}  // namespace mla
