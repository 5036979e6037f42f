// Scheduler: continuous batching with chunked prefill and preemption by recompute.
//
// Each step it fills a token budget: first the running sequences in arrival order (a
// decode is one token, an unfinished prefill a chunk of its prompt), then waiting ones
// (new or preempted) in arrival order, each as one chunk that fits the remaining budget.
// It reserves the cache pages a chunk needs before scheduling it. When a running sequence
// cannot get pages, the most recently arrived running sequence is preempted (its pages
// freed, its tokens recomputed later). It never admits a waiting sequence whose chunk does
// not fit, and it never drops a sequence. Not thread-safe: owned by the engine's step loop.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "runtime/latent_cache.h"
#include "runtime/sequence.h"

namespace mla {

struct SchedulerOptions {
  int32_t max_batch_tokens = 512;  // token budget of one step. Default: 512.
  int32_t max_running = 64;        // sequences in one step at most. Default: 64.
};

struct ScheduledChunk {
  Sequence* seq;
  int32_t start;  // position of the chunk's first token
  int32_t num_tokens;
  bool samples() const {  // the chunk reaches the last known token: sample after it
    return start + num_tokens == static_cast<int32_t>(seq->tokens.size());
  }
};

// What a step computes, in the terms step time depends on (what `mlaserve profile` measures
// and `mlaserve simulate` interpolates): a chunk of one token after its prompt decodes, every
// other chunk prefills.
struct StepShape {
  int32_t prefill_tokens = 0;  // prompt tokens computed in the step
  int32_t decode_seqs = 0;     // sequences that decode one token
  int64_t context_tokens = 0;  // tokens those sequences attend to, summed
  int64_t prefill_pairs = 0;   // the prefill chunks' attention pairs: n x (start + n / 2) each
};

struct Schedule {
  std::vector<ScheduledChunk> chunks;
  int32_t num_tokens = 0;
  std::vector<Sequence*> preempted;  // preempted during this schedule() call
  bool empty() const { return chunks.empty(); }
  StepShape shape() const;
};

class Scheduler {
 public:
  Scheduler(SchedulerOptions options, LatentCache& cache);

  // Queues a sequence (kWaiting), or, if it already holds cache pages (an imported request)
  // and a running slot is free, runs it (kRunning); without a slot it releases its pages. An
  // imported sequence's full pages are offered to the prefix index first, so they stay
  // reusable either way.
  // The caller keeps ownership.
  void add(Sequence* seq);
  // Plans the next step and reserves its pages.
  Schedule schedule();
  // Marks the chunk as computed (after the forward pass) and offers the pages its sequence's
  // computed tokens now fill to the cache's prefix index (with prefix caching).
  void commit(const ScheduledChunk& chunk);
  // Removes a sequence (finished or cancelled) and frees its pages at once.
  void remove(Sequence* seq);

  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  const SchedulerOptions& options() const { return options_; }

 private:
  void preempt(Sequence* seq);

  SchedulerOptions options_;
  LatentCache& cache_;
  std::deque<Sequence*> waiting_;   // arrival order; preempted ones go back to the front
  std::vector<Sequence*> running_;  // arrival order
};

}  // namespace mla
