// Engine: one tensor-parallel group's step loop (docs/ARCHITECTURE.md section 4).
//
//   step() = schedule -> (broadcast the step plan) -> run the model -> sample and retire
//            finished sequences.
//
// Requests join at any time and run in continuous batches; long prompts are prefilled in
// chunks under the token budget; when cache pages run out, the youngest running request is
// preempted and recomputed later. Not thread-safe: one thread drives an engine.
//
// Tensor parallelism (docs/ARCHITECTURE.md section 6): every rank of a group builds an Engine
// around its model shard and the group's Communicator. Rank 0, the leader, takes requests and calls
// step(): it schedules, broadcasts the step's plan (which sequences released their pages, which
// chunks run, their tokens), and runs its part of the forward pass. The other ranks call follow()
// until the leader's shutdown(): each applies the plan to its own cache shard and runs its part of
// the same forward pass. The leader's cache (rank 0 owns the largest share of every sequence's
// pages) decides admission, so a follower never runs out of pages the leader had.
#pragma once

#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "runtime/latent_cache.h"
#include "runtime/model.h"
#include "runtime/model_runner.h"
#include "runtime/scheduler.h"
#include "runtime/sequence.h"
#include "runtime/step_plan.h"

namespace mla {

struct EngineOptions {
  int32_t block_size = 64;  // tokens per cache page. Default: 64.
  // Cache pages; 0 sizes the cache from free device memory (CUDA models only). Default: 256.
  int32_t num_pages = 256;
  // With num_pages 0: the share of the free device memory the cache takes. Default: 0.9.
  double cache_memory_fraction = 0.9;
  SchedulerOptions scheduler;  // Default: see SchedulerOptions.
  // Keep full cache pages for reuse by later requests with the same leading tokens
  // (LatentCache::enable_prefix_caching); in a tensor-parallel group the leader's index
  // decides and the followers make its changes to their own pages. Default: false.
  bool prefix_caching = false;

  // The pages an engine's cache gets: num_pages, or with 0 the model's auto_num_pages.
  // Throws kInvalidArgument for 0 with a model that cannot size its cache (the CPU model).
  int32_t cache_pages(const Model& model) const;
};

// What one step produced for one request.
struct StepOutput {
  RequestId id;
  int32_t token = -1;  // -1 when the request ended without a token
  bool finished = false;
  FinishReason finish = FinishReason::kNone;
  std::vector<float> logits;  // only with Request::return_logits
};

// A request's complete state, enough to continue it in another engine: its tokens, its
// sampling settings and the cache latents of its computed tokens from `latents_from` on (the
// ones before were copied while it ran, in a live migration).
struct RequestSnapshot {
  Request request;
  std::vector<int32_t> tokens;  // prompt + generated
  int32_t prompt_len = 0;
  Tensor latents;  // [layers, n, d_c + d_r]: tokens [latents_from, latents_from + n)
  int32_t latents_from = 0;
};

struct EngineStats {
  int64_t steps = 0;
  int64_t computed_tokens = 0;  // tokens run through the model (recomputation included)
  int64_t generated_tokens = 0;
  int64_t preemptions = 0;
  WorkCounter work;
};

class Engine {
 public:
  // `comm` is the tensor-parallel group (its size and rank must match the model's plan);
  // null for a single rank. The model's collectives go through `comm`; the leader's step
  // plans through `control` (host memory: an MPI communicator of the same group), which
  // defaults to `comm` (right for the CPU model, whose comm is MPI).
  Engine(std::shared_ptr<const Model> model, EngineOptions options, Communicator* comm = nullptr,
         Communicator* control = nullptr);

  bool is_leader() const { return comm_ == nullptr || comm_->rank() == 0; }
  // Follower ranks: run steps as the leader plans them; returns after the leader's
  // shutdown(). Throws if called on the leader.
  void follow();
  // Leader: ends the followers' follow() loops. Idempotent; a no-op for one rank.
  void shutdown();
  // Leader: tells idle followers the leader is alive (they wait for plans with the
  // communicator's timeout and fail if the leader goes silent), and has them free the pages
  // of requests that ended since the last step. A serving loop calls it when it has had no
  // step for a while. A no-op for one rank.
  void heartbeat();

  // Validates and queues a request; throws kInvalidArgument naming the bad field
  // (validate_request against the model), or kResourceExhausted if it could never fit in
  // the cache.
  RequestId add_request(Request request);
  // Runs one step; returns one output per request that sampled or ended in it.
  std::vector<StepOutput> step();
  bool has_work() const { return !seqs_.empty(); }
  // Ends a request at once and frees its pages; false if the id is unknown.
  bool cancel(RequestId id);

  // Removes a request from this engine and returns its state (for migration), with the
  // latents of its computed tokens from `from` on. Throws kNotFound for an unknown id.
  RequestSnapshot export_request(RequestId id, int32_t from = 0);
  // Continues a request exported by another engine (whole: latents_from 0); returns its id
  // here. Without room for the latents it recomputes them.
  RequestId import_request(const RequestSnapshot& snapshot);

