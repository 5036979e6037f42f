#include "runtime/engine.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "kernels/error.h"

namespace mla {

Engine::Engine(std::shared_ptr<const DeepseekModel> model, EngineOptions options)
    : model_(std::move(model)),
      options_(options),
      cache_(model_->cache_geometry(options.block_size), options.num_pages),
      scheduler_(options.scheduler, cache_) {}

void Engine::validate(const Request& r) const {
  const ModelConfig& c = model_->config();
  MLA_REQUIRE(!r.prompt.empty(), "the prompt is empty");
  for (size_t i = 0; i < r.prompt.size(); ++i) {
    MLA_REQUIRE(r.prompt[i] >= 0 && r.prompt[i] < c.vocab_size,
                "prompt token {} at index {} is outside the vocabulary [0, {})", r.prompt[i], i,
                c.vocab_size);
  }
  MLA_REQUIRE(r.max_tokens >= 1, "max_tokens must be >= 1, got {}", r.max_tokens);
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_tokens;
  MLA_REQUIRE(total <= c.max_position_embeddings,
              "prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {}",
              r.prompt.size(), r.max_tokens, c.max_position_embeddings);
  r.sampling.validate(c.vocab_size);
  // The last sampled token ends the request without running through the model.
  const auto cached = static_cast<int32_t>(total - 1);
  if (cache_.pages_for(cached) > cache_.pool().num_pages()) {
    MLA_THROW(kResourceExhausted,
              "request needs {} cache pages for {} tokens but the cache has only {}",
              cache_.pages_for(cached), cached, cache_.pool().num_pages());
  }
}

RequestId Engine::add_request(Request request) {
  validate(request);
  auto seq = std::make_unique<Sequence>();
  seq->id = next_id_++;
  seq->tokens = request.prompt;
  seq->prompt_len = static_cast<int32_t>(request.prompt.size());
  seq->request = std::move(request);
  scheduler_.add(seq.get());
  const RequestId id = seq->id;
  seqs_.emplace(id, std::move(seq));
  return id;
}

std::vector<StepOutput> Engine::step() {
  Schedule plan = scheduler_.schedule();
  stats_.preemptions += static_cast<int64_t>(plan.preempted.size());
  for (Sequence* seq : plan.preempted) {
    spdlog::debug("request {} preempted (cache full); will recompute {} tokens", seq->id,
                  seq->tokens.size());
  }
  if (plan.empty()) return {};

  ForwardBatch batch;
  for (const ScheduledChunk& chunk : plan.chunks) {
    const auto& toks = chunk.seq->tokens;
    batch.tokens.insert(batch.tokens.end(), toks.begin() + chunk.start,
                        toks.begin() + chunk.start + chunk.num_tokens);
    batch.seqs.push_back({&chunk.seq->table, chunk.start, chunk.num_tokens, chunk.samples()});
  }
  WorkCounter work;
  Tensor logits = model_->forward(batch, cache_, &work);
  stats_.steps++;
  stats_.computed_tokens += plan.num_tokens;
  stats_.work.weight_flops += work.weight_flops;
  stats_.work.cache_upproj_flops += work.cache_upproj_flops;
  stats_.work.attention_flops += work.attention_flops;
  for (int f = 0; f < kNumAttnForms; ++f) stats_.work.form_chunks[f] += work.form_chunks[f];
  spdlog::debug("step {}: {} sequences, {} tokens, forms: decompressed {} factored {} premerged {}",
                stats_.steps, plan.chunks.size(), plan.num_tokens, work.form_chunks[0],
                work.form_chunks[1], work.form_chunks[2]);
  return postprocess(plan, logits);
}

std::vector<StepOutput> Engine::postprocess(const Schedule& plan, const Tensor& logits) {
  const ModelConfig& c = model_->config();
  std::vector<StepOutput> outputs;
  int64_t row = 0;
  for (const ScheduledChunk& chunk : plan.chunks) {
    Sequence& seq = *chunk.seq;
    Scheduler::commit(chunk);
    if (!chunk.samples()) continue;

    const float* lg = logits.f32() + row++ * c.vocab_size;
    const int64_t position = static_cast<int64_t>(seq.tokens.size());
    const int32_t token = sample_token(lg, c.vocab_size, seq.request.sampling, position);
    seq.tokens.push_back(token);
    stats_.generated_tokens++;

    StepOutput out{seq.id, token};
    if (seq.request.return_logits) out.logits.assign(lg, lg + c.vocab_size);
    const auto& stops = seq.request.stop_ids;
    const bool eos = !seq.request.ignore_eos &&
                     std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), token) !=
                         c.eos_token_ids.end();
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

void Engine::retire(Sequence& seq, FinishReason reason) {
  seq.finish = reason;
  seq.status = SeqStatus::kFinished;
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

RequestSnapshot Engine::export_request(RequestId id) {
  Sequence& seq = find(id);
  RequestSnapshot snap{seq.request, seq.tokens, seq.prompt_len,
                       cache_.export_tokens(seq.table, seq.num_computed)};
  scheduler_.remove(&seq);
  seqs_.erase(id);
  return snap;
}

RequestId Engine::import_request(const RequestSnapshot& snap) {
  validate(snap.request);
  const int32_t computed = static_cast<int32_t>(snap.latents.dim(1));
  MLA_REQUIRE(computed <= static_cast<int32_t>(snap.tokens.size()),
              "snapshot has latents for {} tokens but only {} tokens", computed,
              snap.tokens.size());
  auto seq = std::make_unique<Sequence>();
  seq->id = next_id_++;
  seq->request = snap.request;
  seq->tokens = snap.tokens;
  seq->prompt_len = snap.prompt_len;
  // Without room for the latents the request still continues: it recomputes them. The last
  // token is always recomputed, so the next step has a token to run.
  if (computed > 0 && cache_.import_tokens(seq->table, snap.latents)) {
    seq->num_computed = std::min(computed, static_cast<int32_t>(seq->tokens.size()) - 1);
  }
  scheduler_.add(seq.get());
  const RequestId id = seq->id;
  seqs_.emplace(id, std::move(seq));
  return id;
}

}  // namespace mla
