#include "runtime/engine.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "kernels/error.h"
#include "runtime/request_validation.h"
#include "runtime/step_plan.h"
#if MLA_HAVE_CUDA
#include "kernels/cuda/device_memory.h"
#endif

namespace mla {

namespace {

// The engine's cache, on the model's device whichever thread builds the engine.
LatentCache make_cache(const Model& model, const EngineOptions& options) {
#if MLA_HAVE_CUDA
  std::optional<cuda::DeviceGuard> on_device;
  if (model.cuda_device() >= 0) on_device.emplace(model.cuda_device());
#endif
  return LatentCache(model.cache_geometry(options.block_size), options.cache_pages(model),
                     model.shard(), model.cache_storage());
}

// What the model runs for a schedule: every chunk's tokens, and how to sample each chunk
// that reaches its sequence's last token.
struct ForwardInputs {
  ForwardBatch batch;
  std::vector<SampleRequest> requests;
};

ForwardInputs forward_inputs(const Schedule& schedule) {
  ForwardInputs in;
  for (const ScheduledChunk& chunk : schedule.chunks) {
    const Sequence& seq = *chunk.seq;
    in.batch.tokens.insert(in.batch.tokens.end(), seq.tokens.begin() + chunk.start,
                           seq.tokens.begin() + chunk.start + chunk.num_tokens);
    in.batch.seqs.push_back({&seq.table, chunk.start, chunk.num_tokens, chunk.samples()});
    if (chunk.samples()) {
      in.requests.push_back({seq.request.sampling, static_cast<int64_t>(seq.tokens.size()),
                             seq.request.return_logits});
    }
  }
  return in;
}

}  // namespace

int32_t EngineOptions::cache_pages(const Model& model) const {
  if (num_pages > 0) return num_pages;
  const int32_t pages = model.auto_num_pages(block_size, cache_memory_fraction);
  MLA_REQUIRE(pages > 0, "num_pages 0 (automatic) needs a model on a GPU; set num_pages");
  return pages;
}

Engine::Engine(std::shared_ptr<const Model> model, EngineOptions options, Communicator* comm,
               Communicator* control)
    : model_(std::move(model)),
      options_(options),
      comm_(comm != nullptr && comm->size() > 1 ? comm : nullptr),
      control_(control != nullptr ? control : comm_),
      cache_(make_cache(*model_, options)),
      runner_(model_->make_runner(cache_, comm_)),
      scheduler_(options.scheduler, cache_) {
  MLA_REQUIRE(model_->shard().tp_size() == (comm_ ? comm_->size() : 1),
              "the model is sharded for {} ranks but the group has {}", model_->shard().tp_size(),
              comm_ ? comm_->size() : 1);
  // In a group the leader's index decides and records what it does for the followers, which
  // make the same changes to their own pages (follower_batch); they keep no index of their own.
  if (options.prefix_caching && is_leader()) cache_.enable_prefix_caching(comm_ != nullptr);
}

void Engine::broadcast_plan(std::vector<int64_t>& plan) {
  int64_t words = static_cast<int64_t>(plan.size());
  control_->broadcast(&words, sizeof(words), 0);
  plan.resize(words);
  control_->broadcast(plan.data(), words * static_cast<int64_t>(sizeof(int64_t)), 0);
}

SampledStep Engine::run_forward(const ForwardBatch& batch,
                                const std::vector<SampleRequest>& requests) {
  WorkCounter work;
  SampledStep sampled = runner_->forward_sample(batch, requests, &work);
  stats_.steps++;
  stats_.computed_tokens += static_cast<int64_t>(batch.tokens.size());
  stats_.work.add(work);
  spdlog::debug("step {}: {} sequences, {} tokens, forms: latent {} decompressed {}", stats_.steps,
                batch.seqs.size(), batch.tokens.size(), work.chunks(AttnForm::kLatent),
                work.chunks(AttnForm::kDecompressed));
  return sampled;
}

void Engine::follow() {
  MLA_REQUIRE(!is_leader(), "follow() is for follower ranks; the leader calls step()");
  while (true) {
    std::vector<int64_t> words;
    broadcast_plan(words);
    StepPlan plan = StepPlan::decode(words);
    if (plan.kind == StepPlan::Kind::kShutdown) return;
    if (plan.kind == StepPlan::Kind::kHeartbeat) continue;
    if (plan.is_cache_op()) {
      follow_cache_op(plan);
      continue;
    }
    ForwardBatch batch = follower_batch(std::move(plan));
    if (!batch.seqs.empty()) run_forward(batch, {});
  }
}

ForwardBatch Engine::follower_batch(StepPlan plan) {
  auto release = [&](RequestId id) {
    auto it = follower_tables_.find(id);
    if (it == follower_tables_.end()) return;
    cache_.release(it->second);
    follower_tables_.erase(it);
  };
  // The leader's prefix index changes in its order (with prefix caching they carry every
  // release too), then the released sequences (without it), then the chunks.
  for (const PrefixOp& op : plan.prefix_ops) {
    const auto owner = static_cast<RequestId>(op.owner);
    if (op.kind == PrefixOp::Kind::kDrop) {
      release(owner);
    } else {
      cache_.apply_prefix_op(
          op, op.kind == PrefixOp::Kind::kEvict ? nullptr : &follower_tables_[owner]);
    }
  }
  for (RequestId id : plan.released) release(id);
  ForwardBatch batch;
  for (const StepPlan::Chunk& chunk : plan.chunks) {
    BlockTable& table = follower_tables_[chunk.id];
    MLA_CHECK(cache_.reserve(table, chunk.start + chunk.num_tokens),
              "follower rank {} has no pages for a chunk its leader could place", comm_->rank());
    batch.seqs.push_back({&table, chunk.start, chunk.num_tokens, chunk.want_logits});
  }
  batch.tokens = std::move(plan.tokens);
  return batch;
}

void Engine::follow_cache_op(const StepPlan& plan) {
  const StepPlan::CacheOp& op = plan.op;
  const CacheGeometry& g = cache_.geometry();
  switch (plan.kind) {
    case StepPlan::Kind::kCopyLatents: {
      // This rank's rows of the request's tokens, packed, to the leader.
      auto it = follower_tables_.find(op.id);
      const BlockTable none;
      const Tensor rows = cache_.export_stored(it == follower_tables_.end() ? none : it->second,
                                               op.first, op.count);
      control_->send(rows.raw(), static_cast<int64_t>(rows.nbytes()), 0);
      return;
    }
    case StepPlan::Kind::kWriteImport: {
      Tensor latents =
          Tensor::empty({g.num_layers, op.count, cache_.row_width()}, cache_.row_dtype());
      control_->broadcast(latents.raw(), static_cast<int64_t>(latents.nbytes()), 0);
      BlockTable& table = follower_imports_[op.import];
      MLA_CHECK(cache_.reserve(table, op.first + op.count),
                "follower rank {} has no pages for an import its leader could place",
                comm_->rank());
      cache_.write_range(table, op.first, latents);
      return;
    }
    case StepPlan::Kind::kFinishImport:
      follower_tables_[op.id] = std::move(follower_imports_[op.import]);
      follower_imports_.erase(op.import);
      return;
    case StepPlan::Kind::kAbortImport:
      if (auto it = follower_imports_.find(op.import); it != follower_imports_.end()) {
        cache_.release(it->second);
        follower_imports_.erase(it);
      }
      return;
    default:
      MLA_CHECK(false, "step plan kind {} is not a cache op", static_cast<int64_t>(plan.kind));
  }
}

void Engine::send_cache_op(StepPlan::Kind kind, const StepPlan::CacheOp& op) {
  // Pages freed or evicted on the leader are freed on the followers first: an import's pages
  // may need them.
  if (!released_.empty() || cache_.has_prefix_ops()) heartbeat();
  StepPlan plan;
  plan.kind = kind;
  plan.op = op;
  send_plan(plan);
}

Tensor Engine::latents_of(const Sequence& seq, int32_t first, int32_t count) {
  Tensor out = cache_.export_range(seq.table, first, count);
  if (comm_ == nullptr || cache_.holds_every_page() || count == 0) return out;
  // The followers' pages: each sends its rows, packed, and the leader puts them in place.
  send_cache_op(StepPlan::Kind::kCopyLatents, {.id = seq.id, .first = first, .count = count});
  const CacheGeometry& g = cache_.geometry();
  for (int rank = 1; rank < comm_->size(); ++rank) {
    const auto runs = stored_runs(cache_.shard().for_rank(rank), g.block_size, first, count);
    int64_t tokens = 0;
    for (const TokenRun& run : runs) tokens += run.count;
    Tensor packed = Tensor::empty({g.num_layers, tokens, cache_.row_width()}, cache_.row_dtype());
    control_->recv(packed.raw(), static_cast<int64_t>(packed.nbytes()), rank);
    copy_stored_rows(packed, runs, first, out);
  }
  return out;
}

void Engine::send_plan(const StepPlan& plan) {
  std::vector<int64_t> words = plan.encode();
  broadcast_plan(words);
}

void Engine::heartbeat() {
  if (comm_ == nullptr || !is_leader() || shut_down_) return;
  StepPlan plan;
  // Pages released since the last step (finished, cancelled or migrated requests) are freed
  // on the followers now rather than at the next step.
  plan.prefix_ops = cache_.take_prefix_ops();
  plan.kind = released_.empty() && plan.prefix_ops.empty() ? StepPlan::Kind::kHeartbeat
                                                           : StepPlan::Kind::kStep;
  plan.released.swap(released_);
  send_plan(plan);
}

void Engine::shutdown() {
  if (comm_ == nullptr || !is_leader() || shut_down_) return;
  if (!released_.empty() || cache_.has_prefix_ops()) heartbeat();
  shut_down_ = true;
  StepPlan plan;
  plan.kind = StepPlan::Kind::kShutdown;
  send_plan(plan);
}

void Engine::validate(const Request& r) const {
  validate_request(r, ModelLimits::of(model_->config()));
  // The last sampled token ends the request without running through the model.
  const auto cached = static_cast<int32_t>(r.prompt.size() + r.max_tokens - 1);
  if (cache_.pages_for(cached) > cache_.pool().num_pages()) {
    MLA_THROW(kResourceExhausted,
              "request needs {} cache pages for {} tokens but the cache has only {}",
              cache_.pages_for(cached), cached, cache_.pool().num_pages());
  }
}

RequestId Engine::add_request(Request request) {
  validate(request);
  auto seq = std::make_unique<Sequence>();
  seq->tokens = request.prompt;
  seq->prompt_len = static_cast<int32_t>(request.prompt.size());
  seq->request = std::move(request);
  return admit(std::move(seq));
}

RequestId Engine::admit(std::unique_ptr<Sequence> seq) {
  seq->id = next_id_++;
  scheduler_.add(seq.get());
  const RequestId id = seq->id;
  seqs_.emplace(id, std::move(seq));
  return id;
}

std::unique_ptr<Sequence> Engine::sequence_of(const RequestSnapshot& snap) const {
  validate(snap.request);
  auto seq = std::make_unique<Sequence>();
  seq->request = snap.request;
  seq->tokens = snap.tokens;
  seq->prompt_len = snap.prompt_len;
  return seq;
}

std::vector<StepOutput> Engine::step() {
  MLA_REQUIRE(is_leader(), "step() is for the leader rank; followers call follow()");
  MLA_REQUIRE(!shut_down_, "the engine's group was shut down");
  const auto start = std::chrono::steady_clock::now();
  const Schedule schedule = schedule_step();
  if (schedule.empty()) return {};
  const StepShape shape = schedule.shape();  // before postprocess ends any sequence
  const ForwardInputs in = forward_inputs(schedule);
  if (comm_ != nullptr) send_plan(plan_for(schedule, in.batch));
  std::vector<StepOutput> outputs = postprocess(schedule, run_forward(in.batch, in.requests));
  last_step_ = {
      shape,
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count()};
  return outputs;
}

Schedule Engine::schedule_step() {
  Schedule schedule = scheduler_.schedule();
  stats_.preemptions += static_cast<int64_t>(schedule.preempted.size());
  for (Sequence* seq : schedule.preempted) {
    spdlog::debug("request {} preempted (cache full); will recompute {} tokens", seq->id,
                  seq->tokens.size());
    note_released(seq->id);
  }
  return schedule;
}

StepPlan Engine::plan_for(const Schedule& schedule, const ForwardBatch& batch) {
  StepPlan plan;  // kind step
  plan.released.swap(released_);
  plan.prefix_ops = cache_.take_prefix_ops();
  plan.tokens = batch.tokens;
  for (const ScheduledChunk& chunk : schedule.chunks) {
    plan.chunks.push_back({chunk.seq->id, chunk.start, chunk.num_tokens, chunk.samples()});
  }
  return plan;
}

std::vector<StepOutput> Engine::postprocess(const Schedule& schedule, SampledStep sampled) {
  const ModelConfig& c = model_->config();
  std::vector<StepOutput> outputs;
  int64_t row = 0;
  for (const ScheduledChunk& chunk : schedule.chunks) {
    Sequence& seq = *chunk.seq;
    scheduler_.commit(chunk);
    if (!chunk.samples()) continue;

    const int64_t i = row++;
    const int32_t token = sampled.tokens.at(i);
    seq.tokens.push_back(token);
    stats_.generated_tokens++;

    StepOutput out;
    out.id = seq.id;
    out.token = token;
    if (seq.request.return_logits) out.logits = std::move(sampled.logits.at(i));
    const auto& stops = seq.request.stop_ids;
    const bool eos =
        !seq.request.ignore_eos &&
        std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), token) != c.eos_token_ids.end();
    if (eos || std::find(stops.begin(), stops.end(), token) != stops.end()) {
      out.finish = FinishReason::kStop;
    } else if (seq.num_generated() >= seq.request.max_tokens) {
      out.finish = FinishReason::kLength;
    }
    out.finished = out.finish != FinishReason::kNone;
    if (out.finished) retire(seq, out.finish);
    outputs.push_back(std::move(out));
  }
  return outputs;
}

