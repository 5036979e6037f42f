#include "runtime/deepseek_model.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>

#include "kernels/cpu/moe.h"
#include "kernels/cpu/ops.h"
#include "kernels/error.h"
#include "runtime/checkpoint.h"
#include "runtime/weight_loader.h"

namespace mla {
namespace {

constexpr float kLoraNormEps = 1e-6f;  // q_a_layernorm and kv_a_layernorm: fixed in HF

int64_t flops_of(int64_t m, int64_t n, int64_t k) { return 2 * m * n * k; }

// y[rows, out] = x[rows, in] * w^T, counting the FLOPs.
void linear(const float* x, int64_t rows, const Tensor& w, float* y, WorkCounter& counter,
            float beta = 0.0f) {
  cpu::matmul_nt(x, rows, w.dim(1), w.f32(), w.dim(0), y, beta);
  counter.weight_flops += flops_of(rows, w.dim(0), w.dim(1));
}

}  // namespace

// Per-step scratch shared by the layers: positions, rope tables, the attention form of
// every sequence in the batch, and the group's communicator.
struct DeepseekModel::StepContext {
  const ForwardBatch* batch;
  int64_t num_tokens;
  std::vector<int32_t> positions;  // [T]
  std::vector<int64_t> seq_begin;  // first row of each sequence
  std::vector<float> rope;         // [T, d_r]: cos then sin per position
  std::vector<AttnForm> forms;     // [seqs]
  bool any_full_q = false;         // a sequence runs decompressed or factored
  bool any_latent = false;         // a sequence runs factored or premerged
  bool any_premerged = false;
  WorkCounter* counter;
  Communicator* comm;  // null when the group is one rank

  void all_reduce(float* data, int64_t n) const {
    if (comm != nullptr) comm->all_reduce_sum(data, n);
  }
};

DeepseekModel::DeepseekModel(ModelConfig config, const ModelOptions& options, ShardPlan shard)
    : Model(std::move(config), options, shard),
      inv_freq_(config_.rope_inv_freq()),
      rope_factor_(config_.rope_attention_factor()),
      softmax_scale_(static_cast<float>(config_.softmax_scale())) {}

std::shared_ptr<DeepseekModel> DeepseekModel::load(const std::string& model_dir,
                                                   const ModelOptions& options) {
  ModelConfig config = ModelConfig::load(model_dir);
  const ShardPlan shard = plan_for(config, options);
  std::shared_ptr<DeepseekModel> model(new DeepseekModel(std::move(config), options, shard));
  Checkpoint ckpt = Checkpoint::open(model_dir, model->config_.fp8_block);
  ckpt.set_progress(options.show_progress);
  model->load_weights(ckpt);
  ckpt.finish_progress();
  model->log_loaded(options, "cpu fp32");
  return model;
}

void DeepseekModel::load_weights(Checkpoint& ckpt) {
  WeightLoader loader(ckpt, config_, shard_);
  weights_.embed = loader.embed();
  weights_.final_norm = loader.final_norm();
  weights_.lm_head = loader.lm_head(weights_.embed);
  // Layers past num_hidden_layers (the V3 multi-token-prediction head) are never read.
  weights_.layers.resize(config_.num_layers);
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    weights_.layers[l] = loader.layer(l);
    if (forms_.needs_premerged()) {
      build_premerged(config_, shard_.local_heads(), weights_.layers[l].attn);
    }
  }
}

