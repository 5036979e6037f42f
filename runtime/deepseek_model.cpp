#include "runtime/deepseek_model.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>

#include "kernels/cpu/ops.h"
#include "kernels/error.h"
#include "runtime/checkpoint.h"

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

// Per-step scratch shared by the layers: positions, rope tables and the attention form of
// every sequence in the batch.
struct DeepseekModel::StepContext {
  const ForwardBatch* batch;
  int64_t num_tokens;
  std::vector<int32_t> positions;   // [T]
  std::vector<int64_t> seq_begin;   // first row of each sequence
  std::vector<float> rope;          // [T, d_r]: cos then sin per position
  std::vector<AttnForm> forms;      // [seqs]
  bool any_latent_factored_or_decompressed = false;
  bool any_premerged = false;
  WorkCounter* counter;
};

DeepseekModel::DeepseekModel(ModelConfig config, const ModelOptions& options)
    : config_(std::move(config)),
      forms_(config_, options.absorb, options.cost),
      inv_freq_(config_.rope_inv_freq()),
      rope_factor_(config_.rope_attention_factor()),
      softmax_scale_(static_cast<float>(config_.softmax_scale())) {}

std::shared_ptr<DeepseekModel> DeepseekModel::load(const std::string& model_dir,
                                                   const ModelOptions& options) {
  ModelConfig config = ModelConfig::load(model_dir);
  std::shared_ptr<DeepseekModel> model(new DeepseekModel(std::move(config), options));
  Checkpoint ckpt = Checkpoint::open(model_dir, model->config_.fp8_block);
  ckpt.set_progress(options.show_progress);
  model->load_weights(ckpt);
  ckpt.finish_progress();
  if (model->forms_.needs_premerged()) {
    for (auto& layer : model->weights_.layers) model->prepare_premerged(layer.attn);
  }
  const auto& c = model->config_;
  spdlog::info("loaded {} ({} layers, {} heads, d_c {}, d_r {}, {} experts) absorption {}",
               c.family_name(), c.num_layers, c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim,
               c.n_routed_experts, to_string(options.absorb));
  return model;
}

