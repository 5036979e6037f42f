#include "runtime/cuda/device_weights.h"

#include <algorithm>

#include "kernels/cuda/device_memory.h"
#include "runtime/absorption.h"
#include "runtime/weight_loader.h"

namespace mla {
namespace {

DeviceMlp upload_mlp(const MlpWeights& m) {
  return DeviceMlp{cuda::upload_bf16(m.gate_up.f32_weight()),
                   cuda::upload_bf16(m.down.f32_weight()), m.width};
}

// Host tensors of equal shape stacked into one device bf16 tensor [n, *shape].
Tensor upload_stacked(const std::vector<const Tensor*>& parts) {
  Shape shape = parts.front()->shape();
  const int64_t each = parts.front()->numel();
  shape.insert(shape.begin(), static_cast<int64_t>(parts.size()));
  Tensor host = Tensor::empty(shape, DType::kBF16);
  auto* dst = host.data<uint16_t>();
  for (const Tensor* t : parts) {
    const float* src = t->f32();
    for (int64_t i = 0; i < each; ++i) *dst++ = f32_to_bf16(src[i]);
  }
  return cuda::upload_bf16(host);
}

DeviceLayer upload_layer(const LayerWeights& lw) {
  DeviceLayer d;
  d.input_norm = cuda::upload_f32(lw.input_norm);
  d.post_attn_norm = cuda::upload_f32(lw.post_attn_norm);
  const AttentionWeights& a = lw.attn;
  if (a.q_a.defined()) {
    d.q_a = cuda::upload_bf16(a.q_a.f32_weight());
    d.q_a_norm = cuda::upload_f32(a.q_a_norm);
  }
  d.q_b = cuda::upload_bf16(a.q_b.f32_weight());
  d.kv_a = cuda::upload_bf16(a.kv_a.f32_weight());
  d.kv_a_norm = cuda::upload_f32(a.kv_a_norm);
  d.kv_b = cuda::upload_bf16(a.kv_b);
  d.o = cuda::upload_bf16(a.o.f32_weight());
  if (a.q_absorbed.defined()) {
    d.q_absorbed = cuda::upload_bf16(a.q_absorbed);
    d.q_rope = cuda::upload_bf16(a.q_rope);
    d.o_absorbed = cuda::upload_bf16(a.o_absorbed);
  }
  d.is_moe = lw.is_moe;
  if (!lw.is_moe) {
    d.mlp = upload_mlp(lw.mlp);
    return d;
  }
  d.gate = cuda::upload_f32(lw.moe.gate);
  if (lw.moe.correction_bias.defined())
    d.correction_bias = cuda::upload_f32(lw.moe.correction_bias);
  std::vector<const Tensor*> gate_up, down;
  for (const MlpWeights& e : lw.moe.experts) {
    gate_up.push_back(&e.gate_up.f32_weight());
    down.push_back(&e.down.f32_weight());
  }
  d.experts_gate_up = upload_stacked(gate_up);
  d.experts_down = upload_stacked(down);
  d.first_expert = lw.moe.first_expert;
  d.local_experts = static_cast<int64_t>(lw.moe.experts.size());
  if (lw.moe.shared.gate_up.defined()) d.shared = upload_mlp(lw.moe.shared);
  return d;
}

int64_t bytes_of(const Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : 0; }

int64_t layer_bytes(const DeviceLayer& d) {
  int64_t n = 0;
  for (const Tensor* t : {&d.input_norm,
                          &d.post_attn_norm,
                          &d.q_a,
                          &d.q_b,
                          &d.kv_a,
                          &d.kv_b,
                          &d.o,
                          &d.q_a_norm,
                          &d.kv_a_norm,
                          &d.q_absorbed,
                          &d.q_rope,
                          &d.o_absorbed,
                          &d.mlp.gate_up,
                          &d.mlp.down,
                          &d.gate,
                          &d.correction_bias,
                          &d.experts_gate_up,
                          &d.experts_down,
                          &d.shared.gate_up,
                          &d.shared.down}) {
    n += bytes_of(*t);
  }
  return n;
}

}  // namespace

DeviceWeights DeviceWeights::upload(WeightLoader& loader, const ModelConfig& c,
                                    const ShardPlan& shard, bool premerged) {
  DeviceWeights w;
  const Tensor embed = loader.embed();
  w.embed = cuda::upload_bf16(embed);
  w.final_norm = cuda::upload_f32(loader.final_norm());
  const Tensor head = loader.lm_head(embed);
  w.lm_head = head.raw() == embed.raw() ? w.embed : cuda::upload_bf16(head);
  w.inv_freq = cuda::upload_f32(
      Tensor::from_vector({static_cast<int64_t>(c.qk_rope_head_dim / 2)}, c.rope_inv_freq()));
  w.bytes = bytes_of(w.embed) + bytes_of(w.final_norm) + bytes_of(w.inv_freq) +
            (w.lm_head.raw() == w.embed.raw() ? 0 : bytes_of(w.lm_head));
  w.layers.reserve(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LayerWeights lw = loader.layer(l);
    if (premerged) build_premerged(c, shard.local_heads(), lw.attn);
    w.layers.push_back(upload_layer(lw));
    const DeviceLayer& d = w.layers.back();
    w.max_mlp_width = std::max({w.max_mlp_width, d.mlp.width, d.shared.width});
    w.bytes += layer_bytes(d);
  }
  return w;
}

}  // namespace mla