Tensor DeepseekModel::forward(const ForwardBatch& batch, LatentCache& cache, WorkCounter* counter,
                              Communicator* comm) const {
  const ModelConfig& c = config_;
  const int64_t T = static_cast<int64_t>(batch.tokens.size());
  const int64_t D = c.hidden_size, dr = c.qk_rope_head_dim;
  WorkCounter local;
  StepContext ctx{&batch,
                  T,
                  {},
                  {},
                  {},
                  {},
                  false,
                  false,
                  false,
                  counter ? counter : &local,
                  shard_.tp_size() > 1 ? comm : nullptr};

  // Check shapes and layout
  MLA_CHECK(shard_.tp_size() == 1 || comm != nullptr, "a tensor-parallel model needs its group");
  MLA_CHECK(
      comm == nullptr || (comm->size() == shard_.tp_size() && comm->rank() == shard_.tp_rank()),
      "communicator rank {}/{} does not match the shard plan {}/{}", comm->rank(), comm->size(),
      shard_.tp_rank(), shard_.tp_size());
  MLA_CHECK(
      cache.shard().tp_size() == shard_.tp_size() && cache.shard().tp_rank() == shard_.tp_rank(),
      "cache shard does not match the model's plan");
  int64_t rows = 0, num_logits = 0;
  for (const ForwardSeq& s : batch.seqs) {
    MLA_CHECK(s.table != nullptr && s.num_tokens > 0, "empty sequence in batch");
    MLA_CHECK(s.start + s.num_tokens <= s.table->num_tokens,
              "sequence pages hold {} tokens, step needs {}", s.table->num_tokens,
              s.start + s.num_tokens);
    ctx.seq_begin.push_back(rows);
    for (int32_t i = 0; i < s.num_tokens; ++i) ctx.positions.push_back(s.start + i);
    rows += s.num_tokens;
    num_logits += s.want_logits ? 1 : 0;
    const AttnForm form = forms_.choose(s.num_tokens, s.start + s.num_tokens);
    ctx.forms.push_back(form);
    ctx.counter->form_chunks[static_cast<int>(form)]++;
    ctx.any_full_q |= form != AttnForm::kLatentPremerged;
    ctx.any_latent |= form != AttnForm::kDecompressed;
    ctx.any_premerged |= form == AttnForm::kLatentPremerged;
  }
  MLA_CHECK(rows == T, "batch has {} tokens but its sequences cover {}", T, rows);
  for (int32_t tok : batch.tokens) {
    MLA_CHECK(tok >= 0 && tok < c.vocab_size, "token id {} outside vocabulary", tok);
  }
  const CommStats comm_before = ctx.comm ? ctx.comm->stats() : CommStats{};

  ctx.rope.resize(T * dr);
  for (int64_t t = 0; t < T; ++t) {
    cpu::rope_table(ctx.positions[t], inv_freq_.data(), dr, rope_factor_, &ctx.rope[t * dr]);
  }

  std::vector<float> x(T * D), xn(T * D), delta(T * D);
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(&x[t * D], weights_.embed.f32() + batch.tokens[t] * D, D * sizeof(float));
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = weights_.layers[l];
    const float eps = static_cast<float>(c.rms_norm_eps);
    cpu::rms_norm(x.data(), T, D, D, lw.input_norm.f32(), eps, xn.data(), D);
    attention(lw, l, xn.data(), ctx, cache, delta.data());
    ctx.all_reduce(delta.data(), T * D);
    cpu::add_inplace(x.data(), delta.data(), T * D);
    cpu::rms_norm(x.data(), T, D, D, lw.post_attn_norm.f32(), eps, xn.data(), D);
    if (lw.is_moe) {
      moe(lw.moe, xn.data(), T, delta.data(), *ctx.counter);
    } else {
      mlp(lw.mlp, xn.data(), T, delta.data(), *ctx.counter);
    }
    ctx.all_reduce(delta.data(), T * D);
    cpu::add_inplace(x.data(), delta.data(), T * D);
  }
  if (ctx.comm != nullptr) {
    ctx.counter->comm += ctx.comm->stats() - comm_before;
  }

  // Only the rows whose logits are wanted go through the final norm and the head.
  Tensor logits = Tensor::empty({num_logits, c.vocab_size});
  std::vector<float> last(num_logits * D);
  int64_t k = 0;
  for (size_t s = 0; s < batch.seqs.size(); ++s) {
    if (!batch.seqs[s].want_logits) continue;
    const int64_t row = ctx.seq_begin[s] + batch.seqs[s].num_tokens - 1;
    cpu::rms_norm(&x[row * D], 1, D, D, weights_.final_norm.f32(),
                  static_cast<float>(c.rms_norm_eps), &last[k * D], D);
    ++k;
  }
  linear(last.data(), num_logits, weights_.lm_head, logits.f32(), *ctx.counter);
  return logits;
}