void DeepseekModel::load_weights(Checkpoint& ckpt) {
  const ModelConfig& c = config_;
  const int64_t D = c.hidden_size, H = c.num_heads;
  auto load = [&](const std::string& name, const Shape& shape) {
    return ckpt.load_f32(name, shape);
  };
  // The progress total: everything but block scales and layers past num_hidden_layers.
  size_t total = 0;
  for (const std::string& name : ckpt.names()) {
    int layer = -1;
    const bool beyond = std::sscanf(name.c_str(), "model.layers.%d.", &layer) == 1 &&
                        layer >= c.num_layers;
    if (!beyond && !name.ends_with("_scale_inv")) total += ckpt.info(name).nbytes;
  }
  ckpt.expect_total_bytes(total);
  auto load_mlp = [&](const std::string& prefix, int64_t width) {
    MlpWeights m;
    m.width = width;
    Tensor gate = load(prefix + "gate_proj.weight", {width, D});
    Tensor up = load(prefix + "up_proj.weight", {width, D});
    m.gate_up = Tensor::empty({2 * width, D});
    std::memcpy(m.gate_up.f32(), gate.f32(), gate.nbytes());
    std::memcpy(m.gate_up.f32() + width * D, up.f32(), up.nbytes());
    m.down = load(prefix + "down_proj.weight", {D, width});
    return m;
  };

  weights_.embed = load("model.embed_tokens.weight", {c.vocab_size, D});
  weights_.final_norm = load("model.norm.weight", {D});
  weights_.lm_head = c.tie_word_embeddings && !ckpt.has("lm_head.weight")
                         ? weights_.embed
                         : load("lm_head.weight", {c.vocab_size, D});
  // Layers past num_hidden_layers (the V3 multi-token-prediction head) are never read.
  weights_.layers.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LayerWeights& lw = weights_.layers[l];
    const std::string p = fmt::format("model.layers.{}.", l);
    lw.input_norm = load(p + "input_layernorm.weight", {D});
    lw.post_attn_norm = load(p + "post_attention_layernorm.weight", {D});

    AttentionWeights& a = lw.attn;
    const std::string ap = p + "self_attn.";
    if (c.q_lora_rank > 0) {
      a.q_a = load(ap + "q_a_proj.weight", {c.q_lora_rank, D});
      a.q_a_norm = load(ap + "q_a_layernorm.weight", {c.q_lora_rank});
      a.q_b = load(ap + "q_b_proj.weight", {H * c.qk_head_dim(), c.q_lora_rank});
    } else {
      a.q_b = load(ap + "q_proj.weight", {H * c.qk_head_dim(), D});
    }
    a.kv_a = load(ap + "kv_a_proj_with_mqa.weight", {c.latent_width(), D});
    a.kv_a_norm = load(ap + "kv_a_layernorm.weight", {c.kv_lora_rank});
    a.kv_b = load(ap + "kv_b_proj.weight",
                  {H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank});
    a.o = load(ap + "o_proj.weight", {D, H * c.v_head_dim});

    lw.is_moe = c.is_moe_layer(l);
    const std::string mp = p + "mlp.";
    if (!lw.is_moe) {
      lw.mlp = load_mlp(mp, c.intermediate_size);
      continue;
    }
    MoeWeights& m = lw.moe;
    m.gate = load(mp + "gate.weight", {c.n_routed_experts, D});
    if (c.gate == GateKind::kSigmoidNoauxTc) {
      m.correction_bias = load(mp + "gate.e_score_correction_bias", {c.n_routed_experts});
    }
    const int64_t I = c.moe_intermediate_size;
    m.experts.resize(c.n_routed_experts);
    if (ckpt.has(mp + "experts.gate_up_proj")) {
      // Fused layout (transformers' in-memory form): [E, 2I, D] and [E, D, I].
      Tensor gu = load(mp + "experts.gate_up_proj", {c.n_routed_experts, 2 * I, D});
      Tensor down = load(mp + "experts.down_proj", {c.n_routed_experts, D, I});
      for (int64_t e = 0; e < c.n_routed_experts; ++e) {
        m.experts[e].width = I;
        m.experts[e].gate_up = gu.slice_rows(e, e + 1).view({2 * I, D});
        m.experts[e].down = down.slice_rows(e, e + 1).view({D, I});
      }
    } else {
      for (int64_t e = 0; e < c.n_routed_experts; ++e) {
        m.experts[e] = load_mlp(fmt::format("{}experts.{}.", mp, e), I);
      }
    }
    if (c.n_shared_experts > 0) {
      m.shared = load_mlp(mp + "shared_experts.", c.n_shared_experts * I);
    }
  }
}

void DeepseekModel::prepare_premerged(AttentionWeights& w) const {
  const ModelConfig& c = config_;
  const int64_t H = c.num_heads, dc = c.kv_lora_rank, dn = c.qk_nope_head_dim,
                dr = c.qk_rope_head_dim, dv = c.v_head_dim, D = c.hidden_size,
                qin = c.q_in_dim(), dqk = c.qk_head_dim();
  w.q_absorbed = Tensor::empty({H * dc, qin});
  w.q_rope = Tensor::empty({H * dr, qin});
  w.o_absorbed = Tensor::empty({D, H * dc});
  for (int64_t h = 0; h < H; ++h) {
    const float* w_uk = w.kv_b.f32() + h * (dn + dv) * dc;  // [d_n, d_c]
    const float* w_uv = w_uk + dn * dc;                      // [d_v, d_c]
    const float* q_nope = w.q_b.f32() + h * dqk * qin;       // [d_n, q_in]
    // W_Q'[h] [d_c, q_in] = W_UK[h]^T [d_c, d_n] * W_q,nope[h] [d_n, q_in]
    std::vector<float> uk_t(dc * dn);
    for (int64_t i = 0; i < dn; ++i)
      for (int64_t j = 0; j < dc; ++j) uk_t[j * dn + i] = w_uk[i * dc + j];
    cpu::matmul_nn(uk_t.data(), dc, dn, q_nope, qin, w.q_absorbed.f32() + h * dc * qin);
    std::memcpy(w.q_rope.f32() + h * dr * qin, q_nope + dn * qin, dr * qin * sizeof(float));
    // W_O'[:, h] [D, d_c] = W_o[:, h] [D, d_v] * W_UV[h] [d_v, d_c]
    cpu::gemm(false, D, dc, dv, w.o.f32() + h * dv, H * dv, w_uv, dc,
              w.o_absorbed.f32() + h * dc, H * dc);
  }
}

