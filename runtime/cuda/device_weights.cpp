#include "runtime/cuda/device_weights.h"

#include <algorithm>
#include <optional>

#include "kernels/cuda/device_memory.h"
#include "runtime/absorption.h"
#include "runtime/weight_loader.h"

namespace mla {
namespace {

// Whether the GPU products can use `w` as it is kept: fp8 in groups of 128 columns from column
// 0 (every DeepSeek product's input width is a multiple of 128).
bool gpu_fp8(const LinearWeight& w) { return w.fp8() && w.group == 128 && w.in() % 128 == 0; }

// The 128x128 block scales [ceil(out / 128), in / 128] of a kept weight whose row scales are the
// same down each block of 128 rows (a checkpoint's weight, or a shard starting on a block), or
// nullopt.
std::optional<Tensor> block_scales(const LinearWeight& w) {
  const int64_t rows = w.out(), groups = w.scale.dim(1), blocks = (rows + 127) / 128;
  const float* s = w.scale.f32();
  Tensor out = Tensor::empty({blocks, groups});
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      const float v = s[b * 128 * groups + g];
      for (int64_t r = b * 128; r < std::min(rows, (b + 1) * 128); ++r) {
        if (s[r * groups + g] != v) return std::nullopt;
      }
      out.f32()[b * groups + g] = v;
    }
  }
  return out;
}

// Uploads weights, counting the fp8 ones kept and widened.
class Uploader {
 public:
  int64_t kept = 0, widened = 0;

  DeviceLinear linear(const LinearWeight& w) {
    if (!w.defined()) return {};
    if (gpu_fp8(w)) {
      ++kept;
      DeviceLinear d{upload_bytes(w.w), cuda::upload_f32(w.scale), {}};
      if (const std::optional<Tensor> blocks = block_scales(w)) {
        d.block_scale = cuda::upload_f32(*blocks);
      }
      return d;
    }
    if (w.fp8()) ++widened;
    return {cuda::upload_bf16(w.widened()), {}, {}};
  }

  DeviceMlp mlp(const MlpWeights& m) { return {linear(m.gate_up), linear(m.down), m.width}; }

  // Weights of equal shape stacked [n, out, in]: fp8 when every one can stay fp8, else bf16.
  DeviceLinear stacked(const std::vector<const LinearWeight*>& parts) {
    const bool fp8 =
        std::all_of(parts.begin(), parts.end(), [](const LinearWeight* w) { return gpu_fp8(*w); });
    Shape shape = parts.front()->w.shape();
    shape.insert(shape.begin(), static_cast<int64_t>(parts.size()));
    if (fp8) {
      kept += static_cast<int64_t>(parts.size());
      Shape scale_shape = parts.front()->scale.shape();
      scale_shape.insert(scale_shape.begin(), static_cast<int64_t>(parts.size()));
      Tensor bytes = Tensor::empty(shape, DType::kU8),
             scales = Tensor::empty(scale_shape, DType::kF32);
      auto* b = static_cast<uint8_t*>(bytes.raw());
      float* sc = scales.f32();
      for (const LinearWeight* w : parts) {
        b = std::copy_n(static_cast<const uint8_t*>(w->w.raw()), w->w.nbytes(), b);
        sc = std::copy_n(w->scale.f32(), w->scale.numel(), sc);
      }
      return {upload_bytes(bytes), cuda::upload_f32(scales), {}};
    }
    Tensor host = Tensor::empty(shape, DType::kBF16);
    auto* dst = host.data<uint16_t>();
    for (const LinearWeight* w : parts) {
      if (w->fp8()) ++widened;
      const Tensor f32 = w->widened();
      const float* src = f32.f32();
      for (int64_t i = 0; i < f32.numel(); ++i) *dst++ = f32_to_bf16(src[i]);
    }
    return {cuda::upload_bf16(host), {}, {}};
  }

