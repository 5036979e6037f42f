// Scheduler tests: the scheduler and a LatentCache driven directly with hand-made sequences,
// no model. A "step" here is schedule(), commit() of every chunk, and one appended token for
// every chunk that samples, which is what the engine does around the forward pass.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/latent_cache.h"
#include "runtime/scheduler.h"
#include "runtime/sequence.h"

namespace mla {
namespace {

constexpr int32_t kBlock = 4;

CacheGeometry geometry() {
  return CacheGeometry{.num_layers = 1, .block_size = kBlock, .kv_lora_rank = 2, .rope_dim = 1};
}

ErrorCode code_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.code();
  }
  ADD_FAILURE() << "expected mla::Error";
  return ErrorCode::kInternal;
}

// Owns the sequences of one test; ids are 1, 2, ... in creation (= arrival) order.
class Sequences {
 public:
  Sequence* make(int32_t prompt_len) {
    auto seq = std::make_unique<Sequence>();
    seq->id = static_cast<RequestId>(seqs_.size() + 1);
    for (int32_t i = 0; i < prompt_len; ++i) seq->tokens.push_back(100 + i);
    seq->prompt_len = prompt_len;
    seqs_.push_back(std::move(seq));
    return seqs_.back().get();
  }
  Sequence* operator[](size_t i) const { return seqs_[i].get(); }
  size_t size() const { return seqs_.size(); }
  int32_t pages_held() const {
    int32_t n = 0;
    for (const auto& s : seqs_) n += static_cast<int32_t>(s->table.pages.size());
    return n;
  }

 private:
  std::vector<std::unique_ptr<Sequence>> seqs_;
};

// Commits every chunk of the plan and appends a sampled token where the engine would.
void finish_step(Scheduler& scheduler, const Schedule& plan) {
  for (const ScheduledChunk& chunk : plan.chunks) {
    const bool samples = chunk.samples();
    scheduler.commit(chunk);
    if (samples) chunk.seq->tokens.push_back(7);
  }
}

// A chunk as the tables below write it: which sequence (index of creation), where it starts,
// how many tokens, and whether it samples.
struct Chunk {
  int seq;
  int32_t start;
  int32_t num_tokens;
  bool samples;
  bool operator==(const Chunk&) const = default;
};

std::ostream& operator<<(std::ostream& os, const Chunk& c) {
  return os << "{seq " << c.seq << ", start " << c.start << ", n " << c.num_tokens
            << (c.samples ? ", samples}" : "}");
}