CacheGeometry DeepseekModel::cache_geometry(int32_t block_size) const {
  return CacheGeometry{static_cast<int32_t>(config_.num_layers), block_size,
                       static_cast<int32_t>(config_.kv_lora_rank),
                       static_cast<int32_t>(config_.qk_rope_head_dim)};
}

Tensor DeepseekModel::forward(const ForwardBatch& batch, LatentCache& cache,
                              WorkCounter* counter) const {
  const ModelConfig& c = config_;
  const int64_t T = static_cast<int64_t>(batch.tokens.size());
  const int64_t D = c.hidden_size, dr = c.qk_rope_head_dim;
  WorkCounter local;
  StepContext ctx{&batch, T, {}, {}, {}, {}, false, false, counter ? counter : &local};

  // Check shapes
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
    (form == AttnForm::kLatentPremerged ? ctx.any_premerged
                                        : ctx.any_latent_factored_or_decompressed) = true;
  }
  MLA_CHECK(rows == T, "batch has {} tokens but its sequences cover {}", T, rows);
  for (int32_t tok : batch.tokens) {
    MLA_CHECK(tok >= 0 && tok < c.vocab_size, "token id {} outside vocabulary", tok);
  }

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
    cpu::add_inplace(x.data(), delta.data(), T * D);
    cpu::rms_norm(x.data(), T, D, D, lw.post_attn_norm.f32(), eps, xn.data(), D);
    if (lw.is_moe) {
      moe(lw.moe, xn.data(), T, delta.data(), *ctx.counter);
    } else {
      mlp(lw.mlp, xn.data(), T, delta.data(), *ctx.counter);
    }
    cpu::add_inplace(x.data(), delta.data(), T * D);
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
  const int64_t T = ctx.num_tokens, D = c.hidden_size, H = c.num_heads, dc = c.kv_lora_rank,
                dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim, dv = c.v_head_dim,
                dqk = c.qk_head_dim(), qin = c.q_in_dim(), width = c.latent_width();
  WorkCounter& counter = *ctx.counter;

  // Query input: x_n, or the normalised q LoRA down-projection.
  std::vector<float> q_lora;
  const float* q_in = xn;
  if (c.q_lora_rank > 0) {
    q_lora.resize(T * qin);
    linear(xn, T, w.q_a, q_lora.data(), counter);
    cpu::rms_norm(q_lora.data(), T, qin, qin, w.q_a_norm.f32(), kLoraNormEps, q_lora.data(), qin);
    q_in = q_lora.data();
  }

  // Latent of every new token -> its cache row: c = RMSNorm(kv[:d_c]), k_r = RoPE(kv[d_c:]).
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
      const int64_t t = ctx.seq_begin[s] + i;
      std::memcpy(cache.row(*seqs[s].table, layer, seqs[s].start + i), &kv[t * width],
                  width * sizeof(float));
    }
  }

  // Queries. q: [T, H, d_n + d_r] for the factored/decompressed forms; the premerged form
  // produces the latent query [T, H, d_c] and the rope part [T, H, d_r] directly.
  std::vector<float> q, q_lat(T * H * dc), q_rope(T * H * dr);
  if (ctx.any_latent_factored_or_decompressed) {
    q.resize(T * H * dqk);
    linear(q_in, T, w.q_b, q.data(), counter);
  }
  std::vector<float> q_pm_rope;
  if (ctx.any_premerged) {
    linear(q_in, T, w.q_absorbed, q_lat.data(), counter);  // rows of other forms unused
    q_pm_rope.resize(T * H * dr);
    linear(q_in, T, w.q_rope, q_pm_rope.data(), counter);
  }

  // Attention outputs: o_v [T, H * d_v] (through W_o) and o_lat [T, H * d_c] (through W_O').
  std::vector<float> o_v(ctx.any_latent_factored_or_decompressed ? T * H * dv : 0, 0.0f);
  std::vector<float> o_lat(T * H * dc, 0.0f);
  std::vector<float> lse(T * H);
  std::vector<int32_t> num_keys;
  std::vector<const float*> pages;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const ForwardSeq& seq = seqs[s];
    const int64_t r0 = ctx.seq_begin[s], n = seq.num_tokens, L = seq.start + seq.num_tokens;
    const AttnForm form = ctx.forms[s];
    num_keys.resize(n);
    for (int64_t i = 0; i < n; ++i) num_keys[i] = static_cast<int32_t>(seq.start + i + 1);
    const int64_t pairs = std::accumulate(num_keys.begin(), num_keys.end(), int64_t{0});

    // Rotary part of the query, per token and head.
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = r0 + i;
      for (int64_t h = 0; h < H; ++h) {
        float* dst = &q_rope[(t * H + h) * dr];
        const float* src = form == AttnForm::kLatentPremerged ? &q_pm_rope[(t * H + h) * dr]
                                                              : &q[(t * H + h) * dqk + dn];
        std::memcpy(dst, src, dr * sizeof(float));
        cpu::rope_rotate(dst, dr, &ctx.rope[t * dr], c.rope_interleave);
      }
    }

    if (form == AttnForm::kDecompressed) {
      // Up-project every cached latent of the sequence: the cost absorption removes.
      std::vector<float> lat_c(L * dc), k_up(L * H * (dn + dv));
      std::vector<float> keys(L * H * dqk), values(L * H * dv), q_full(n * H * dqk);
      for (int64_t j = 0; j < L; ++j) {
        std::memcpy(&lat_c[j * dc], cache.row(*seq.table, layer, j), dc * sizeof(float));
      }
      cpu::matmul_nt(lat_c.data(), L, dc, w.kv_b.f32(), H * (dn + dv), k_up.data());
      counter.cache_upproj_flops += flops_of(L, H * (dn + dv), dc);
      for (int64_t j = 0; j < L; ++j) {
        const float* k_r = cache.row(*seq.table, layer, j) + dc;
        for (int64_t h = 0; h < H; ++h) {
          const float* src = &k_up[(j * H + h) * (dn + dv)];
          float* k = &keys[(j * H + h) * dqk];
          std::memcpy(k, src, dn * sizeof(float));
          std::memcpy(k + dn, k_r, dr * sizeof(float));
          std::memcpy(&values[(j * H + h) * dv], src + dn, dv * sizeof(float));
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t h = 0; h < H; ++h) {
          float* dst = &q_full[(i * H + h) * dqk];
          std::memcpy(dst, &q[((r0 + i) * H + h) * dqk], dn * sizeof(float));
          std::memcpy(dst + dn, &q_rope[((r0 + i) * H + h) * dr], dr * sizeof(float));
        }
      }
      cpu::dense_attention({q_full.data(), keys.data(), values.data(), num_keys.data(), n, L, H,
                            dqk, dv, softmax_scale_, &o_v[r0 * H * dv]});
      counter.attention_flops += 2 * pairs * H * (dqk + dv);
      continue;
    }

    if (form == AttnForm::kLatentFactored) {
      // q~_h = W_UK[h]^T q_n,h  ->  [n, d_c] per head, written into q_lat.
      for (int64_t h = 0; h < H; ++h) {
        const float* w_uk = w.kv_b.f32() + h * (dn + dv) * dc;  // [d_n, d_c]
        cpu::gemm(false, n, dc, dn, &q[(r0 * H + h) * dqk], H * dqk, w_uk, dc,
                  &q_lat[(r0 * H + h) * dc], H * dc);
      }
      counter.weight_flops += flops_of(n * H, dc, dn);
    }
    pages.clear();
    for (int32_t page : seq.table->pages) pages.push_back(cache.page_block(page, layer));
    cpu::latent_attention({&q_lat[r0 * H * dc], &q_rope[r0 * H * dr], pages.data(),
                           num_keys.data(), n, H, dc, dr, cache.geometry().block_size,
                           softmax_scale_, &o_lat[r0 * H * dc], &lse[r0 * H]});
    counter.attention_flops += 2 * pairs * H * (dc + dr + dc);
    if (form == AttnForm::kLatentFactored) {
      // o_h = W_UV[h] o~_h  ->  [n, d_v] per head.
      for (int64_t h = 0; h < H; ++h) {
        const float* w_uv = w.kv_b.f32() + h * (dn + dv) * dc + dn * dc;  // [d_v, d_c]
        cpu::gemm(true, n, dv, dc, &o_lat[(r0 * H + h) * dc], H * dc, w_uv, dc,
                  &o_v[(r0 * H + h) * dv], H * dv);
      }
      counter.weight_flops += flops_of(n * H, dv, dc);
      if (ctx.any_premerged) std::fill_n(&o_lat[r0 * H * dc], n * H * dc, 0.0f);
    }
  }

  // Rows of one form hold zeros in the other form's buffer, so the two products add up.
  std::fill_n(out, T * D, 0.0f);
  if (ctx.any_latent_factored_or_decompressed) linear(o_v.data(), T, w.o, out, counter);
  if (ctx.any_premerged) linear(o_lat.data(), T, w.o_absorbed, out, counter, 1.0f);
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
  const int64_t group_size = E / c.n_group;
  std::vector<float> logits(rows * E);
  linear(x, rows, w.gate, logits.data(), counter);

  // Route every token: expert ids and weights, then group tokens by expert.
  std::vector<std::vector<std::pair<int64_t, float>>> by_expert(E);
  std::vector<float> scores(E), choice(E), group_score(c.n_group);
  std::vector<int64_t> order(E), group_order(c.n_group);
  const float kMasked = c.gate == GateKind::kSigmoidNoauxTc
                            ? -std::numeric_limits<float>::infinity()
                            : 0.0f;
  for (int64_t t = 0; t < rows; ++t) {
    const float* lg = &logits[t * E];
    if (c.gate == GateKind::kSigmoidNoauxTc) {
      for (int64_t e = 0; e < E; ++e) {
        scores[e] = 1.0f / (1.0f + std::exp(-lg[e]));
        choice[e] = scores[e] + w.correction_bias.f32()[e];
      }
    } else {
      std::copy(lg, lg + E, scores.begin());
      cpu::softmax_inplace(scores.data(), E);
      choice = scores;
    }
    if (c.gate != GateKind::kSoftmaxGreedy) {
      for (int64_t g = 0; g < c.n_group; ++g) {
        const float* gs = &choice[g * group_size];
        if (c.gate == GateKind::kSigmoidNoauxTc) {
          std::vector<float> top(gs, gs + group_size);
          std::partial_sort(top.begin(), top.begin() + 2, top.end(), std::greater<>());
          group_score[g] = top[0] + top[1];
        } else {
          group_score[g] = *std::max_element(gs, gs + group_size);
        }
      }
      std::iota(group_order.begin(), group_order.end(), 0);
      std::partial_sort(group_order.begin(), group_order.begin() + c.topk_group,
                        group_order.end(),
                        [&](int64_t a, int64_t b) { return group_score[a] > group_score[b]; });
      std::vector<bool> keep(c.n_group, false);
      for (int64_t g = 0; g < c.topk_group; ++g) keep[group_order[g]] = true;
      for (int64_t e = 0; e < E; ++e) {
        if (!keep[e / group_size]) choice[e] = kMasked;
      }
    }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [&](int64_t a, int64_t b) { return choice[a] > choice[b]; });
    float denom = 0.0f;
    for (int64_t k = 0; k < K; ++k) denom += scores[order[k]];
    // transformers' DeepseekV2 never renormalises (norm_topk_prob is false in every V2
    // checkpoint anyway); V3 does when asked.
    const bool renorm = c.norm_topk_prob && c.family == ModelFamily::kDeepseekV3;
    for (int64_t k = 0; k < K; ++k) {
      float weight = scores[order[k]];
      if (renorm) weight /= denom + 1e-20f;
      by_expert[order[k]].push_back({t, weight * static_cast<float>(c.routed_scaling_factor)});
    }
  }

  // Shared experts on every token, then each routed expert once on the tokens routed to it.
  if (c.n_shared_experts > 0) {
    mlp(w.shared, x, rows, out, counter);
  } else {
    std::fill_n(out, rows * D, 0.0f);
  }
  std::vector<float> xs, ys;
  for (int64_t e = 0; e < E; ++e) {
    const auto& routed = by_expert[e];
    if (routed.empty()) continue;
    const int64_t m = static_cast<int64_t>(routed.size());
    xs.resize(m * D);
    ys.resize(m * D);
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(&xs[i * D], x + routed[i].first * D, D * sizeof(float));
    }
    mlp(w.experts[e], xs.data(), m, ys.data(), counter);
    for (int64_t i = 0; i < m; ++i) {
      float* dst = out + routed[i].first * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += routed[i].second * ys[i * D + d];
    }
  }
}

}  // namespace mla
