#include "runtime/deepseek_model.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>

#include "kernels/cpu/fp8_gemm.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/ops.h"
#include "kernels/error.h"
#include "parallel/sharded_attention.h"
#include "runtime/checkpoint.h"
#include "runtime/model_runner.h"
#include "runtime/tensor_dump.h"
#include "runtime/weight_loader.h"

namespace mla {
namespace {

int64_t flops_of(int64_t m, int64_t n, int64_t k) { return 2 * m * n * k; }

// The sharded-attention exchange on host buffers; the communicator blocks, so collectives
// need no ordering.
class HostExchange final : public ShardedAttentionBackend {
 public:
  void copy_rows(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch,
                 int64_t row_bytes, int64_t rows) override {
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(static_cast<char*>(dst) + r * dst_pitch,
                  static_cast<const char*>(src) + r * src_pitch, row_bytes);
    }
  }
  void collective(Communicator&, const std::function<void()>& call) override { call(); }
};

}  // namespace

// Per-step state shared by the layers: the batch's layout and forms, positions, rope tables,
// and the group's communicator.
struct DeepseekModel::StepContext {
  const ForwardBatch* batch;
  BatchLayout layout;
  std::vector<int32_t> positions;  // [T]
  std::vector<float> rope;         // [T, d_r]: cos then sin per position
  WorkCounter* counter;
  Communicator* comm;  // null when the group is one rank
  TensorDump* dump;    // null unless named intermediates are wanted

  int64_t num_tokens() const { return layout.num_tokens; }
  bool dumps(const char* name, int64_t layer) const {
    return dump != nullptr && dump->wants(name, layer);
  }
  // Dumps rows x cols floats, taken `cols` at a time every `stride` floats from `data`.
  void dump_rows(const char* name, int64_t layer, const float* data, int64_t rows, int64_t cols,
                 int64_t stride, std::vector<int64_t> shape) const {
    if (!dumps(name, layer)) return;
    std::vector<float> packed(rows * cols);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(data + r * stride, cols, &packed[r * cols]);
    }
    dump->add(name, layer, packed.data(), shape);
  }
  void all_reduce(float* data, int64_t n) const {
    if (comm != nullptr) comm->all_reduce_sum(data, n);
  }
};

// The CPU model's runner: the model is immutable and keeps no per-step state, so running is
// the model's const forward pass on the bound cache and group.
class DeepseekRunner final : public ModelRunner {
 public:
  DeepseekRunner(const DeepseekModel& model, LatentCache& cache, Communicator* comm)
      : ModelRunner(model, cache, comm), model_(model) {}
  Tensor forward(const ForwardBatch& batch, WorkCounter* counter) override {
    return model_.forward(batch, cache_, counter, comm_, dump_);
  }

 private:
  const DeepseekModel& model_;
};

DeepseekModel::DeepseekModel(ModelConfig config, const ModelOptions& options, ShardPlan shard)
    : Model(std::move(config), options, shard),
      batch_invariant_(options.deterministic),
      cache_storage_(options.cache_dtype == CacheDType::kFp8 ? CacheStorage::kHostFp8
                                                             : CacheStorage::kHostF32),
      inv_freq_(config_.rope_inv_freq()),
      rope_factor_(config_.rope_attention_factor()),
      softmax_scale_(static_cast<float>(config_.softmax_scale())) {}

std::shared_ptr<DeepseekModel> DeepseekModel::load(const std::string& model_dir,
                                                   const ModelOptions& options) {
  ModelConfig config = ModelConfig::load(model_dir);
  check_fp8_weights(model_dir, config, options);
  const ShardPlan shard = plan_for(config, options);
  std::shared_ptr<DeepseekModel> model(new DeepseekModel(std::move(config), options, shard));
  Checkpoint ckpt = Checkpoint::open(model_dir, model->config_.fp8_block);
  ckpt.set_progress(options.show_progress);
  const std::string kept = model->load_weights(ckpt);
  ckpt.finish_progress();
  const std::string backend =
      fmt::format("cpu fp32, {:.1f} MB of weights held{}", model->weights_.nbytes() / 1e6,
                  kept.empty() ? "" : ", " + kept);
  model->log_loaded(options, backend.c_str());
  return model;
}