void Engine::note_released(RequestId id) {
  // With prefix caching the cache records every release of a sequence's table in order with
  // its other changes (PrefixOp::kDrop), which the followers make in that order; a separate
  // list would free a table again after a later reuse in the same plan rebuilt it.
  if (comm_ != nullptr && !cache_.prefix_caching()) released_.push_back(id);
}

void Engine::retire(Sequence& seq, FinishReason reason) {
  seq.finish = reason;
  seq.status = SeqStatus::kFinished;
  note_released(seq.id);
  scheduler_.remove(&seq);
  seqs_.erase(seq.id);
}

Sequence& Engine::find(RequestId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) MLA_THROW(kNotFound, "unknown request id {}", id);
  return *it->second;
}

bool Engine::cancel(RequestId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return false;
  retire(*it->second, FinishReason::kCancelled);
  return true;
}

RequestSnapshot Engine::export_request(RequestId id, int32_t from) {
  Sequence& seq = find(id);
  MLA_REQUIRE(from >= 0, "export from token {}", from);
  const int32_t end = std::max(from, seq.num_computed);
  RequestSnapshot snap{seq.request, seq.tokens, seq.prompt_len, latents_of(seq, from, end - from),
                       from};
  note_released(seq.id);
  scheduler_.remove(&seq);
  seqs_.erase(id);
  return snap;
}