void DeepseekModel::attention(const LayerWeights& lw, int64_t layer, const float* xn,
                              StepContext& ctx, LatentCache& cache, float* out) const {
  const ModelConfig& c = config_;
  const AttentionWeights& w = lw.attn;
  const int64_t T = ctx.num_tokens, D = c.hidden_size, H = shard_.local_heads(),
                dc = c.kv_lora_rank, dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim,
                dv = c.v_head_dim, dqk = c.qk_head_dim(), qin = c.q_in_dim(),
                width = c.latent_width(), B = cache.geometry().block_size;
  WorkCounter& counter = *ctx.counter;

  // Query input: x_n, or the normalised q LoRA down-projection (replicated).
  std::vector<float> q_lora;
  const float* q_in = xn;
  if (c.q_lora_rank > 0) {
    q_lora.resize(T * qin);
    linear(xn, T, w.q_a, q_lora.data(), counter);
    cpu::rms_norm(q_lora.data(), T, qin, qin, w.q_a_norm.f32(), kLoraNormEps, q_lora.data(), qin);
    q_in = q_lora.data();
  }

  // Latent of every new token: c = RMSNorm(kv[:d_c]), k_r = RoPE(kv[d_c:]); the rank that
  // stores the token's page writes it into the cache.
  std::vector<float> kv(T * width);
  linear(xn, T, w.kv_a, kv.data(), counter);
  for (int64_t t = 0; t < T; ++t) {
    float* row = &kv[t * width];
    cpu::rms_norm(row, 1, dc, dc, w.kv_a_norm.f32(), kLoraNormEps, row, dc);
    cpu::rope_rotate(row + dc, dr, &ctx.rope[t * dr], c.rope_interleave);
  }
  const auto& seqs = ctx.batch->seqs;
  for (size_t s = 0; s < seqs.size(); ++s) {
    for (int32_t i = 0; i < seqs[s].num_tokens; ++i) {
      const int32_t pos = seqs[s].start + i;
      if (!cache.shard().owns_page(pos / B)) continue;
      std::memcpy(cache.row(*seqs[s].table, layer, pos), &kv[(ctx.seq_begin[s] + i) * width],
                  width * sizeof(float));
    }
  }

  // Local heads' queries. q: [T, H, d_n + d_r] for the decompressed and factored forms;
  // the latent forms gather into q_lat: [T, H, d_c + d_r] (absorbed query, rotary part).
  std::vector<float> q, q_pm;
  if (ctx.any_full_q) {
    q.resize(T * H * dqk);
    linear(q_in, T, w.q_b, q.data(), counter);
  }
  if (ctx.any_premerged) {
    q_pm.resize(T * H * (dc + dr));
    std::vector<float> q_abs(T * H * dc), q_rot(T * H * dr);
    linear(q_in, T, w.q_absorbed, q_abs.data(), counter);
    linear(q_in, T, w.q_rope, q_rot.data(), counter);
    for (int64_t t = 0; t < T * H; ++t) {
      std::memcpy(&q_pm[t * (dc + dr)], &q_abs[t * dc], dc * sizeof(float));
      std::memcpy(&q_pm[t * (dc + dr) + dc], &q_rot[t * dr], dr * sizeof(float));
    }
  }
  std::vector<float> q_lat(ctx.any_latent ? T * H * (dc + dr) : 0, 0.0f);
  for (size_t s = 0; s < seqs.size(); ++s) {
    const AttnForm form = ctx.forms[s];
    const int64_t r0 = ctx.seq_begin[s], n = seqs[s].num_tokens;
    if (form == AttnForm::kLatentPremerged) {
      std::copy_n(&q_pm[r0 * H * (dc + dr)], n * H * (dc + dr), &q_lat[r0 * H * (dc + dr)]);
    } else if (form == AttnForm::kLatentFactored) {
      // q~_h = W_UK[h]^T q_n,h  ->  [n, d_c] per head; the rotary part is copied.
      for (int64_t h = 0; h < H; ++h) {
        const float* w_uk = w.kv_b.f32() + h * (dn + dv) * dc;  // [d_n, d_c]
        cpu::gemm(false, n, dc, dn, &q[(r0 * H + h) * dqk], H * dqk, w_uk, dc,
                  &q_lat[(r0 * H + h) * (dc + dr)], H * (dc + dr));
        for (int64_t i = 0; i < n; ++i) {
          std::memcpy(&q_lat[((r0 + i) * H + h) * (dc + dr) + dc],
                      &q[((r0 + i) * H + h) * dqk + dn], dr * sizeof(float));
        }
      }
      counter.weight_flops += flops_of(n * H, dc, dn);
    }
  }
  // Rotate the rotary part of every query (in q for the decompressed form, q_lat otherwise).
  for (size_t s = 0; s < seqs.size(); ++s) {
    const bool latent = ctx.forms[s] != AttnForm::kDecompressed;
    for (int64_t i = 0; i < seqs[s].num_tokens; ++i) {
      const int64_t t = ctx.seq_begin[s] + i;
      for (int64_t h = 0; h < H; ++h) {
        float* rot = latent ? &q_lat[(t * H + h) * (dc + dr) + dc] : &q[(t * H + h) * dqk + dn];
        cpu::rope_rotate(rot, dr, &ctx.rope[t * dr], c.rope_interleave);
      }
    }
  }

  // Attention. o_v: [T, H * d_v] (then W_o); o_lat: [T, H * d_c] (then W_UV or W_O').
  std::vector<float> o_v(ctx.any_full_q ? T * H * dv : 0, 0.0f);
  std::vector<float> o_lat(ctx.any_latent ? T * H * dc : 0, 0.0f);
  if (ctx.any_latent) latent_attention(layer, ctx, cache, q_lat, o_lat);
  std::vector<int32_t> num_keys;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const ForwardSeq& seq = seqs[s];
    const int64_t r0 = ctx.seq_begin[s], n = seq.num_tokens, L = seq.start + seq.num_tokens;
    if (ctx.forms[s] == AttnForm::kLatentFactored) {
      // o_h = W_UV[h] o~_h  ->  [n, d_v] per head.
      for (int64_t h = 0; h < H; ++h) {
        const float* w_uv = w.kv_b.f32() + h * (dn + dv) * dc + dn * dc;  // [d_v, d_c]
        cpu::gemm(true, n, dv, dc, &o_lat[(r0 * H + h) * dc], H * dc, w_uv, dc,
                  &o_v[(r0 * H + h) * dv], H * dv);
      }
      counter.weight_flops += flops_of(n * H, dv, dc);
      if (ctx.any_premerged) std::fill_n(&o_lat[r0 * H * dc], n * H * dc, 0.0f);
      continue;
    }
    if (ctx.forms[s] != AttnForm::kDecompressed) continue;

    // Decompressed form: up-project every cached latent of the sequence, the cost
    // absorption removes. Under a sharded cache the context is gathered first.
    const std::vector<float> context = gather_context(layer, seq, ctx, cache);  // [L, width]
    std::vector<float> lat_c(L * dc), k_up(L * H * (dn + dv));
    std::vector<float> keys(L * H * dqk), values(L * H * dv), q_full(n * H * dqk);
    for (int64_t j = 0; j < L; ++j) {
      std::memcpy(&lat_c[j * dc], &context[j * width], dc * sizeof(float));
    }
    cpu::matmul_nt(lat_c.data(), L, dc, w.kv_b.f32(), H * (dn + dv), k_up.data());
    counter.cache_upproj_flops += flops_of(L, H * (dn + dv), dc);
    for (int64_t j = 0; j < L; ++j) {
      for (int64_t h = 0; h < H; ++h) {
        const float* src = &k_up[(j * H + h) * (dn + dv)];
        float* k = &keys[(j * H + h) * dqk];
        std::memcpy(k, src, dn * sizeof(float));
        std::memcpy(k + dn, &context[j * width + dc], dr * sizeof(float));
        std::memcpy(&values[(j * H + h) * dv], src + dn, dv * sizeof(float));
      }
    }
    num_keys.resize(n);
    for (int64_t i = 0; i < n; ++i) num_keys[i] = static_cast<int32_t>(seq.start + i + 1);
    const int64_t pairs = std::accumulate(num_keys.begin(), num_keys.end(), int64_t{0});
    cpu::dense_attention({&q[r0 * H * dqk], keys.data(), values.data(), num_keys.data(), n, L, H,
                          dqk, dv, softmax_scale_, &o_v[r0 * H * dv]});
    counter.attention_flops += 2 * pairs * H * (dqk + dv);
  }

  // Rows of one form hold zeros in the other form's buffer, so the two products add up.
  // Under TP these are this rank's partial sums; the caller all-reduces them.
  std::fill_n(out, T * D, 0.0f);
  if (ctx.any_full_q) linear(o_v.data(), T, w.o, out, counter);
  if (ctx.any_premerged) linear(o_lat.data(), T, w.o_absorbed, out, counter, 1.0f);
}