std::string DeepseekModel::load_weights(Checkpoint& ckpt) {
  const bool keep = fp8_weights() == Fp8Weights::kKeep;
  WeightLoader loader(ckpt, config_, shard_, keep);
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
  if (!keep) return "";
  return fmt::format("{} fp8 weights kept as fp8{}", loader.kept_fp8(),
                     loader.widened_fp8() > 0
                         ? fmt::format(" ({} widened: their shard starts inside a scale block)",
                                       loader.widened_fp8())
                         : "");
}

std::unique_ptr<ModelRunner> DeepseekModel::make_runner(LatentCache& cache,
                                                        Communicator* comm) const {
  return std::make_unique<DeepseekRunner>(*this, cache, comm);
}

// The runner checked the cache and the group against the model when it was made.
Tensor DeepseekModel::forward(const ForwardBatch& batch, LatentCache& cache, WorkCounter* counter,
                              Communicator* comm, TensorDump* dump) const {
  const ModelConfig& c = config_;
  const int64_t T = static_cast<int64_t>(batch.tokens.size());
  const int64_t D = c.hidden_size, d_r = c.qk_rope_head_dim;
  WorkCounter local;
  WorkCounter& work = counter != nullptr ? *counter : local;
  StepContext ctx{&batch, BatchLayout::of(batch, c, forms_, work), {}, {}, &work, comm, dump};
  for (const ForwardSeq& s : batch.seqs) {
    for (int32_t i = 0; i < s.num_tokens; ++i) ctx.positions.push_back(s.start + i);
  }
  const CommStats comm_before = ctx.comm ? ctx.comm->stats() : CommStats{};

  ctx.rope.resize(T * d_r);
  for (int64_t t = 0; t < T; ++t) {
    cpu::rope_table(ctx.positions[t], inv_freq_.data(), d_r, rope_factor_, &ctx.rope[t * d_r]);
  }

  std::vector<float> x(T * D), xn(T * D), delta(T * D);
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(&x[t * D], weights_.embed.f32() + batch.tokens[t] * D, D * sizeof(float));
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = weights_.layers[l];
    const float eps = static_cast<float>(c.rms_norm_eps);
    cpu::rms_norm(x.data(), T, D, D, lw.input_norm.f32(), eps, xn.data(), D);
    ctx.dump_rows("attn_norm", l, xn.data(), T, D, D, {T, D});
    attention(lw, l, xn.data(), ctx, cache, delta.data());
    ctx.all_reduce(delta.data(), T * D);
    ctx.dump_rows("attn_out", l, delta.data(), T, D, D, {T, D});
    cpu::add_inplace(x.data(), delta.data(), T * D);
    cpu::rms_norm(x.data(), T, D, D, lw.post_attn_norm.f32(), eps, xn.data(), D);
    ctx.dump_rows("ffn_norm", l, xn.data(), T, D, D, {T, D});
    if (lw.is_moe) {
      moe(lw.moe, xn.data(), T, delta.data(), *ctx.counter);
    } else {
      mlp(lw.mlp, xn.data(), T, delta.data(), *ctx.counter);
    }
    ctx.all_reduce(delta.data(), T * D);
    ctx.dump_rows("ffn_out", l, delta.data(), T, D, D, {T, D});
    cpu::add_inplace(x.data(), delta.data(), T * D);
    ctx.dump_rows("layer_out", l, x.data(), T, D, D, {T, D});
  }
  if (ctx.dumps("final_norm", -1) || ctx.dumps("logits", -1)) {
    // Every row, as transformers computes them (a step otherwise only does the sampled rows).
    std::vector<float> normed(T * D), all_logits(T * c.vocab_size);
    cpu::rms_norm(x.data(), T, D, D, weights_.final_norm.f32(), static_cast<float>(c.rms_norm_eps),
                  normed.data(), D);
    ctx.dump_rows("final_norm", -1, normed.data(), T, D, D, {T, D});
    if (ctx.dumps("logits", -1)) {
      cpu::matmul_nt(normed.data(), T, D, weights_.lm_head.f32(), c.vocab_size, all_logits.data());
      dump->add("logits", -1, all_logits.data(), {T, c.vocab_size});
    }
  }
  if (ctx.comm != nullptr) {
    ctx.counter->comm += ctx.comm->stats() - comm_before;
  }

  // Only the rows whose logits are wanted go through the final norm and the head.
  const int64_t num_logits = ctx.layout.num_logits;
  Tensor logits = Tensor::empty({num_logits, c.vocab_size});
  std::vector<float> last(num_logits * D);
  int64_t k = 0;
  for (size_t s = 0; s < batch.seqs.size(); ++s) {
    if (!batch.seqs[s].want_logits) continue;
    const int64_t row = ctx.layout.seq_begin[s] + batch.seqs[s].num_tokens - 1;
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
  const BatchLayout& batch = ctx.layout;
  const int64_t T = ctx.num_tokens(), D = c.hidden_size, H_l = shard_.local_heads(),
                d_c = c.kv_lora_rank, d_r = c.qk_rope_head_dim, d_n = c.qk_nope_head_dim,
                d_v = c.v_head_dim, d_qk = c.qk_head_dim(), q_in_dim = c.q_in_dim(),
                d_lat = c.latent_width(), B = cache.geometry().block_size;
  const bool premerged = forms_.needs_premerged();
  WorkCounter& counter = *ctx.counter;

  // Query input: x_n, or the normalised q LoRA down-projection (replicated).
  std::vector<float> q_lora;
  const float* q_in = xn;
  if (c.q_lora_rank > 0) {
    q_lora.resize(T * q_in_dim);
    linear(xn, T, w.q_a, q_lora.data(), counter);
    cpu::rms_norm(q_lora.data(), T, q_in_dim, q_in_dim, w.q_a_norm.f32(), ModelConfig::kLoraNormEps,
                  q_lora.data(), q_in_dim);
    q_in = q_lora.data();
  }

  // Latent of every new token: c = RMSNorm(kv[:d_c]), k_rope = RoPE(kv[d_c:]); the rank that
  // stores the token's page writes it into the cache.
  std::vector<float> kv(T * d_lat);
  linear(xn, T, w.kv_a, kv.data(), counter);
  for (int64_t t = 0; t < T; ++t) {
    float* row = &kv[t * d_lat];
    cpu::rms_norm(row, 1, d_c, d_c, w.kv_a_norm.f32(), ModelConfig::kLoraNormEps, row, d_c);
    cpu::rope_rotate(row + d_c, d_r, &ctx.rope[t * d_r], c.rope_interleave);
  }
  ctx.dump_rows("latent", layer, kv.data(), T, d_c, d_lat, {T, d_c});
  ctx.dump_rows("k_rope", layer, kv.data() + d_c, T, d_r, d_lat, {T, d_r});
  const auto& seqs = ctx.batch->seqs;
  for (size_t s = 0; s < seqs.size(); ++s) {
    for (int32_t i = 0; i < seqs[s].num_tokens; ++i) {
      const int32_t pos = seqs[s].start + i;
      if (!cache.shard().owns_page(pos / B)) continue;
      cache.store_latent(*seqs[s].table, layer, pos, &kv[(batch.seq_begin[s] + i) * d_lat]);
    }
  }

  // Local heads' queries. q: [T, H_l, d_n + d_r] for the decompressed form and factored latent
  // weights; the latent form's absorbed queries go to q_latent: [T, H_l, d_c + d_r].
  const bool full_q = batch.any_decompressed || (batch.any_latent && !premerged);
  const bool dump_q = ctx.dumps("q_nope", layer) || ctx.dumps("q_rope", layer);
  std::vector<float> q(full_q || dump_q ? T * H_l * d_qk : 0);
  if (full_q || dump_q) linear(q_in, T, w.q_b, q.data(), counter);
  std::vector<float> q_latent(batch.any_latent ? T * H_l * d_lat : 0, 0.0f);
  if (batch.any_latent && premerged) {
    // q~ = W_Q' q_in and the rope rows of W_q, for every token (rows of decompressed-form
    // sequences are not attended).
    std::vector<float> q_abs(T * H_l * d_c), q_rot(T * H_l * d_r);
    linear(q_in, T, w.q_absorbed, q_abs.data(), counter);
    linear(q_in, T, w.q_rope, q_rot.data(), counter);
    for (int64_t i = 0; i < T * H_l; ++i) {
      std::memcpy(&q_latent[i * d_lat], &q_abs[i * d_c], d_c * sizeof(float));
      std::memcpy(&q_latent[i * d_lat + d_c], &q_rot[i * d_r], d_r * sizeof(float));
    }
  } else if (batch.any_latent) {
    for (size_t s = 0; s < seqs.size(); ++s) {
      if (batch.forms[s] != AttnForm::kLatent) continue;
      const int64_t r0 = batch.seq_begin[s], n = seqs[s].num_tokens;
      // q~_h = W_UK[h]^T q_nope,h  ->  [n, d_c] per head; the rotary part is copied.
      for (int64_t h = 0; h < H_l; ++h) {
        const float* w_uk = w.kv_b.f32() + h * (d_n + d_v) * d_c;  // [d_n, d_c]
        cpu::gemm(false, n, d_c, d_n, &q[(r0 * H_l + h) * d_qk], H_l * d_qk, w_uk, d_c,
                  &q_latent[(r0 * H_l + h) * d_lat], H_l * d_lat);
        for (int64_t i = 0; i < n; ++i) {
          std::memcpy(&q_latent[((r0 + i) * H_l + h) * d_lat + d_c],
                      &q[((r0 + i) * H_l + h) * d_qk + d_n], d_r * sizeof(float));
        }
      }
      counter.weight_flops += flops_of(n * H_l, d_c, d_n);
    }
  }
  // Rotate the rotary part of every query (in q for the decompressed form, q_latent otherwise;
  // in both when q is dumped).
  for (size_t s = 0; s < seqs.size(); ++s) {
    const bool latent = batch.forms[s] == AttnForm::kLatent;
    for (int64_t i = 0; i < seqs[s].num_tokens; ++i) {
      const int64_t t = batch.seq_begin[s] + i;
      for (int64_t h = 0; h < H_l; ++h) {
        if (latent) {
          cpu::rope_rotate(&q_latent[(t * H_l + h) * d_lat + d_c], d_r, &ctx.rope[t * d_r],
                           c.rope_interleave);
        }
        if (!latent || dump_q) {
          cpu::rope_rotate(&q[(t * H_l + h) * d_qk + d_n], d_r, &ctx.rope[t * d_r],
                           c.rope_interleave);
        }
      }
    }
  }
  if (dump_q) {
    ctx.dump_rows("q_nope", layer, q.data(), T * H_l, d_n, d_qk, {T, H_l, d_n});
    ctx.dump_rows("q_rope", layer, q.data() + d_n, T * H_l, d_r, d_qk, {T, H_l, d_r});
  }
  // The absorbed query exists for every row only when every sequence runs the latent form.
  if (!batch.any_decompressed) {
    ctx.dump_rows("q_absorbed", layer, q_latent.data(), T * H_l, d_c, d_lat, {T, H_l, d_c});
  }

  // Attention. o_v: [T, H_l * d_v] (then W_o); o_latent: [T, H_l * d_c] (then W_UV or W_O').
  // Rows of one form hold zeros in the other form's buffer, so the products add up.
  const bool o_from_v = full_q;
  std::vector<float> o_v(o_from_v ? T * H_l * d_v : 0, 0.0f);
  std::vector<float> o_latent(batch.any_latent ? T * H_l * d_c : 0, 0.0f);
  if (batch.any_latent) latent_attention(layer, ctx, cache, q_latent, o_latent);
  std::vector<int32_t> num_keys;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const ForwardSeq& seq = seqs[s];
    const int64_t r0 = batch.seq_begin[s], n = seq.num_tokens, L = seq.start + seq.num_tokens;
    if (batch.forms[s] == AttnForm::kLatent) {
      if (premerged) continue;
      // o_h = W_UV[h] o~_h  ->  [n, d_v] per head.
      for (int64_t h = 0; h < H_l; ++h) {
        const float* w_uv = w.kv_b.f32() + h * (d_n + d_v) * d_c + d_n * d_c;  // [d_v, d_c]
        cpu::gemm(true, n, d_v, d_c, &o_latent[(r0 * H_l + h) * d_c], H_l * d_c, w_uv, d_c,
                  &o_v[(r0 * H_l + h) * d_v], H_l * d_v);
      }
      counter.weight_flops += flops_of(n * H_l, d_v, d_c);
      continue;
    }

    // Decompressed form: up-project every cached latent of the sequence, the cost absorption
    // removes. Under a sharded cache the context is gathered first.
    const std::vector<float> context = gather_context(layer, seq, ctx, cache);  // [L, d_lat]
    std::vector<float> lat_c(L * d_c), k_up(L * H_l * (d_n + d_v));
    std::vector<float> keys(L * H_l * d_qk), values(L * H_l * d_v);
    for (int64_t j = 0; j < L; ++j) {
      std::memcpy(&lat_c[j * d_c], &context[j * d_lat], d_c * sizeof(float));
    }
    cpu::matmul_nt(lat_c.data(), L, d_c, w.kv_b.f32(), H_l * (d_n + d_v), k_up.data());
    counter.cache_upproj_flops += flops_of(L, H_l * (d_n + d_v), d_c);
    for (int64_t j = 0; j < L; ++j) {
      for (int64_t h = 0; h < H_l; ++h) {
        const float* src = &k_up[(j * H_l + h) * (d_n + d_v)];
        float* k = &keys[(j * H_l + h) * d_qk];
        std::memcpy(k, src, d_n * sizeof(float));
        std::memcpy(k + d_n, &context[j * d_lat + d_c], d_r * sizeof(float));
        std::memcpy(&values[(j * H_l + h) * d_v], src + d_n, d_v * sizeof(float));
      }
    }
    num_keys.resize(n);
    for (int64_t i = 0; i < n; ++i) num_keys[i] = static_cast<int32_t>(seq.start + i + 1);
    const int64_t pairs = std::accumulate(num_keys.begin(), num_keys.end(), int64_t{0});
    cpu::dense_attention({&q[r0 * H_l * d_qk], keys.data(), values.data(), num_keys.data(), n, L,
                          H_l, d_qk, d_v, softmax_scale_, &o_v[r0 * H_l * d_v]});
    counter.attention_flops += 2 * pairs * H_l * (d_qk + d_v);
  }

  // attn_out: under TP this rank's partial sum; the caller all-reduces it.
  std::fill_n(out, T * D, 0.0f);
  if (o_from_v) linear(o_v.data(), T, w.o, out, counter);
  if (batch.any_latent && premerged) linear(o_latent.data(), T, w.o_absorbed, out, counter, 1.0f);
}