Tensor Engine::copy_latents(RequestId id, int32_t from, int32_t* end, int32_t max_tokens) {
  const Sequence& seq = find(id);
  MLA_REQUIRE(from >= 0 && max_tokens >= 0, "copy of {} tokens from token {}", max_tokens, from);
  *end = std::max(from, seq.num_computed);
  if (*end - from > max_tokens) *end = from + max_tokens;
  return latents_of(seq, from, *end - from);
}

int32_t Engine::computed_tokens(RequestId id) { return find(id).num_computed; }

int64_t Engine::begin_import(int32_t num_tokens) {
  // The leader's pages decide (it stores the most of every sequence); the followers take
  // theirs as the latents arrive.
  MLA_REQUIRE(num_tokens >= 0, "import of {} tokens", num_tokens);
  Import import;
  if (!cache_.reserve(import.table, num_tokens)) {
    MLA_THROW(kResourceExhausted,
              "no room for a migrating request: {} tokens need {} pages, {} free", num_tokens,
              cache_.pages_for(num_tokens), cache_.num_available());
  }
  const int64_t handle = next_import_++;
  imports_.emplace(handle, std::move(import));
  return handle;
}

void Engine::write_import(int64_t handle, int32_t first, const Tensor& latents) {
  auto it = imports_.find(handle);
  if (it == imports_.end()) MLA_THROW(kNotFound, "unknown import {}", handle);
  Import& import = it->second;
  MLA_REQUIRE(first == import.covered, "import {} holds tokens [0, {}), got latents from {}",
              handle, import.covered, first);
  MLA_REQUIRE(latents.ndim() == 3 && latents.dim(1) <= std::numeric_limits<int32_t>::max() - first,
              "cannot import latents {}", shape_str(latents.shape()));
  const auto end = static_cast<int32_t>(first + latents.dim(1));
  if (!cache_.reserve(import.table, end)) {
    MLA_THROW(kResourceExhausted, "no room for a migrating request's {} tokens", end);
  }
  cache_.write_range(import.table, first, latents);
  import.covered = end;
  if (comm_ == nullptr || latents.dim(1) == 0) return;
  // Every rank writes its own pages (all of them in a replicated group) from the same rows.
  send_cache_op(StepPlan::Kind::kWriteImport,
                {.import = handle, .first = first, .count = end - first});
  control_->broadcast(latents.raw(), static_cast<int64_t>(latents.nbytes()), 0);
}