void DeepseekModel::latent_attention(int64_t layer, StepContext& ctx, const LatentCache& cache,
                                     const std::vector<float>& q_local,
                                     std::vector<float>& o_lat) const {
  const ModelConfig& c = config_;
  const int64_t T = ctx.num_tokens, Hl = shard_.local_heads(), P = shard_.tp_size(),
                dc = c.kv_lora_rank, dr = c.qk_rope_head_dim, dq = dc + dr;
  const auto& seqs = ctx.batch->seqs;
  // A sharded cache: every rank attends all heads against its own pages and the partial
  // results are merged by LSE on the rank that owns each head. Otherwise: local heads only.
  const bool sharded = P > 1 && !cache.holds_every_page();
  const int64_t Ha = sharded ? Hl * P : Hl;  // heads this rank attends

  // q_all: [T, Ha, d_c + d_r]; under sharding the all-gather returns [P, T, Hl, ..].
  std::vector<float> q_all;
  if (sharded) {
    std::vector<float> gathered(P * T * Hl * dq);
    ctx.comm->all_gather(q_local.data(), T * Hl * dq, gathered.data());
    q_all.resize(T * Ha * dq);
    for (int64_t r = 0; r < P; ++r)
      for (int64_t t = 0; t < T; ++t)
        std::memcpy(&q_all[(t * Ha + r * Hl) * dq], &gathered[((r * T) + t) * Hl * dq],
                    Hl * dq * sizeof(float));
  }
  const std::vector<float>& qa = sharded ? q_all : q_local;
  std::vector<float> q_lat(T * Ha * dc), q_rope(T * Ha * dr);
  for (int64_t i = 0; i < T * Ha; ++i) {
    std::memcpy(&q_lat[i * dc], &qa[i * dq], dc * sizeof(float));
    std::memcpy(&q_rope[i * dr], &qa[i * dq + dc], dr * sizeof(float));
  }

  std::vector<float> part(T * Ha * dc, 0.0f), lse(T * Ha, -INFINITY);
  std::vector<int32_t> num_keys;
  std::vector<const float*> pages;
  for (size_t s = 0; s < seqs.size(); ++s) {
    if (ctx.forms[s] == AttnForm::kDecompressed) continue;
    const ForwardSeq& seq = seqs[s];
    const int64_t r0 = ctx.seq_begin[s], n = seq.num_tokens;
    num_keys.resize(n);
    for (int64_t i = 0; i < n; ++i)
      num_keys[i] = cache.local_keys(seq.start + static_cast<int32_t>(i));
    const int64_t pairs = std::accumulate(num_keys.begin(), num_keys.end(), int64_t{0});
    pages.clear();
    for (int32_t page : seq.table->pages) pages.push_back(cache.page_block(page, layer));
    cpu::latent_attention({&q_lat[r0 * Ha * dc], &q_rope[r0 * Ha * dr], pages.data(),
                           num_keys.data(), n, Ha, dc, dr, cache.geometry().block_size,
                           softmax_scale_, &part[r0 * Ha * dc], &lse[r0 * Ha]});
    ctx.counter->attention_flops += 2 * pairs * Ha * (dc + dr + dc);
  }
  if (!sharded) {
    o_lat = std::move(part);
    return;
  }

  // all-to-all: block r carries rank r's heads [T, Hl, d_c + 1] (output, then LSE).
  const int64_t blk = T * Hl * (dc + 1);
  std::vector<float> send(P * blk), recv(P * blk);
  for (int64_t r = 0; r < P; ++r)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < Hl; ++h) {
        float* dst = &send[r * blk + (t * Hl + h) * (dc + 1)];
        const int64_t src = t * Ha + r * Hl + h;
        std::memcpy(dst, &part[src * dc], dc * sizeof(float));
        dst[dc] = lse[src];
      }
  ctx.comm->all_to_all(send.data(), blk, recv.data());
  // Merge: o = sum_r exp(lse_r - LSE) o_r with LSE = log sum_r exp(lse_r). A rank without
  // visible keys sent lse = -inf and weighs nothing; every token sees at least itself.
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < Hl; ++h) {
      float mx = -INFINITY;
      for (int64_t r = 0; r < P; ++r)
        mx = std::max(mx, recv[r * blk + (t * Hl + h) * (dc + 1) + dc]);
      float* o = &o_lat[(t * Hl + h) * dc];
      std::fill_n(o, dc, 0.0f);
      if (mx == -INFINITY) continue;  // a row of a decompressed-form sequence
      float denom = 0.0f;
      for (int64_t r = 0; r < P; ++r) {
        const float* in = &recv[r * blk + (t * Hl + h) * (dc + 1)];
        const float weight = std::exp(in[dc] - mx);
        if (weight == 0.0f) continue;
        denom += weight;
        for (int64_t i = 0; i < dc; ++i) o[i] += weight * in[i];
      }
      for (int64_t i = 0; i < dc; ++i) o[i] /= denom;
    }
}