  // Live migration in stages (as Llumnix does):
  //   source:      copy_latents(id, 0, &end) ... step() ... copy_latents(id, end, &end) ...
  //                then export_request(id, end): the request stops only for that last copy;
  //   destination: begin_import(tokens), write_import(h, first, latents) for every copy in
  //                order, then finish_import(h, snapshot), or abort_import(h).
  // Latents travel in a per-token layout, so the two groups may differ in block size, TP size
  // and cache layout. In a tensor-parallel group these are collectives the leader starts with a
  // cache-op plan: a copy gathers the followers' rows of a sequence-sharded cache at the leader
  // (over the control communicator), and an import's rows are broadcast for every rank to
  // write its own pages.
  // The latents of a running request's tokens [from, min(computed, from + max_tokens));
  // `*end` gets the end. Empty (and *end = from) when the request was preempted and has not
  // recomputed past `from`: what was copied before stays valid, since latents depend only on
  // the tokens.
  Tensor copy_latents(RequestId id, int32_t from, int32_t* end,
                      int32_t max_tokens = std::numeric_limits<int32_t>::max());
  // Tokens a running request has computed (latents in the cache). Throws kNotFound.
  int32_t computed_tokens(RequestId id);
  // Reserves pages for `num_tokens` tokens of a request about to arrive; throws
  // kResourceExhausted, before anything is copied, when the cache lacks them.
  int64_t begin_import(int32_t num_tokens);
  // Writes the latents of tokens [first, first + n), which must continue what this import
  // holds; grows its pages as needed (kResourceExhausted if the cache runs out).
  void write_import(int64_t handle, int32_t first, const Tensor& latents);
  // Writes the snapshot's tail, then adds the request with the imported latents as its
  // computed tokens; returns its id here. The import's pages become the request's.
  RequestId finish_import(int64_t handle, const RequestSnapshot& snapshot);
  // Frees an unfinished import's pages (the migration failed or was cancelled); false if the
  // handle is unknown.
  bool abort_import(int64_t handle);
  // Imports begun and not yet finished or aborted.
  size_t pending_imports() const { return imports_.size(); }

  const Model& model() const { return *model_; }
  // The runner of this engine's forward passes (a CudaRunner for a CUDA model: its graph and
  // profiling counters).
  ModelRunner& runner() { return *runner_; }
  const LatentCache& cache() const { return cache_; }
  const EngineStats& stats() const { return stats_; }
  // The last step() that ran a step: what it computed and how long step() took (wall clock,
  // schedule to sampled tokens; on a GPU that includes waiting for the device).
  struct StepRecord {
    StepShape shape;
    double step_ms = 0;
  };
  const StepRecord& last_step() const { return last_step_; }
  int32_t num_running() const { return scheduler_.num_running(); }
  int32_t num_waiting() const { return scheduler_.num_waiting(); }

 private:
  // Leader, step()'s parts in order: the scheduler's choice (its preempted sequences go in
  // the next plan's released ids), the plan that lets followers run the same step, sending it.
  Schedule schedule_step();
  StepPlan plan_for(const Schedule& schedule, const ForwardBatch& batch);
  void send_plan(const StepPlan& plan);
  // Samples each sequence that reached its last token, and retires the finished ones.
  std::vector<StepOutput> postprocess(const Schedule& schedule, SampledStep sampled);
  SampledStep run_forward(const ForwardBatch& batch, const std::vector<SampleRequest>& requests);
  // Leader and followers alike: the leader's plan words, sized first (a collective).
  void broadcast_plan(std::vector<int64_t>& plan);
  // Follower: applies a step plan to this rank's cache shard and returns the batch to run.
  ForwardBatch follower_batch(StepPlan plan);
  // Follower: its part of a migration's cache op (see StepPlan).
  void follow_cache_op(const StepPlan& plan);
  // Leader: starts a cache op on the followers.
  void send_cache_op(StepPlan::Kind kind, const StepPlan::CacheOp& op);
  // Leader: the latents of tokens [first, first + count) of `seq`, the followers' rows of a
  // sequence-sharded cache included: [layers, count, d_c + d_r] fp32.
  Tensor latents_of(const Sequence& seq, int32_t first, int32_t count);
  void validate(const Request& r) const;
  // Gives `seq` its id and hands it to the scheduler; returns the id.
  RequestId admit(std::unique_ptr<Sequence> seq);
  // A new sequence holding a snapshot's request and tokens (validated), no pages yet.
  std::unique_ptr<Sequence> sequence_of(const RequestSnapshot& snap) const;
  Sequence& find(RequestId id);
  void retire(Sequence& seq, FinishReason reason);

  std::shared_ptr<const Model> model_;
  EngineOptions options_;
  Communicator* comm_;
  Communicator* control_;
  LatentCache cache_;
  std::unique_ptr<ModelRunner> runner_;
  Scheduler scheduler_;
  std::map<RequestId, std::unique_ptr<Sequence>> seqs_;
  RequestId next_id_ = 1;
  EngineStats stats_;
  StepRecord last_step_;
  std::vector<RequestId> released_;  // leader: sequences whose pages were freed since the last plan
  // Tells the followers (in the next plan) that request `id`'s pages were freed.
  void note_released(RequestId id);
  std::map<RequestId, BlockTable> follower_tables_;  // follower: this rank's pages per sequence
  std::map<int64_t, BlockTable> follower_imports_;   // follower: its pages of imports under way
  struct Import {
    BlockTable table;
    int32_t covered = 0;  // tokens [0, covered) written
  };
  std::map<int64_t, Import> imports_;  // live migrations arriving here
  int64_t next_import_ = 1;
  bool shut_down_ = false;
};

}  // namespace mla
