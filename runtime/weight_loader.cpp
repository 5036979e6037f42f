#include "runtime/weight_loader.h"

#include <cstdio>

#include "kernels/cpu/ops.h"
#include "kernels/error.h"

namespace mla {

WeightLoader::WeightLoader(Checkpoint& ckpt, const ModelConfig& config, const ShardPlan& shard,
                           bool keep_fp8)
    : ckpt_(ckpt), config_(config), shard_(shard), keep_fp8_(keep_fp8) {
  // The progress total: everything but block scales and layers past num_hidden_layers
  // (a rank of P reads about 1/P of the split tensors; the line shows the whole file).
  size_t total = 0;
  for (const std::string& name : ckpt.names()) {
    int layer = -1;
    const bool beyond =
        std::sscanf(name.c_str(), "model.layers.%d.", &layer) == 1 && layer >= config.num_layers;
    if (!beyond && !name.ends_with("_scale_inv")) total += ckpt.info(name).nbytes;
  }
  ckpt.expect_total_bytes(shard.tp_size() == 1 ? total : total / shard.tp_size());
}

Tensor WeightLoader::embed() {
  return ckpt_.load_f32("model.embed_tokens.weight", {config_.vocab_size, config_.hidden_size});
}

Tensor WeightLoader::final_norm() {
  return ckpt_.load_f32("model.norm.weight", {config_.hidden_size});
}

Tensor WeightLoader::lm_head(const Tensor& embed) {
  if (config_.tie_word_embeddings && !ckpt_.has("lm_head.weight")) return embed;
  return ckpt_.load_f32("lm_head.weight", {config_.vocab_size, config_.hidden_size});
}

LinearWeight WeightLoader::linear(const std::string& name, const Shape& shape, int64_t r0,
                                  int64_t r1, int64_t c0, int64_t c1) {
  if (keep_fp8_ && ckpt_.is_fp8(name)) {
    if (c0 % config_.fp8_block[1] == 0) {
      Checkpoint::Fp8Slice s = ckpt_.load_fp8_slice(name, shape, r0, r1, c0, c1);
      ++kept_fp8_;
      return LinearWeight(std::move(s.values), std::move(s.scale), s.group);
    }
    ++widened_fp8_;
  }
  return ckpt_.load_f32_slice(name, shape, r0, r1, c0, c1);
}

// A SwiGLU MLP of `width` split by columns of gate/up and rows of down: rank r keeps
// [r * width / P, (r + 1) * width / P).
MlpWeights WeightLoader::mlp(const std::string& prefix, int64_t width, int64_t parts) {
  const int64_t D = config_.hidden_size, w = width / parts,
                begin = (parts == 1 ? 0 : shard_.tp_rank()) * w;
  MlpWeights m;
  m.width = w;
  m.gate_up =
      LinearWeight::concat_rows(linear(prefix + "gate_proj.weight", {width, D}, begin, begin + w),
                                linear(prefix + "up_proj.weight", {width, D}, begin, begin + w));
  m.down = linear(prefix + "down_proj.weight", {D, width}, 0, D, begin, begin + w);
  return m;
}

LayerWeights WeightLoader::layer(int64_t l) {
  const ModelConfig& c = config_;
  const int64_t D = c.hidden_size, H = c.num_heads, P = shard_.tp_size(), r = shard_.tp_rank();
  const int64_t h0 = shard_.head_begin(), h1 = shard_.head_end();
  auto load = [&](const std::string& name, const Shape& shape) {
    return ckpt_.load_f32(name, shape);
  };
  auto rows = [&](const std::string& name, const Shape& shape, int64_t begin, int64_t end) {
    return ckpt_.load_f32_slice(name, shape, begin, end);
  };
  LayerWeights lw;
  const std::string p = fmt::format("model.layers.{}.", l);
  lw.input_norm = load(p + "input_layernorm.weight", {D});
  lw.post_attn_norm = load(p + "post_attention_layernorm.weight", {D});

  AttentionWeights& a = lw.attn;
  const std::string ap = p + "self_attn.";
  const int64_t d_qk = c.qk_head_dim(), d_kv = c.qk_nope_head_dim + c.v_head_dim;
  if (c.q_lora_rank > 0) {
    a.q_a = linear(ap + "q_a_proj.weight", {c.q_lora_rank, D}, 0, c.q_lora_rank);
    a.q_a_norm = load(ap + "q_a_layernorm.weight", {c.q_lora_rank});
    a.q_b = linear(ap + "q_b_proj.weight", {H * d_qk, c.q_lora_rank}, h0 * d_qk, h1 * d_qk);
  } else {
    a.q_b = linear(ap + "q_proj.weight", {H * d_qk, D}, h0 * d_qk, h1 * d_qk);
  }
  a.kv_a = linear(ap + "kv_a_proj_with_mqa.weight", {c.latent_width(), D}, 0, c.latent_width());
  a.kv_a_norm = load(ap + "kv_a_layernorm.weight", {c.kv_lora_rank});
  a.kv_b = rows(ap + "kv_b_proj.weight", {H * d_kv, c.kv_lora_rank}, h0 * d_kv, h1 * d_kv);
  a.o = linear(ap + "o_proj.weight", {D, H * c.v_head_dim}, 0, D, h0 * c.v_head_dim,
               h1 * c.v_head_dim);

  lw.is_moe = c.is_moe_layer(l);
  const std::string mp = p + "mlp.";
  if (!lw.is_moe) {
    lw.mlp = mlp(mp, c.intermediate_size, P);
    return lw;
  }
  MoeWeights& m = lw.moe;
  m.gate = load(mp + "gate.weight", {c.n_routed_experts, D});
  if (c.gate == GateKind::kSigmoidNoauxTc) {
    m.correction_bias = load(mp + "gate.e_score_correction_bias", {c.n_routed_experts});
  }
  const int64_t I = c.moe_intermediate_size, E = c.n_routed_experts, local = E / P;
  m.first_expert = r * local;
  m.experts.resize(local);
  if (ckpt_.has(mp + "experts.gate_up_proj")) {
    // Fused layout (transformers' in-memory form): [E, 2I, D] and [E, D, I].
    Tensor gu =
        rows(mp + "experts.gate_up_proj", {E, 2 * I, D}, m.first_expert, m.first_expert + local);
    Tensor down = rows(mp + "experts.down_proj", {E, D, I}, m.first_expert, m.first_expert + local);
    for (int64_t e = 0; e < local; ++e) {
      m.experts[e].width = I;
      m.experts[e].gate_up = gu.slice_rows(e, e + 1).view({2 * I, D});
      m.experts[e].down = down.slice_rows(e, e + 1).view({D, I});
    }
  } else {
    for (int64_t e = 0; e < local; ++e) {
      m.experts[e] = mlp(fmt::format("{}experts.{}.", mp, m.first_expert + e), I, 1);
    }
  }
  if (c.n_shared_experts > 0) m.shared = mlp(mp + "shared_experts.", c.n_shared_experts * I, P);
  return lw;
}

}  // namespace mla