std::vector<float> DeepseekModel::gather_context(int64_t layer, const ForwardSeq& seq,
                                                 StepContext& ctx, const LatentCache& cache) const {
  const int64_t width = config_.latent_width(), L = seq.start + seq.num_tokens;
  std::vector<float> context(L * width);
  if (cache.holds_every_page()) {
    for (int64_t j = 0; j < L; ++j) {
      std::memcpy(&context[j * width], cache.row(*seq.table, layer, static_cast<int32_t>(j)),
                  width * sizeof(float));
    }
    return context;
  }
  // Every rank contributes its pages' rows, padded to the largest share; the all-gather
  // returns [P, cap, width] and rank r's k-th local key is at sequence page r + k * P.
  const int64_t P = shard_.tp_size(), B = cache.geometry().block_size;
  const int64_t pages = (L + B - 1) / B, cap = (pages + P - 1) / P * B;
  std::vector<float> mine(cap * width, 0.0f), all(P * cap * width);
  const int64_t local = cache.local_keys(static_cast<int32_t>(L - 1));
  for (int64_t i = 0; i < local; ++i) {
    const int64_t pos = (shard_.tp_rank() + (i / B) * P) * B + i % B;
    std::memcpy(&mine[i * width], cache.row(*seq.table, layer, static_cast<int32_t>(pos)),
                width * sizeof(float));
  }
  ctx.comm->all_gather(mine.data(), cap * width, all.data());
  for (int64_t r = 0; r < P; ++r)
    for (int64_t i = 0; i < cap; ++i) {
      const int64_t pos = (r + (i / B) * P) * B + i % B;
      if (pos < L)
        std::memcpy(&context[pos * width], &all[(r * cap + i) * width], width * sizeof(float));
    }
  return context;
}