RequestId Engine::finish_import(int64_t handle, const RequestSnapshot& snap) {
  auto it = imports_.find(handle);
  if (it == imports_.end()) MLA_THROW(kNotFound, "unknown import {}", handle);
  auto seq = sequence_of(snap);
  const int64_t tail = snap.latents.defined() ? snap.latents.dim(1) : 0;
  const int64_t covered = std::max<int64_t>(it->second.covered, snap.latents_from + tail);
  MLA_REQUIRE(covered <= static_cast<int64_t>(snap.tokens.size()),
              "import has latents for {} tokens but the request only {} tokens", covered,
              snap.tokens.size());
  if (tail > 0) write_import(handle, snap.latents_from, snap.latents);
  Import& import = it->second;
  seq->table = std::move(import.table);
  // The last token is always run again, so the next step has a token to run.
  seq->num_computed = std::min(import.covered, static_cast<int32_t>(seq->tokens.size()) - 1);
  imports_.erase(it);
  // The followers make the import's pages the request's first: admitting it may offer them to
  // the prefix index or give them up, changes the followers then make to that request.
  if (comm_ != nullptr) {
    send_cache_op(StepPlan::Kind::kFinishImport, {.import = handle, .id = next_id_});
  }
  const bool had_pages = !seq->table.pages.empty();
  const RequestId id = admit(std::move(seq));  // its full pages become reusable here
  // Without a running slot the scheduler gave the pages up (it recomputes the request later).
  if (had_pages && seqs_.at(id)->table.pages.empty()) note_released(id);
  return id;
}

bool Engine::abort_import(int64_t handle) {
  auto it = imports_.find(handle);
  if (it == imports_.end()) return false;
  cache_.release(it->second.table);
  imports_.erase(it);
  if (comm_ != nullptr) send_cache_op(StepPlan::Kind::kAbortImport, {.import = handle});
  return true;
}

RequestId Engine::import_request(const RequestSnapshot& snap) {
  auto seq = sequence_of(snap);  // validated before any page is taken
  MLA_REQUIRE(snap.latents_from == 0,
              "import_request takes a whole snapshot; a staged one goes "
              "through begin_import and finish_import");
  const int32_t computed = snap.latents.defined() ? static_cast<int32_t>(snap.latents.dim(1)) : 0;
  MLA_REQUIRE(computed <= static_cast<int32_t>(snap.tokens.size()),
              "snapshot has latents for {} tokens but only {} tokens", computed,
              snap.tokens.size());
  // Without room for the latents the request still continues: it recomputes them.
  if (computed == 0 || cache_.pages_for(computed) > cache_.num_available()) {
    return admit(std::move(seq));
  }
  return finish_import(begin_import(computed), snap);
}

}  // namespace mla