  DeviceLayer layer(const LayerWeights& lw) {
    DeviceLayer d;
    d.input_norm = cuda::upload_f32(lw.input_norm);
    d.post_attn_norm = cuda::upload_f32(lw.post_attn_norm);
    const AttentionWeights& a = lw.attn;
    if (a.q_a.defined()) {
      d.q_a = linear(a.q_a);
      d.q_a_norm = cuda::upload_f32(a.q_a_norm);
    }
    d.q_b = linear(a.q_b);
    d.kv_a = linear(a.kv_a);
    d.kv_a_norm = cuda::upload_f32(a.kv_a_norm);
    d.kv_b = cuda::upload_bf16(a.kv_b);
    d.o = linear(a.o);
    if (a.q_absorbed.defined()) {
      d.q_absorbed = cuda::upload_bf16(a.q_absorbed);
      d.q_rope = cuda::upload_bf16(a.q_rope);
      d.o_absorbed = cuda::upload_bf16(a.o_absorbed);
    }
    d.is_moe = lw.is_moe;
    if (!lw.is_moe) {
      d.mlp = mlp(lw.mlp);
      return d;
    }
    d.gate = cuda::upload_f32(lw.moe.gate);
    if (lw.moe.correction_bias.defined())
      d.correction_bias = cuda::upload_f32(lw.moe.correction_bias);
    std::vector<const LinearWeight*> gate_up, down;
    for (const MlpWeights& e : lw.moe.experts) {
      gate_up.push_back(&e.gate_up);
      down.push_back(&e.down);
    }
    d.experts_gate_up = stacked(gate_up);
    d.experts_down = stacked(down);
    d.first_expert = lw.moe.first_expert;
    d.local_experts = static_cast<int64_t>(lw.moe.experts.size());
    if (lw.moe.shared.gate_up.defined()) d.shared = mlp(lw.moe.shared);
    return d;
  }

 private:
  // The raw bytes of an e4m3 (or U8) host tensor, as U8 on the device.
  static Tensor upload_bytes(const Tensor& host) {
    Tensor dev = cuda::device_empty(host.shape(), DType::kU8);
    cuda::copy_to_device(dev.raw(), host.raw(), host.nbytes());
    return dev;
  }
};

int64_t bytes_of(const Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : 0; }

int64_t bytes_of(const DeviceLinear& l) {
  return bytes_of(l.w) + bytes_of(l.scale) + bytes_of(l.block_scale);
}

int64_t layer_bytes(const DeviceLayer& d) {
  int64_t n = 0;
  for (const DeviceLinear* l :
       {&d.q_a, &d.q_b, &d.kv_a, &d.o, &d.mlp.gate_up, &d.mlp.down, &d.experts_gate_up,
        &d.experts_down, &d.shared.gate_up, &d.shared.down}) {
    n += bytes_of(*l);
  }
  for (const Tensor* t : {&d.input_norm, &d.post_attn_norm, &d.kv_b, &d.q_a_norm, &d.kv_a_norm,
                          &d.q_absorbed, &d.q_rope, &d.o_absorbed, &d.gate, &d.correction_bias}) {
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
  Uploader up;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LayerWeights lw = loader.layer(l);
    if (premerged) build_premerged(c, shard.local_heads(), lw.attn);
    w.layers.push_back(up.layer(lw));
    const DeviceLayer& d = w.layers.back();
    w.max_mlp_width = std::max({w.max_mlp_width, d.mlp.width, d.shared.width});
    for (const DeviceLinear* p : {&d.q_a, &d.q_b, &d.kv_a, &d.o, &d.mlp.gate_up, &d.mlp.down,
                                  &d.shared.gate_up, &d.shared.down}) {
      if (p->fp8()) w.fp8_max_in = std::max(w.fp8_max_in, p->w.dim(1));
    }
    w.fp8_experts = w.fp8_experts || d.experts_gate_up.fp8();
    w.bytes += layer_bytes(d);
  }
  w.kept_fp8 = up.kept;
  w.widened_fp8 = up.widened;
  return w;
}

}  // namespace mla