void DeepseekModel::latent_attention(int64_t layer, StepContext& ctx, const LatentCache& cache,
                                     const std::vector<float>& q_local,
                                     std::vector<float>& o_latent) const {
  const ModelConfig& c = config_;
  const int64_t T = ctx.num_tokens(), H_l = shard_.local_heads(), P = shard_.tp_size(),
                d_c = c.kv_lora_rank, d_r = c.qk_rope_head_dim, d_lat = c.latent_width();
  const auto& seqs = ctx.batch->seqs;
  // A sharded cache: every rank attends all heads against its own pages and the partial
  // results are merged by LSE on the rank that owns each head. Otherwise: local heads only.
  const bool sharded = !cache.holds_every_page();
  const int64_t H_a = sharded ? H_l * P : H_l;  // heads this rank attends

  // q_all: [T, H_a, d_lat]; under sharding every rank's local heads, gathered.
  HostExchange host;
  const ShardedAttentionShape shape{T, H_l, sizeof(float)};
  std::vector<float> q_all;
  if (sharded) {
    std::vector<float> gathered(P * T * H_l * d_lat);
    q_all.resize(T * H_a * d_lat);
    gather_queries(*ctx.comm, host, shape, d_lat, q_local.data(), gathered.data(), q_all.data());
  }
  const std::vector<float>& qa = sharded ? q_all : q_local;
  std::vector<float> q_absorbed(T * H_a * d_c), q_rope(T * H_a * d_r);
  for (int64_t i = 0; i < T * H_a; ++i) {
    std::memcpy(&q_absorbed[i * d_c], &qa[i * d_lat], d_c * sizeof(float));
    std::memcpy(&q_rope[i * d_r], &qa[i * d_lat + d_c], d_r * sizeof(float));
  }

  std::vector<float> part(T * H_a * d_c, 0.0f), lse(T * H_a, -INFINITY);
  std::vector<int32_t> num_keys;
  std::vector<const float*> pages;
  // An fp8 cache's pages are read back as fp32 into `dequantised`, page by page.
  const bool fp8 = cache.storage() == CacheStorage::kHostFp8;
  const int64_t page_numel = int64_t{cache.geometry().block_size} * d_lat;
  std::vector<float> dequantised;
  for (size_t s = 0; s < seqs.size(); ++s) {
    if (ctx.layout.forms[s] != AttnForm::kLatent) continue;
    const ForwardSeq& seq = seqs[s];
    const int64_t r0 = ctx.layout.seq_begin[s], n = seq.num_tokens;
    num_keys.resize(n);
    for (int64_t i = 0; i < n; ++i)
      num_keys[i] = cache.local_keys(seq.start + static_cast<int32_t>(i));
    const int64_t pairs = std::accumulate(num_keys.begin(), num_keys.end(), int64_t{0});
    pages.clear();
    if (fp8) {
      dequantised.resize(seq.table->pages.size() * page_numel);
      for (size_t i = 0; i < seq.table->pages.size(); ++i) {
        cache.read_page_block(seq.table->pages[i], layer, &dequantised[i * page_numel]);
        pages.push_back(&dequantised[i * page_numel]);
      }
    } else {
      for (int32_t page : seq.table->pages) pages.push_back(cache.page_block(page, layer));
    }
    cpu::latent_attention({&q_absorbed[r0 * H_a * d_c], &q_rope[r0 * H_a * d_r], pages.data(),
                           num_keys.data(), n, H_a, d_c, d_r, cache.geometry().block_size,
                           softmax_scale_, &part[r0 * H_a * d_c], &lse[r0 * H_a]});
    ctx.counter->attention_flops += 2 * pairs * H_a * (d_c + d_r + d_c);
  }
  if (!sharded) {
    o_latent = std::move(part);
    return;
  }

  // Send head block r to rank r, then merge the P partials of each local head by LSE. A rank
  // without visible keys sent lse = -inf and weighs nothing; rows of decompressed-form
  // sequences have no part anywhere and merge to 0.
  std::vector<float> send(P * T * H_l * d_c), recv(P * T * H_l * d_c), lse_send(P * T * H_l),
      lse_recv(P * T * H_l);
  exchange_partials(*ctx.comm, host, shape, d_c, part.data(), lse.data(), send.data(),
                    lse_send.data(), recv.data(), lse_recv.data());
  cpu::lse_merge({recv.data(), lse_recv.data(), P, T * H_l, d_c, o_latent.data(), nullptr});
}

