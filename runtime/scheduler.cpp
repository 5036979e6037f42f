#include "runtime/scheduler.h"

#include <algorithm>

#include "kernels/error.h"

namespace mla {

const char* to_string(FinishReason r) {
  switch (r) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "?";
}

Scheduler::Scheduler(SchedulerOptions options, LatentCache& cache)
    : options_(options), cache_(cache) {
  MLA_REQUIRE(options.max_batch_tokens >= 1, "max_batch_tokens must be >= 1");
  MLA_REQUIRE(options.max_running >= 1, "max_running must be >= 1");
}

void Scheduler::add(Sequence* seq) {
  seq->table.owner = static_cast<int64_t>(seq->id);
  // Waiting sequences hold no pages (preemption only reclaims running ones), so a sequence
  // that arrives with cached latents (an imported one) runs at once or gives them up.
  if (!seq->table.pages.empty()) {
    cache_.keep_full_pages(seq->table, seq->tokens, seq->num_computed);
    if (static_cast<int32_t>(running_.size()) < options_.max_running) {
      seq->status = SeqStatus::kRunning;
      running_.push_back(seq);
      return;
    }
    cache_.release(seq->table);
    seq->num_computed = 0;
  }
  seq->status = SeqStatus::kWaiting;
  waiting_.push_back(seq);
}

void Scheduler::preempt(Sequence* seq) {
  cache_.release(seq->table);
  seq->num_computed = 0;
  seq->status = SeqStatus::kWaiting;
  seq->num_preemptions++;
  running_.erase(std::find(running_.begin(), running_.end(), seq));
  // Preempted sequences arrived before anything still waiting: they go first.
  auto pos =
      std::find_if(waiting_.begin(), waiting_.end(), [&](Sequence* w) { return w->id > seq->id; });
  waiting_.insert(pos, seq);
}

Schedule Scheduler::schedule() {
  Schedule plan;
  int32_t budget = options_.max_batch_tokens;

  // Running sequences, oldest first; on page shortage evict the youngest.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* seq = running_[i];
    const int32_t n = std::min(seq->num_pending(), budget);
    if (cache_.reserve(seq->table, seq->num_computed + n)) {
      plan.chunks.push_back({seq, seq->num_computed, n});
      budget -= n;
      ++i;
      continue;
    }
    // The youngest is never before `i`, so no planned chunk loses its pages. If it is
    // `seq` itself, the loop ends.
    Sequence* victim = running_.back();
    plan.preempted.push_back(victim);
    preempt(victim);
  }

  // Waiting sequences in order, while their first chunk fits; none in a step that had to
  // preempt (the pages are short, and a preempted sequence would recompute at once).
  while (plan.preempted.empty() && !waiting_.empty() && budget > 0 &&
         static_cast<int32_t>(running_.size()) < options_.max_running) {
    Sequence* seq = waiting_.front();
    // A sequence starting from nothing starts on the cached pages of its prefix, if any
    // (leaving at least its last token to compute: that one samples).
    const bool looked_up = seq->table.pages.empty() && seq->num_computed == 0;
    const auto lookup_max = static_cast<int32_t>(seq->tokens.size()) - 1;
    const size_t ops_mark = cache_.prefix_ops_mark();
    if (looked_up) seq->num_computed = cache_.reuse_prefix(seq->table, seq->tokens, lookup_max);
    const int32_t n = std::min(seq->num_pending(), budget);
    if (!cache_.reserve(seq->table, seq->num_computed + n)) {
      // The reused pages stay cached; a group's followers never hear of the try.
      if (looked_up) {
        cache_.undo_reuse(seq->table, ops_mark);
      } else {
        cache_.release(seq->table);
      }
      seq->num_computed = 0;
      break;
    }
    if (looked_up) cache_.count_prefix_lookup(seq->tokens, lookup_max, seq->num_computed);
    waiting_.pop_front();
    seq->status = SeqStatus::kRunning;
    running_.push_back(seq);
    plan.chunks.push_back({seq, seq->num_computed, n});
    budget -= n;
  }
  for (const auto& c : plan.chunks) plan.num_tokens += c.num_tokens;
  return plan;
}

StepShape Schedule::shape() const {
  StepShape s;
  for (const ScheduledChunk& c : chunks) {
    if (c.start >= c.seq->prompt_len && c.num_tokens == 1) {
      ++s.decode_seqs;
      s.context_tokens += c.start + 1;
    } else {
      s.prefill_tokens += c.num_tokens;
      s.prefill_pairs += int64_t{c.num_tokens} * (c.start + c.num_tokens / 2);
    }
  }
  return s;
}

void Scheduler::commit(const ScheduledChunk& chunk) {
  Sequence& seq = *chunk.seq;
  MLA_CHECK(seq.num_computed == chunk.start, "chunk committed out of order");
  seq.num_computed += chunk.num_tokens;
  cache_.keep_full_pages(seq.table, seq.tokens, seq.num_computed);
}

void Scheduler::remove(Sequence* seq) {
  cache_.release(seq->table);
  std::erase(running_, seq);
  std::erase(waiting_, seq);
}

}  // namespace mla