void DeepseekModel::mlp(const MlpWeights& w, const float* x, int64_t rows, float* out,
                        WorkCounter& counter) const {
  std::vector<float> gate_up(rows * 2 * w.width), act(rows * w.width);
  linear(x, rows, w.gate_up, gate_up.data(), counter);
  cpu::silu_mul(gate_up.data(), rows, w.width, act.data());
  linear(act.data(), rows, w.down, out, counter);
}

void DeepseekModel::moe(const MoeWeights& w, const float* x, int64_t rows, float* out,
                        WorkCounter& counter) const {
  const ModelConfig& c = config_;
  const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, D = c.hidden_size;
  std::vector<float> logits(rows * E);
  linear(x, rows, w.gate, logits.data(), counter);

  // Route every token (cpu::moe_route), then group tokens by expert.
  std::vector<int32_t> ids(rows * K);
  std::vector<float> weights(rows * K);
  cpu::MoeRouteParams route{
      logits.data(), w.correction_bias.defined() ? w.correction_bias.f32() : nullptr, rows, E,
      c.n_group, c.topk_group, K, moe_gate_kind(c.gate),
      // transformers' DeepseekV2 never renormalises (norm_topk_prob is
      // false in every V2 checkpoint anyway); V3 does when asked.
      c.norm_topk_prob && c.family == ModelFamily::kDeepseekV3,
      static_cast<float>(c.routed_scaling_factor), ids.data(), weights.data()};
  cpu::moe_route(route);
  std::vector<std::vector<std::pair<int64_t, float>>> by_expert(E);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t k = 0; k < K; ++k) by_expert[ids[t * K + k]].push_back({t, weights[t * K + k]});
  }

  // Shared experts on every token, then each routed expert once on the tokens routed to it.
  if (c.n_shared_experts > 0) {
    mlp(w.shared, x, rows, out, counter);
  } else {
    std::fill_n(out, rows * D, 0.0f);
  }
  // Under TP each rank runs its own experts; the caller's all-reduce adds the parts.
  std::vector<float> xs, ys;
  for (int64_t e = w.first_expert; e < w.first_expert + static_cast<int64_t>(w.experts.size());
       ++e) {
    const auto& routed = by_expert[e];
    if (routed.empty()) continue;
    const int64_t m = static_cast<int64_t>(routed.size());
    xs.resize(m * D);
    ys.resize(m * D);
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(&xs[i * D], x + routed[i].first * D, D * sizeof(float));
    }
    mlp(w.experts[e - w.first_expert], xs.data(), m, ys.data(), counter);
    for (int64_t i = 0; i < m; ++i) {
      float* dst = out + routed[i].first * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += routed[i].second * ys[i * D + d];
    }
  }
}

}  // namespace mla