std::vector<float> DeepseekModel::gather_context(int64_t layer, const ForwardSeq& seq,
                                                 StepContext& ctx, const LatentCache& cache) const {
  const int64_t d_lat = config_.latent_width(), L = seq.start + seq.num_tokens;
  std::vector<float> context(L * d_lat);
  if (cache.holds_every_page()) {
    for (int64_t j = 0; j < L; ++j)
      cache.load_latent(*seq.table, layer, static_cast<int32_t>(j), &context[j * d_lat]);
    return context;
  }
  // Every rank contributes its keys' rows, padded to the largest share; the all-gather returns
  // [P, share, d_lat], put back in position order.
  const int64_t P = shard_.tp_size(), B = cache.geometry().block_size;
  const int64_t share = shard_.max_local_keys(L, B);
  std::vector<float> mine(share * d_lat, 0.0f), all(P * share * d_lat);
  const int64_t local = cache.local_keys(static_cast<int32_t>(L - 1));
  for (int64_t k = 0; k < local; ++k) {
    const int64_t pos = shard_.position_of_local_key(shard_.tp_rank(), k, B);
    cache.load_latent(*seq.table, layer, static_cast<int32_t>(pos), &mine[k * d_lat]);
  }
  ctx.comm->all_gather(mine.data(), share * d_lat, all.data());
  for (int32_t r = 0; r < P; ++r)
    for (int64_t k = 0; k < share; ++k) {
      const int64_t pos = shard_.position_of_local_key(r, k, B);
      if (pos < L)
        std::memcpy(&context[pos * d_lat], &all[(r * share + k) * d_lat], d_lat * sizeof(float));
    }
  return context;
}

void DeepseekModel::linear(const float* x, int64_t rows, const LinearWeight& w, float* y,
                           WorkCounter& counter, float beta) const {
  if (w.fp8()) {
    cpu::gemm_fp8_blockscaled({.x = x,
                               .m = rows,
                               .k = w.in(),
                               .ldx = w.in(),
                               .w = w.w.data<uint8_t>(),
                               .w_scale = w.scale.f32(),
                               .n = w.out(),
                               .group = w.group,
                               .y = y,
                               .ldy = w.out(),
                               .beta = beta});
  } else {
    cpu::matmul_nt(x, rows, w.in(), w.f32_weight().f32(), w.out(), y, beta, batch_invariant_);
  }
  counter.weight_flops += flops_of(rows, w.out(), w.in());
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
  cpu::MoeRouteParams route{logits.data(),
                            w.correction_bias.defined() ? w.correction_bias.f32() : nullptr,
                            rows,
                            E,
                            c.n_group,
                            c.topk_group,
                            K,
                            moe_gate_kind(c.gate),
                            c.renormalize_topk(),
                            static_cast<float>(c.routed_scaling_factor),
                            ids.data(),
                            weights.data()};
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