std::vector<Chunk> chunks_of(const Schedule& plan) {
  std::vector<Chunk> out;
  for (const ScheduledChunk& c : plan.chunks) {
    out.push_back({static_cast<int>(c.seq->id - 1), c.start, c.num_tokens, c.samples()});
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Token budget, chunked prefill and max_running, state by state.

struct Arrival {
  int step;  // added just before this step's schedule()
  int32_t prompt_len;
};

struct BudgetCase {
  std::string name;
  SchedulerOptions options;
  std::vector<Arrival> arrivals;          // sequence i is arrivals[i]
  std::vector<std::vector<Chunk>> steps;  // expected chunks of each step, in order
  std::vector<int32_t> waiting_after;     // num_waiting() after each step
};

const std::vector<BudgetCase> kBudgetCases = {
    {"long_prompt_prefilled_in_chunks_of_the_budget",
     {.max_batch_tokens = 4, .max_running = 8},
     {{0, 10}},
     {{{0, 0, 4, false}}, {{0, 4, 4, false}}, {{0, 8, 2, true}}, {{0, 10, 1, true}}},
     {0, 0, 0, 0}},
    {"prompt_exactly_the_budget_samples_in_one_step",
     {.max_batch_tokens = 4, .max_running = 8},
     {{0, 4}},
     {{{0, 0, 4, true}}, {{0, 4, 1, true}}},
     {0, 0}},
    {"decodes_first_then_waiting_prompt_gets_the_rest",
     {.max_batch_tokens = 6, .max_running = 8},
     {{0, 3}, {0, 8}},
     {{{0, 0, 3, true}, {1, 0, 3, false}},
      {{0, 3, 1, true}, {1, 3, 5, true}},
      {{0, 4, 1, true}, {1, 8, 1, true}}},
     {0, 0, 0}},
    {"arrival_mid_run_is_chunked_behind_running_decode",
     {.max_batch_tokens = 4, .max_running = 8},
     {{0, 2}, {1, 5}},
     {{{0, 0, 2, true}},
      {{0, 2, 1, true}, {1, 0, 3, false}},
      {{0, 3, 1, true}, {1, 3, 2, true}},
      {{0, 4, 1, true}, {1, 5, 1, true}}},
     {0, 0, 0, 0}},
    {"running_prefill_continues_before_new_arrivals",
     {.max_batch_tokens = 4, .max_running = 8},
     {{0, 7}, {1, 2}},
     {{{0, 0, 4, false}}, {{0, 4, 3, true}, {1, 0, 1, false}}, {{0, 7, 1, true}, {1, 1, 1, true}}},
     {0, 0, 0}},
    {"decodes_can_use_the_whole_budget",
     {.max_batch_tokens = 2, .max_running = 8},
     {{0, 1}, {0, 1}, {0, 1}},
     {{{0, 0, 1, true}, {1, 0, 1, true}}, {{0, 1, 1, true}, {1, 1, 1, true}}},
     {1, 1}},
    {"max_running_caps_admission",
     {.max_batch_tokens = 100, .max_running = 2},
     {{0, 2}, {0, 3}, {0, 1}},
     {{{0, 0, 2, true}, {1, 0, 3, true}}, {{0, 2, 1, true}, {1, 3, 1, true}}},
     {1, 1}},
    {"max_running_one_serialises",
     {.max_batch_tokens = 100, .max_running = 1},
     {{0, 2}, {0, 2}},
     {{{0, 0, 2, true}}, {{0, 2, 1, true}}},
     {1, 1}},
};

class SchedulerBudget : public testing::TestWithParam<BudgetCase> {};

TEST_P(SchedulerBudget, PlansEachStepAsTabled) {
  const BudgetCase& tc = GetParam();
  LatentCache cache(geometry(), 64);
  Scheduler scheduler(tc.options, cache);
  Sequences seqs;
  std::vector<Sequence*> by_arrival;
  for (const Arrival& a : tc.arrivals) by_arrival.push_back(seqs.make(a.prompt_len));

  for (size_t step = 0; step < tc.steps.size(); ++step) {
    for (size_t i = 0; i < tc.arrivals.size(); ++i) {
      if (tc.arrivals[i].step == static_cast<int>(step)) scheduler.add(by_arrival[i]);
    }
    const Schedule plan = scheduler.schedule();
    EXPECT_EQ(chunks_of(plan), tc.steps[step]) << "step " << step;
    EXPECT_TRUE(plan.preempted.empty()) << "step " << step;
    int32_t sum = 0;
    for (const Chunk& c : tc.steps[step]) sum += c.num_tokens;
    EXPECT_EQ(plan.num_tokens, sum) << "step " << step;
    EXPECT_LE(plan.num_tokens, tc.options.max_batch_tokens) << "step " << step;
    EXPECT_LE(scheduler.num_running(), tc.options.max_running) << "step " << step;
    for (const ScheduledChunk& c : plan.chunks) {
      EXPECT_EQ(c.seq->status, SeqStatus::kRunning);
      EXPECT_GE(c.seq->table.num_tokens, c.start + c.num_tokens) << "pages not reserved";
    }
    finish_step(scheduler, plan);
    EXPECT_EQ(scheduler.num_waiting(), tc.waiting_after[step]) << "step " << step;
  }
}

INSTANTIATE_TEST_SUITE_P(Scheduler, SchedulerBudget, testing::ValuesIn(kBudgetCases),
                         [](const auto& info) { return info.param.name; });

TEST(Scheduler, CommitAdvancesNumComputedAndRejectsOutOfOrder) {
  LatentCache cache(geometry(), 8);
  Scheduler scheduler({.max_batch_tokens = 3, .max_running = 4}, cache);
  Sequences seqs;
  Sequence* seq = seqs.make(5);
  scheduler.add(seq);

  const Schedule first = scheduler.schedule();
  ASSERT_EQ(first.chunks.size(), 1u);
  EXPECT_EQ(seq->num_computed, 0) << "schedule() must not mark anything computed";
  EXPECT_FALSE(first.chunks[0].samples());
  scheduler.commit(first.chunks[0]);
  EXPECT_EQ(seq->num_computed, 3);
  EXPECT_EQ(seq->num_pending(), 2);
  // The same chunk again would recompute tokens 0..2 on top of 3: a bookkeeping bug.
  EXPECT_EQ(code_of([&] { scheduler.commit(first.chunks[0]); }), ErrorCode::kInternal);
  EXPECT_EQ(seq->num_computed, 3);

  const Schedule second = scheduler.schedule();
  ASSERT_EQ(second.chunks.size(), 1u);
  EXPECT_EQ(second.chunks[0].start, 3);
  EXPECT_EQ(second.chunks[0].num_tokens, 2);
  EXPECT_TRUE(second.chunks[0].samples());
  scheduler.commit(second.chunks[0]);
  EXPECT_EQ(seq->num_computed, 5);
}

TEST(Scheduler, RejectsInvalidOptions) {
  LatentCache cache(geometry(), 4);
  EXPECT_EQ(code_of([&] { Scheduler({.max_batch_tokens = 0, .max_running = 1}, cache); }),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { Scheduler({.max_batch_tokens = 1, .max_running = 0}, cache); }),
            ErrorCode::kInvalidArgument);
}

TEST(Scheduler, MaxRunningAdmitsTheNextWhenOneLeaves) {
  LatentCache cache(geometry(), 16);
  Scheduler scheduler({.max_batch_tokens = 100, .max_running = 2}, cache);
  Sequences seqs;
  for (int i = 0; i < 3; ++i) scheduler.add(seqs.make(2));
  finish_step(scheduler, scheduler.schedule());
  EXPECT_EQ(scheduler.num_running(), 2);
  EXPECT_EQ(scheduler.num_waiting(), 1);
  EXPECT_TRUE(seqs[2]->table.pages.empty()) << "a sequence kept out by max_running holds pages";

  scheduler.remove(seqs[0]);
  const Schedule plan = scheduler.schedule();
  EXPECT_EQ(chunks_of(plan), (std::vector<Chunk>{{1, 2, 1, true}, {2, 0, 2, true}}));
  EXPECT_EQ(scheduler.num_running(), 2);
  EXPECT_EQ(scheduler.num_waiting(), 0);
}

// ---------------------------------------------------------------------------------------
// Admission: a waiting sequence whose chunk lacks pages stays waiting and reserves nothing.

struct AdmissionCase {
  std::string name;
  int32_t max_batch_tokens;
  int32_t waiting_prompt;  // second sequence, after a first one of 8 tokens (2 pages)
  bool admitted;
  int32_t chunk_tokens;  // when admitted
};

// 3 pages of 4 tokens; the first sequence holds 2, so one page (4 tokens) is free.
const std::vector<AdmissionCase> kAdmissionCases = {
    {"whole_prompt_lacks_pages", 512, 8, false, 0},
    {"one_token_over_a_page", 512, 5, false, 0},
    {"exactly_the_free_page", 512, 4, true, 4},
    // The first sequence's decode leaves budget - 1 tokens for the waiting prompt's chunk.
    {"budget_cuts_the_chunk_to_the_free_page", 5, 8, true, 4},
    {"budget_cut_chunk_still_over_the_free_page", 6, 8, false, 0},
};

class SchedulerAdmission : public testing::TestWithParam<AdmissionCase> {};

TEST_P(SchedulerAdmission, NeverOverCommits) {
  const AdmissionCase& tc = GetParam();
  LatentCache cache(geometry(), 3);
  Scheduler scheduler({.max_batch_tokens = tc.max_batch_tokens, .max_running = 8}, cache);
  Sequences seqs;
  Sequence* first = seqs.make(7);  // 7 prompt tokens + 1 sampled = 8 tokens, 2 pages
  scheduler.add(first);
  // With a budget under 7 the first prompt needs two steps; run until it decodes.
  while (first->num_generated() == 0) finish_step(scheduler, scheduler.schedule());
  ASSERT_EQ(cache.pool().num_free(), 1);

  Sequence* second = seqs.make(tc.waiting_prompt);
  scheduler.add(second);
  const Schedule plan = scheduler.schedule();
  ASSERT_GE(plan.chunks.size(), 1u);
  EXPECT_EQ(plan.chunks[0].seq, first);  // its decode (token 8) fits in its second page
  EXPECT_TRUE(plan.preempted.empty());
  if (tc.admitted) {
    ASSERT_EQ(plan.chunks.size(), 2u);
    EXPECT_EQ(plan.chunks[1].seq, second);
    EXPECT_EQ(plan.chunks[1].num_tokens, tc.chunk_tokens);
    EXPECT_EQ(second->status, SeqStatus::kRunning);
    EXPECT_EQ(cache.pool().num_free(), 0);
  } else {
    EXPECT_EQ(plan.chunks.size(), 1u);
    EXPECT_EQ(second->status, SeqStatus::kWaiting);
    EXPECT_EQ(scheduler.num_waiting(), 1);
    EXPECT_TRUE(second->table.pages.empty());
    EXPECT_EQ(second->table.num_tokens, 0);
    EXPECT_EQ(cache.pool().num_free(), 1) << "pages reserved for a sequence left waiting";
  }
}

INSTANTIATE_TEST_SUITE_P(Scheduler, SchedulerAdmission, testing::ValuesIn(kAdmissionCases),
                         [](const auto& info) { return info.param.name; });

TEST(Scheduler, WaitingQueueIsFifoSoASmallLaterPromptDoesNotOvertake) {
  // Overtaking would let a stream of short prompts starve a long (or preempted) one.
  LatentCache cache(geometry(), 3);
  Scheduler scheduler({.max_batch_tokens = 512, .max_running = 8}, cache);
  Sequences seqs;
  scheduler.add(seqs.make(7));  // 8 tokens after sampling: 2 pages
  finish_step(scheduler, scheduler.schedule());
  scheduler.add(seqs.make(8));  // needs 2, 1 free
  scheduler.add(seqs.make(1));  // would fit
  const Schedule plan = scheduler.schedule();
  EXPECT_EQ(chunks_of(plan), (std::vector<Chunk>{{0, 7, 1, true}}));
  EXPECT_EQ(scheduler.num_waiting(), 2);
  EXPECT_TRUE(seqs[2]->table.pages.empty());
}

// ---------------------------------------------------------------------------------------
// Preemption by recompute.

TEST(Scheduler, PreemptsTheYoungestWhichGoesBackAheadOfNewerArrivals) {
  LatentCache cache(geometry(), 2);
  Scheduler scheduler({.max_batch_tokens = 512, .max_running = 8}, cache);
  Sequences seqs;
  Sequence* a = seqs.make(4);
  Sequence* b = seqs.make(4);
  scheduler.add(a);
  scheduler.add(b);
  finish_step(scheduler, scheduler.schedule());  // both prefilled, one page each, 5 tokens each
  ASSERT_EQ(cache.pool().num_free(), 0);
  Sequence* c = seqs.make(1);  // arrives while the cache is full
  scheduler.add(c);
  const std::vector<int32_t> b_tokens = b->tokens;

  // a's 5th token needs a second page: none is free, so b (the youngest) goes.
  const Schedule plan = scheduler.schedule();
  EXPECT_EQ(chunks_of(plan), (std::vector<Chunk>{{0, 4, 1, true}}));
  EXPECT_EQ(plan.preempted, (std::vector<Sequence*>{b}));
  EXPECT_EQ(b->status, SeqStatus::kWaiting);
  EXPECT_EQ(b->num_computed, 0);
  EXPECT_TRUE(b->table.pages.empty());
  EXPECT_EQ(b->table.num_tokens, 0);
  EXPECT_EQ(b->num_preemptions, 1);
  EXPECT_EQ(b->tokens, b_tokens) << "preemption must keep the generated tokens";
  EXPECT_EQ(a->num_preemptions, 0);
  EXPECT_EQ(a->table.pages.size(), 2u);
  EXPECT_EQ(scheduler.num_running(), 1);
  EXPECT_EQ(scheduler.num_waiting(), 2);
  EXPECT_EQ(cache.pool().num_free(), 0);
  finish_step(scheduler, plan);

  // When a leaves, b (older than c) is recomputed first: all 5 of its tokens in one chunk,
  // which samples, and c must wait for pages behind it.
  scheduler.remove(a);
  const Schedule next = scheduler.schedule();
  EXPECT_EQ(chunks_of(next), (std::vector<Chunk>{{1, 0, 5, true}}));
  EXPECT_EQ(scheduler.num_waiting(), 1);
  EXPECT_EQ(c->status, SeqStatus::kWaiting);
}

TEST(Scheduler, YoungestThatCannotGrowPreemptsItselfAndTheOldestKeepsRunning) {
  LatentCache cache(geometry(), 2);
  Scheduler scheduler({.max_batch_tokens = 512, .max_running = 8}, cache);
  Sequences seqs;
  Sequence* a = seqs.make(3);  // 4 tokens after sampling: still one page
  Sequence* b = seqs.make(4);  // 5 tokens after sampling: needs a second page
  scheduler.add(a);
  scheduler.add(b);
  finish_step(scheduler, scheduler.schedule());
  const std::vector<int32_t> b_tokens = b->tokens;

  const Schedule plan = scheduler.schedule();
  EXPECT_EQ(chunks_of(plan), (std::vector<Chunk>{{0, 3, 1, true}}));
  EXPECT_EQ(plan.preempted, (std::vector<Sequence*>{b}));
  EXPECT_EQ(a->status, SeqStatus::kRunning);
  EXPECT_EQ(b->status, SeqStatus::kWaiting);
  EXPECT_EQ(b->tokens, b_tokens);
  EXPECT_EQ(cache.pool().num_free(), 1) << "b's page is free; its 5 tokens need 2";
  finish_step(scheduler, plan);
}

TEST(Scheduler, OnlyRunningSequencePreemptsItselfAndResumesWhenPagesReturn) {
  LatentCache cache(geometry(), 2);
  Scheduler scheduler({.max_batch_tokens = 512, .max_running = 8}, cache);
  BlockTable other;  // pages held outside the scheduler
  ASSERT_TRUE(cache.reserve(other, kBlock));
  Sequences seqs;
  Sequence* a = seqs.make(4);
  scheduler.add(a);
  finish_step(scheduler, scheduler.schedule());
  ASSERT_EQ(a->tokens.size(), 5u);

  const Schedule plan = scheduler.schedule();
  EXPECT_TRUE(plan.empty());
  EXPECT_EQ(plan.num_tokens, 0);
  EXPECT_EQ(plan.preempted, (std::vector<Sequence*>{a}));
  EXPECT_EQ(a->status, SeqStatus::kWaiting);
  EXPECT_EQ(a->num_computed, 0);
  EXPECT_EQ(a->tokens.size(), 5u);
  EXPECT_EQ(cache.pool().num_free(), 1);
  EXPECT_EQ(scheduler.num_waiting(), 1);

  // Still no room: it waits, and is not preempted again (it holds nothing).
  const Schedule idle = scheduler.schedule();
  EXPECT_TRUE(idle.empty());
  EXPECT_TRUE(idle.preempted.empty());
  EXPECT_EQ(a->num_preemptions, 1);

  cache.release(other);
  const Schedule resumed = scheduler.schedule();
  EXPECT_EQ(chunks_of(resumed), (std::vector<Chunk>{{0, 0, 5, true}}));
  EXPECT_EQ(cache.pool().num_free(), 0);
}

// A waiting sequence that already holds pages (Engine::import_request adds such sequences)
// must not block the cache forever: a running sequence that cannot grow has to be able to
// get those pages, or the two wait for each other.
TEST(Scheduler, WaitingSequenceHoldingPagesDoesNotDeadlockARunningOne) {
  LatentCache cache(geometry(), 4);
  Scheduler scheduler({.max_batch_tokens = 512, .max_running = 8}, cache);
  Sequences seqs;
  Sequence* a = seqs.make(8);  // 2 pages; its 9th token needs a third
  scheduler.add(a);
  finish_step(scheduler, scheduler.schedule());
  Sequence* imported = seqs.make(9);  // latents of 8 tokens already in 2 pages, as an import
  ASSERT_TRUE(cache.reserve(imported->table, 8));
  imported->num_computed = 8;
  scheduler.add(imported);
  ASSERT_EQ(cache.pool().num_free(), 0);

  int generated = 0;
  for (int step = 0; step < 20 && generated < 4; ++step) {
    const Schedule plan = scheduler.schedule();
    for (const ScheduledChunk& c : plan.chunks) generated += c.samples() ? 1 : 0;
    finish_step(scheduler, plan);
  }
  EXPECT_GE(generated, 4) << "no sequence makes progress: a waits for pages that the waiting "
                             "imported sequence holds, and that one waits behind a";
}

// ---------------------------------------------------------------------------------------
// remove()

TEST(Scheduler, RemoveFreesPagesAtOnceWhetherRunningOrWaiting) {
  LatentCache cache(geometry(), 8);
  Scheduler scheduler({.max_batch_tokens = 512, .max_running = 1}, cache);
  Sequences seqs;
  Sequence* running = seqs.make(6);  // 2 pages
  Sequence* waiting = seqs.make(3);  // kept out by max_running
  scheduler.add(running);
  scheduler.add(waiting);
  finish_step(scheduler, scheduler.schedule());
  ASSERT_EQ(running->status, SeqStatus::kRunning);
  ASSERT_EQ(waiting->status, SeqStatus::kWaiting);
  ASSERT_EQ(cache.pool().num_free(), 6);

  scheduler.remove(running);
  EXPECT_EQ(cache.pool().num_free(), 8);
  EXPECT_TRUE(running->table.pages.empty());
  EXPECT_EQ(scheduler.num_running(), 0);

  // A waiting sequence may hold pages (an imported request); removing it frees them too.
  ASSERT_TRUE(cache.reserve(waiting->table, 3));
  ASSERT_EQ(cache.pool().num_free(), 7);
  scheduler.remove(waiting);
  EXPECT_EQ(cache.pool().num_free(), 8);
  EXPECT_EQ(scheduler.num_waiting(), 0);
  EXPECT_TRUE(scheduler.schedule().empty()) << "a removed sequence was scheduled";
}

// ---------------------------------------------------------------------------------------
// A whole run under page pressure: exact page accounting at every step, and nothing lost.

TEST(Scheduler, PageAccountingIsExactEveryStepOfARunWithPreemptions) {
  constexpr int32_t kPages = 8;
  constexpr int kRequests = 14;
  LatentCache cache(geometry(), kPages);
  const SchedulerOptions options{.max_batch_tokens = 8, .max_running = 4};
  Scheduler scheduler(options, cache);
  Sequences seqs;
  std::mt19937 rng(1234);  // its output (unlike the distributions') is the same everywhere
  std::vector<int> arrival(kRequests), max_gen(kRequests);
  for (int i = 0; i < kRequests; ++i) {
    const auto prompt = static_cast<int32_t>(1 + rng() % 14);
    max_gen[i] = static_cast<int>(1 + rng() % 12);
    arrival[i] = static_cast<int>(rng() % 21);
    // Every request fits alone: prompt + max_gen - 1 cached tokens <= 25 < 32.
    seqs.make(prompt);
  }

  std::set<Sequence*> done;
  int64_t preemptions = 0;
  int step = 0;
  for (; step < 1000 && static_cast<int>(done.size()) < kRequests; ++step) {
    for (int i = 0; i < kRequests; ++i) {
      if (arrival[i] == step) scheduler.add(seqs[i]);
    }
    const Schedule plan = scheduler.schedule();
    preemptions += static_cast<int64_t>(plan.preempted.size());
    ASSERT_EQ(cache.pool().num_free() + seqs.pages_held(), kPages) << "step " << step;

    std::set<int32_t> pages;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const Sequence* s = seqs[i];
      for (int32_t p : s->table.pages) {
        EXPECT_TRUE(pages.insert(p).second) << "page " << p << " in two tables, step " << step;
        EXPECT_EQ(cache.pool().ref_count(p), 1);
      }
      EXPECT_EQ(static_cast<int32_t>(s->table.pages.size()), cache.pages_for(s->table.num_tokens))
          << "sequence " << s->id << " holds pages it did not reserve, step " << step;
      if (s->status == SeqStatus::kWaiting) {
        EXPECT_TRUE(s->table.pages.empty()) << "waiting sequence " << s->id << " holds pages";
        EXPECT_EQ(s->num_computed, 0);
      }
    }
    for (Sequence* s : plan.preempted) {
      EXPECT_EQ(s->num_computed, 0);
      // Preempted sequences may be re-admitted in the same plan, recomputing from token 0.
      auto again = std::find_if(plan.chunks.begin(), plan.chunks.end(),
                                [&](const ScheduledChunk& c) { return c.seq == s; });
      if (again == plan.chunks.end()) {
        EXPECT_TRUE(s->table.pages.empty());
      } else {
        EXPECT_EQ(again->start, 0);
      }
    }
    EXPECT_LE(plan.num_tokens, options.max_batch_tokens);
    EXPECT_LE(scheduler.num_running(), options.max_running);
    for (const ScheduledChunk& c : plan.chunks) {
      EXPECT_EQ(c.start, c.seq->num_computed);
      EXPECT_GT(c.num_tokens, 0);
      EXPECT_GE(c.seq->table.num_tokens, c.start + c.num_tokens);
    }

    finish_step(scheduler, plan);
    for (int i = 0; i < kRequests; ++i) {
      Sequence* s = seqs[i];
      if (!done.count(s) && s->num_generated() >= max_gen[i]) {
        EXPECT_EQ(s->num_generated(), max_gen[i]) << "generated past max_gen";
        scheduler.remove(s);
        s->status = SeqStatus::kFinished;
        done.insert(s);
      }
    }
    ASSERT_EQ(cache.pool().num_free() + seqs.pages_held(), kPages) << "after step " << step;
  }
  EXPECT_EQ(static_cast<int>(done.size()), kRequests)
      << "requests lost or stuck after " << step << " steps";
  EXPECT_GT(preemptions, 0) << "the run must exercise preemption";
  EXPECT_EQ(cache.pool().num_free(), kPages);
  EXPECT_EQ(scheduler.num_running(), 0);
  EXPECT_EQ(scheduler.num_waiting(), 0);
}

}  // namespace
}  // namespace mla
