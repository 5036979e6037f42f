#include "runtime/cuda/cuda_step.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <array>
#include <vector>

#include "kernels/cpu/fp8_latent.h"
#include "kernels/cuda/add_rms_norm.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/fp8_gemm.h"
#include "kernels/cuda/fp8_gemm_lt.h"
#include "kernels/cuda/fp8_latent.h"
#include "kernels/cuda/gather_rows.h"
#include "kernels/cuda/l2_prefetch.h"
#include "kernels/cuda/latent_attention.h"
#include "kernels/cuda/latent_store.h"
#include "kernels/cuda/lse_merge.h"
#include "kernels/cuda/mha_prefill.h"
#include "kernels/cuda/mla_decode.h"
#include "kernels/cuda/mla_decode_fused.h"
#include "kernels/cuda/mla_prefill.h"
#include "kernels/cuda/moe_experts.h"
#include "kernels/cuda/moe_experts_fp8.h"
#include "kernels/cuda/moe_gate.h"
#include "kernels/cuda/rope_bf16.h"
#include "kernels/cuda/silu_mul.h"
#include "kernels/dtype.h"
#include "parallel/sharded_attention.h"
#include "runtime/model.h"
#include "runtime/tensor_dump.h"

namespace mla {
namespace {

using bf16 = __nv_bfloat16;

// The sharded-attention exchange on device buffers, on the step's stream. A blocking
// communicator runs on its own stream, so the step's work must be done before a collective.
class DeviceExchange final : public ShardedAttentionBackend {
 public:
  explicit DeviceExchange(const CudaStepContext& x) : x_(x) {}
  void copy_rows(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch,
                 int64_t row_bytes, int64_t rows) override {
    MLA_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, rows,
                                     cudaMemcpyDeviceToDevice, x_.stream));
  }
  void collective(Communicator&, const std::function<void()>& call) override {
    if (!x_.ordered) MLA_CUDA_CHECK(cudaStreamSynchronize(x_.stream));
    StepProfiler::Scope timed(x_.profiler, StepProfiler::kCollectives);
    call();
  }

 private:
  const CudaStepContext& x_;
};

}  // namespace

void CudaStep::all_reduce(float* data, int64_t n) {
  if (x_.comm == nullptr) return;
  DeviceExchange(x_).collective(*x_.comm, [&] { x_.comm->all_reduce_sum(data, n); });
}

bool CudaStep::dumps(const char* name, int64_t layer) const {
  return x_.dump != nullptr && x_.dump->wants(name, layer);
}

void CudaStep::dump(const char* name, int64_t layer, const void* data, DType dtype, int64_t rows,
                    int64_t cols, int64_t stride, std::vector<int64_t> shape) {
  if (!dumps(name, layer)) return;
  const size_t elem = dtype_size(dtype);
  std::vector<uint8_t> raw(rows * cols * elem);
  MLA_CUDA_CHECK(cudaMemcpy2DAsync(raw.data(), cols * elem, data, stride * elem, cols * elem, rows,
                                   cudaMemcpyDeviceToHost, x_.stream));
  MLA_CUDA_CHECK(cudaStreamSynchronize(x_.stream));
  std::vector<float> values(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) {
    values[i] = dtype == DType::kF32
                    ? reinterpret_cast<const float*>(raw.data())[i]
                    : bf16_to_f32(reinterpret_cast<const uint16_t*>(raw.data())[i]);
  }
  x_.dump->add(name, layer, values.data(), shape);
}

void CudaStep::dump_layer_out(int64_t layer) {
  if (!dumps("layer_out", layer)) return;
  const int64_t T = meta_.T, D = c_.hidden_size;
  std::vector<float> x(T * D), delta(T * D);
  MLA_CUDA_CHECK(
      cudaMemcpyAsync(x.data(), b_.x.raw(), T * D * 4, cudaMemcpyDeviceToHost, x_.stream));
  MLA_CUDA_CHECK(
      cudaMemcpyAsync(delta.data(), b_.delta.raw(), T * D * 4, cudaMemcpyDeviceToHost, x_.stream));
  MLA_CUDA_CHECK(cudaStreamSynchronize(x_.stream));
  for (int64_t i = 0; i < T * D; ++i) x[i] += delta[i];
  x_.dump->add("layer_out", layer, x.data(), {T, D});
}

void CudaStep::dump_latents(int64_t layer) {
  if (!dumps("latent", layer) && !dumps("k_rope", layer)) return;
  const int64_t T = meta_.T, d_c = c_.kv_lora_rank, d_r = c_.qk_rope_head_dim,
                d_lat = c_.latent_width();
  const auto& geo = x_.cache.geometry();
  const int64_t row_bytes = cuda::latent_row_bytes(latent_element(), d_c, d_r);
  // One rank holds every page (dumps are single-rank): token t's row is in its sequence's table.
  std::vector<uint8_t> rows(T * row_bytes);
  const auto* pool = static_cast<const uint8_t*>(x_.cache.pool_storage().raw());
  int64_t t = 0;
  for (const ForwardSeq& seq : batch_.seqs) {
    for (int32_t k = 0; k < seq.num_tokens; ++k, ++t) {
      const int32_t pos = seq.start + k;
      const int64_t page = seq.table->pages[pos / geo.block_size];
      const int64_t row = (page * geo.num_layers + layer) * geo.block_size + pos % geo.block_size;
      MLA_CUDA_CHECK(cudaMemcpyAsync(&rows[t * row_bytes], pool + row * row_bytes, row_bytes,
                                     cudaMemcpyDeviceToHost, x_.stream));
    }
  }
  MLA_CUDA_CHECK(cudaStreamSynchronize(x_.stream));
  std::vector<float> wide(T * d_lat);
  if (latent_element() == cuda::LatentElement::kFp8) {
    cpu::dequantize_latent_fp8({.d_c = d_c, .d_r = d_r}, rows.data(), T, wide.data(), d_lat);
  } else {
    convert_to_f32(DType::kBF16, rows.data(), wide.size(), wide.data());
  }
  std::vector<float> latent(T * d_c), k_rope(T * d_r);
  for (int64_t i = 0; i < T; ++i) {
    std::copy_n(&wide[i * d_lat], d_c, &latent[i * d_c]);
    std::copy_n(&wide[i * d_lat + d_c], d_r, &k_rope[i * d_r]);
  }
  if (dumps("latent", layer)) x_.dump->add("latent", layer, latent.data(), {T, d_c});
  if (dumps("k_rope", layer)) x_.dump->add("k_rope", layer, k_rope.data(), {T, d_r});
}

cuda::LatentElement latent_element(CacheStorage storage) {
  return storage == CacheStorage::kDeviceFp8 ? cuda::LatentElement::kFp8
                                             : cuda::LatentElement::kBf16;
}

void CudaStep::dump_final() {
  const int64_t T = meta_.T, D = c_.hidden_size, V = c_.vocab_size;
  dump("final_norm", -1, b_.xn.raw(), DType::kBF16, T, D, D, {T, D});
  if (!dumps("logits", -1)) return;
  const Tensor all = cuda::device_empty({T, V}, DType::kF32);
  cuda::linear(x_.blas, b_.xn.raw(), T, D, x_.weights.lm_head.raw(), V, all.raw(), DType::kF32);
  dump("logits", -1, all.raw(), DType::kF32, T, V, V, {T, V});
}

void CudaStep::enqueue() {
  // A captured step must end with every stream it forked joined back: below, or here when it
  // throws part way (the capture then ends cleanly and is dropped; errors are let be, as in any
  // destructor).
  struct JoinSide {
    const CudaStepContext& x;
    const bool& forked;
    ~JoinSide() {
      if (!forked) return;
      cudaEventRecord(x.join, x.side_stream);
      cudaStreamWaitEvent(x.stream, x.join);
    }
  } join_side{x_, forked_};
  const int64_t T = meta_.T, D = c_.hidden_size;
  const cudaStream_t s = x_.stream;
  const DeviceWeights& w = x_.weights;
  cuda::embedding_bf16({.table = w.embed.data<bf16>(),
                        .ids = meta(meta_.o_tokens),
                        .out = b_.x.data<float>(),
                        .tokens = T,
                        .vocab = c_.vocab_size,
                        .d = D},
                       s);
  const auto eps = static_cast<float>(c_.rms_norm_eps);
  // x += delta (the last sublayer's output, when there is one), then y = RMSNorm(x) * w.
  auto add_norm = [&](const float* delta, const Tensor& weight, const Tensor& y, int64_t d,
                      float* y32 = nullptr) {
    cuda::add_rms_norm({.x = b_.x.data<float>(),
                        .delta = delta,
                        .w = weight.data<float>(),
                        .y = y.data<bf16>(),
                        .y32 = y32,
                        .rows = T,
                        .d = d,
                        .x_stride = d,
                        .y_stride = d,
                        .eps = eps},
                       s);
  };
  for (int64_t l = 0; l < c_.num_layers; ++l) {
    const DeviceLayer& d = w.layers[l];
    add_norm(l == 0 ? nullptr : b_.delta.data<float>(), d.input_norm, b_.xn, D);
    dump("attn_norm", l, b_.xn.raw(), DType::kBF16, T, D, D, {T, D});
    attention(l, d);
    all_reduce(b_.delta.data<float>(), T * D);
    dump("attn_out", l, b_.delta.raw(), DType::kF32, T, D, D, {T, D});
    // ffn_norm; MoE layers also want it in fp32 for the router.
    add_norm(b_.delta.data<float>(), d.post_attn_norm, b_.xn, D,
             d.is_moe ? b_.xn32.data<float>() : nullptr);
    dump("ffn_norm", l, b_.xn.raw(), DType::kBF16, T, D, D, {T, D});
    ffn(d);
    all_reduce(b_.delta.data<float>(), T * D);
    dump("ffn_out", l, b_.delta.raw(), DType::kF32, T, D, D, {T, D});
    dump_layer_out(l);
  }
  if (forked_) {
    MLA_CUDA_CHECK(cudaEventRecord(x_.join, x_.side_stream));
    MLA_CUDA_CHECK(cudaStreamWaitEvent(x_.stream, x_.join));
    forked_ = false;
  }
  // Final norm on every row, then only the rows whose logits are wanted go through the head.
  add_norm(b_.delta.data<float>(), w.final_norm, b_.xn, D);
  if (x_.dump != nullptr) dump_final();
  if (meta_.n_logits == 0) return;
  cuda::gather_rows({.in = b_.xn.raw(),
                     .index = meta(meta_.o_logit_rows),
                     .out = b_.x_last.raw(),
                     .rows = meta_.n_logits,
                     .row_bytes = D * 2,
                     .in_stride = D * 2,
                     .out_stride = D * 2},
                    s);
  cuda::linear(x_.blas, b_.x_last.raw(), meta_.n_logits, D, w.lm_head.raw(), c_.vocab_size,
               b_.logits.raw(), DType::kF32);
}

void CudaStep::prefetch_after_attention_inputs(const DeviceLayer& d) {
  if (!x_.prefetch_weights || !d.is_moe || !meta_.batch.pure_decode() ||
      meta_.T > cuda::kMoeRouteMaxTokens || !small_row_kernels()) {
    return;
  }
  // In the order the layer reads them: the output product (the premerged latent form's W_O'
  // when no row needs W_o), then the shared experts.
  const BatchLayout& batch = meta_.batch;
  const bool o_absorbed = x_.premerged && batch.any_latent && !batch.any_decompressed;
  const Tensor& o = o_absorbed ? d.o_absorbed : d.o.w;
  std::array<cuda::L2PrefetchRange, 3> ranges{};
  size_t n = 0;
  for (const Tensor* w : {&o, &d.shared.gate_up.w, &d.shared.down.w}) {
    if (w->defined()) ranges[n++] = {w->raw(), static_cast<size_t>(w->nbytes())};
  }
  MLA_CUDA_CHECK(cudaEventRecord(x_.fork, x_.stream));
  MLA_CUDA_CHECK(cudaStreamWaitEvent(x_.side_stream, x_.fork));
  forked_ = true;  // from here on enqueue() joins the side stream back
  // A quarter of L2 stays for what is read in between (the attention's weights and cache).
  cuda::l2_prefetch(ranges.data(), n, static_cast<size_t>(x_.l2_bytes) / 4 * 3, x_.side_stream);
}

void CudaStep::attention(int64_t l, const DeviceLayer& d) {
  const int64_t T = meta_.T, D = c_.hidden_size, H_l = x_.shard.local_heads(),
                d_c = c_.kv_lora_rank, d_r = c_.qk_rope_head_dim, d_n = c_.qk_nope_head_dim,
                d_v = c_.v_head_dim, d_qk = c_.qk_head_dim(), d_lat = c_.latent_width(),
                d_q = c_.q_lora_rank;
  const cudaStream_t s = x_.stream;
  const auto& geo = x_.cache.geometry();
  const BatchLayout& batch = meta_.batch;
  const bool premerged = x_.premerged;
  bf16* q = b_.q.data<bf16>();
  bf16* q_latent = b_.q_latent.data<bf16>();
  const bool dump_q = dumps("q_nope", l) || dumps("q_rope", l);
  // q [T, H_l, d_n + d_r] is wanted by the decompressed and factored forms (premerged makes q~
  // from q_in directly).
  const bool q_wanted = batch.any_decompressed || (batch.any_latent && !premerged) || dump_q;

  // The products of x_n: kv_a, and the query's first (q_a, or q_b without a q LoRA), paired.
  const LinearOut kv_a{d.kv_a, d_lat, b_.kv32.raw(), DType::kF32};
  const bf16* q_in = b_.xn.data<bf16>();
  int64_t q_in_dim = D;
  if (d_q > 0) {
    linear_pair(b_.xn.raw(), T, D, kv_a, {d.q_a, d_q, b_.qa32.raw(), DType::kF32});
    cuda::add_rms_norm({.x = b_.qa32.data<float>(),
                        .delta = nullptr,
                        .w = d.q_a_norm.data<float>(),
                        .y = b_.qn.data<bf16>(),
                        .y32 = nullptr,
                        .rows = T,
                        .d = d_q,
                        .x_stride = d_q,
                        .y_stride = d_q,
                        .eps = ModelConfig::kLoraNormEps},
                       s);
    q_in = b_.qn.data<bf16>();
    q_in_dim = d_q;
  } else if (q_wanted) {
    linear_pair(b_.xn.raw(), T, D, kv_a, {d.q_b, H_l * d_qk, q, DType::kBF16});
  } else {
    linear(b_.xn.raw(), T, D, kv_a.w, kv_a.out, kv_a.y, kv_a.y_type);
  }
  prefetch_after_attention_inputs(d);

  // The new tokens' latents: c = RMSNorm(kv[:d_c]), k_rope = RoPE(kv[d_c:]) into the pages this
  // rank stores.
  cuda::latent_store({.kv = b_.kv32.data<float>(),
                      .kv_stride = d_lat,
                      .norm_w = d.kv_a_norm.data<float>(),
                      .eps = ModelConfig::kLoraNormEps,
                      .positions = meta(meta_.o_pos),
                      .inv_freq = x_.weights.inv_freq.data<float>(),
                      .attention_factor = x_.rope_factor,
                      .interleave = c_.rope_interleave,
                      .slot_pages = meta(meta_.o_slot_page),
                      .slot_offsets = meta(meta_.o_slot_off),
                      .pool = x_.cache.pool_storage().raw(),
                      .element = latent_element(),
                      .layer = static_cast<int32_t>(l),
                      .num_layers = geo.num_layers,
                      .block_size = geo.block_size,
                      .d_c = static_cast<int32_t>(d_c),
                      .d_r = static_cast<int32_t>(d_r),
                      .T = T},
                     s);
  dump_latents(l);

  // RoPE of query rows: [T, H_l] vectors of d_r, from src to dst (strides in elements).
  auto rope = [&](const bf16* src, int64_t src_token, int64_t src_head, bf16* dst,
                  int64_t dst_token, int64_t dst_head) {
    cuda::rope_bf16({.src = src,
                     .dst = dst,
                     .positions = meta(meta_.o_pos),
                     .inv_freq = x_.weights.inv_freq.data<float>(),
                     .tokens = T,
                     .heads = H_l,
                     .d = d_r,
                     .src_token_stride = src_token,
                     .src_head_stride = src_head,
                     .dst_token_stride = dst_token,
                     .dst_head_stride = dst_head,
                     .attention_factor = x_.rope_factor,
                     .interleave = c_.rope_interleave},
                    s);
  };
  // When only the factored latent form reads the rotated query, RoPE writes it straight into
  // q~'s rotary block (no copy node between kernels in the step's graph).
  const bool rope_into_latent =
      batch.any_latent && !premerged && !batch.any_decompressed && !dump_q;
  // The fused kernel rotates the query's rotary block itself.
  const bool fused = fused_attention(rope_into_latent);
  if (q_wanted) {
    // q: [T, H_l, d_n + d_r], its rotary part rotated in place.
    if (d_q > 0) linear(q_in, T, q_in_dim, d.q_b, H_l * d_qk, q, DType::kBF16);
    if (!rope_into_latent) rope(q + d_n, H_l * d_qk, d_qk, q + d_n, H_l * d_qk, d_qk);
    dump("q_nope", l, q, DType::kBF16, T * H_l, d_n, d_qk, {T, H_l, d_n});
    dump("q_rope", l, q + d_n, DType::kBF16, T * H_l, d_r, d_qk, {T, H_l, d_r});
  }
  if (fused) {
    StepProfiler::Scope timed(x_.profiler, StepProfiler::kAttention);
    fused_latent_attention(l, d);
  } else if (batch.any_latent) {
    if (premerged) {
      // q~[t, h] = W_Q'[h] q_in[t]: one product per head into the [T, H_l, d_lat] layout.
      cuda::GemmParams g{q_in,     d.q_absorbed.raw(), q_latent, T,          d_c,
                         q_in_dim, q_in_dim,           q_in_dim, H_l * d_lat};
      g.c_type = DType::kBF16;
      g.batch = H_l;
      g.stride_b = d_c * q_in_dim;
      g.b_constant = true;  // a weight
      g.stride_c = d_lat;
      cuda::gemm(x_.blas, g);
      cuda::linear(x_.blas, q_in, T, q_in_dim, d.q_rope.raw(), H_l * d_r, b_.q_rope.raw(),
                   DType::kBF16);
      rope(b_.q_rope.data<bf16>(), H_l * d_r, d_r, q_latent + d_c, H_l * d_lat, d_lat);
    } else {
      // q~[t, h] = W_UK[h]^T q_nope[t, h]: W_UK[h] is the [d_n, d_c] row block of kv_b.
      cuda::GemmParams g{q, d.kv_b.raw(), q_latent, T, d_c, d_n, H_l * d_qk, d_c, H_l * d_lat};
      g.b_nk = false;
      g.c_type = DType::kBF16;
      g.batch = H_l;
      g.stride_a = d_qk;
      g.stride_b = (d_n + d_v) * d_c;
      g.b_constant = true;  // a weight
      g.stride_c = d_lat;
      cuda::gemm(x_.blas, g);
      if (rope_into_latent) {
        rope(q + d_n, H_l * d_qk, d_qk, q_latent + d_c, H_l * d_lat, d_lat);
      } else {
        MLA_CUDA_CHECK(cudaMemcpy2DAsync(q_latent + d_c, d_lat * 2, q + d_n, d_qk * 2, d_r * 2,
                                         T * H_l, cudaMemcpyDeviceToDevice, s));
      }
    }
    // The absorbed query exists for every row only when every sequence runs the latent form.
    if (!batch.any_decompressed) {
      dump("q_absorbed", l, q_latent, DType::kBF16, T * H_l, d_c, d_lat, {T, H_l, d_c});
    }
    StepProfiler::Scope timed(x_.profiler, StepProfiler::kAttention);
    latent_attention(l, q_latent);
  }

  bf16* o_v = b_.o_v.data<bf16>();
  float* out = b_.delta.data<float>();
  if (batch.any_latent && !premerged && !fused) {
    // o[t, h] = W_UV[h] o~[t, h]; rows of decompressed-form tokens hold o~ = 0.
    cuda::GemmParams g{b_.o_latent.raw(), d.kv_b.raw(), o_v,      T, d_v, d_c,
                       H_l * d_c,         d_c,          H_l * d_v};
    g.b = d.kv_b.data<bf16>() + d_n * d_c;
    g.c_type = DType::kBF16;
    g.batch = H_l;
    g.stride_a = d_c;
    g.stride_b = (d_n + d_v) * d_c;
    g.b_constant = true;  // a weight
    g.stride_c = d_v;
    cuda::gemm(x_.blas, g);
  } else if (batch.any_decompressed) {
    MLA_CUDA_CHECK(cudaMemsetAsync(o_v, 0, T * H_l * d_v * 2, s));
  }
  if (batch.any_decompressed) decompressed(l, d);
  // Rows of one form hold zeros in the other form's buffer, so the two products add up.
  const bool o_from_v = batch.any_decompressed || (batch.any_latent && !premerged);
  if (batch.any_latent && premerged) {
    cuda::linear(x_.blas, b_.o_latent.raw(), T, H_l * d_c, d.o_absorbed.raw(), D, out, DType::kF32);
  }
  if (o_from_v) {
    linear(o_v, T, H_l * d_v, d.o, D, out, DType::kF32,
           batch.any_latent && premerged ? 1.0f : 0.0f);
  }
}

bool CudaStep::fused_attention(bool rope_into_latent) const {
  // Nothing here may depend on the layer: layers after the first reuse the first one's
  // mla_decode plan when the step runs the unfused kernels.
  const int64_t block = x_.cache.geometry().block_size;
  const int64_t max_keys = meta_.stride * block;
  return x_.fused_attention && rope_into_latent && x_.dump == nullptr && meta_.tuned &&
         meta_.batch.pure_decode() && !x_.batch_invariant && x_.cache.holds_every_page() &&
         latent_element() == cuda::LatentElement::kBf16 &&
         cuda::mla_decode_fused_supports(c_.kv_lora_rank, c_.qk_rope_head_dim, c_.qk_nope_head_dim,
                                         c_.v_head_dim, block) &&
         max_keys <= cuda::kMlaDecodeFusedMaxKeys &&
         cuda::mla_decode_fused_fits(static_cast<int32_t>(meta_.T),
                                     static_cast<int32_t>(x_.shard.local_heads()),
                                     static_cast<int32_t>(max_keys), x_.num_sms);
}

void CudaStep::fused_latent_attention(int64_t l, const DeviceLayer& d) {
  const auto& geo = x_.cache.geometry();
  cuda::mla_decode_fused({.q = b_.q.data<bf16>(),
                          .kv_b = d.kv_b.data<bf16>(),
                          .positions = meta(meta_.o_pos),
                          .inv_freq = x_.weights.inv_freq.data<float>(),
                          .attention_factor = x_.rope_factor,
                          .interleave = c_.rope_interleave,
                          .pool = x_.cache.pool_storage().raw(),
                          .layer = static_cast<int32_t>(l),
                          .num_layers = geo.num_layers,
                          .block_table = meta(meta_.o_table),
                          .table_stride = static_cast<int32_t>(meta_.stride),
                          .num_keys = meta(meta_.o_num_keys),
                          .max_keys = static_cast<int32_t>(meta_.stride * geo.block_size),
                          .scale = x_.scale,
                          .out = b_.o_v.data<bf16>(),
                          .T = static_cast<int32_t>(meta_.T),
                          .heads = static_cast<int32_t>(x_.shard.local_heads()),
                          .num_sms = x_.num_sms},
                         b_.fused_workspace.raw(), static_cast<size_t>(b_.fused_workspace.nbytes()),
                         x_.stream);
}

void CudaStep::latent_attention(int64_t l, const bf16* q_local) {
  const int64_t T = meta_.T, H_l = x_.shard.local_heads(), P = x_.shard.tp_size(),
                d_c = c_.kv_lora_rank, d_lat = c_.latent_width();
  const cudaStream_t s = x_.stream;
  const bool sharded = !x_.cache.holds_every_page();
  const int64_t H_a = sharded ? H_l * P : H_l;  // heads this rank attends
  DeviceExchange device(x_);
  const ShardedAttentionShape shape{T, H_l, sizeof(bf16)};
  const bf16* q_att = q_local;
  if (sharded) {
    gather_queries(*x_.comm, device, shape, d_lat, q_local, b_.q_gathered.raw(),
                   b_.q_ordered.raw());
    q_att = b_.q_ordered.data<bf16>();
  }
  const auto& geo = x_.cache.geometry();
  bf16* o_att = sharded ? b_.o_attended.data<bf16>() : b_.o_latent.data<bf16>();
  float* lse = b_.lse.data<float>();
  // The three attention kernels share these fields (same names in each Params struct).
  auto common = [&](auto& p) {
    p.q = q_att;
    p.pool = x_.cache.pool_storage().raw();
    p.element = latent_element();
    p.layer = static_cast<int32_t>(l);
    p.num_layers = geo.num_layers;
    p.block_table = meta(meta_.o_table);
    p.table_stride = static_cast<int32_t>(meta_.stride);
    p.num_keys = meta(meta_.o_num_keys);
    p.heads = static_cast<int32_t>(H_a);
    p.scale = x_.scale;
    p.out = o_att;
    p.lse = lse;
  };
  if (!meta_.tuned) {
    cuda::LatentAttentionParams p{};
    common(p);
    p.block_size = geo.block_size;
    p.d_c = static_cast<int32_t>(d_c);
    p.d_r = static_cast<int32_t>(c_.qk_rope_head_dim);
    p.token_seq = meta(meta_.o_token_seq);
    p.tokens = static_cast<int32_t>(T);
    cuda::latent_attention(p, s);
  } else if (meta_.batch.pure_decode() && !x_.batch_invariant) {
    cuda::MlaDecodeParams p{};
    common(p);
    p.batch = static_cast<int32_t>(meta_.S);
    p.s_q = 1;
    p.num_sms = x_.num_sms;
    // Every layer of the step has the same batch, heads and key counts: the first layer's
    // split plan serves them all (the workspace is only touched by mla_decode).
    p.reuse_plan = l > 0;
    cuda::mla_decode(p, b_.decode_workspace.raw(), s);
  } else {
    cuda::MlaPrefillParams p{};
    common(p);
    p.token_seq = meta(meta_.o_token_seq);
    p.tokens = static_cast<int32_t>(T);
    p.single_split = x_.batch_invariant;
    cuda::mla_prefill(p, b_.prefill_workspace.raw(), s);
  }
  if (!sharded) return;
  // Every rank attended all heads over its own pages: send head block r to rank r, then merge
  // the P partials of each local head by LSE.
  exchange_partials(*x_.comm, device, shape, d_c, o_att, lse, b_.a2a_send.raw(),
                    b_.lse_send.data<float>(), b_.a2a_recv.raw(), b_.lse_recv.data<float>());
  cuda::lse_merge({.parts = b_.a2a_recv.data<bf16>(),
                   .lse = b_.lse_recv.data<float>(),
                   .P = static_cast<int32_t>(P),
                   .rows = T * H_l,
                   .d = d_c,
                   .out = b_.o_latent.data<bf16>(),
                   .out_lse = nullptr},
                  s);
}

void CudaStep::decompressed(int64_t l, const DeviceLayer& d) {
  const int64_t H_l = x_.shard.local_heads(), d_c = c_.kv_lora_rank, d_n = c_.qk_nope_head_dim,
                d_v = c_.v_head_dim, d_r = c_.qk_rope_head_dim, d_qk = c_.qk_head_dim(),
                d_lat = c_.latent_width(), d_kv = d_n + d_v;
  const cudaStream_t s = x_.stream;
  const auto& geo = x_.cache.geometry();
  const bool sharded = !x_.cache.holds_every_page();
  // Row r of `layer_rows` is the cache row r of this layer: page * num_layers * B + offset.
  const cuda::LatentElement element = latent_element();
  const int64_t row_bytes = cuda::latent_row_bytes(element, d_c, d_r);
  const auto* layer_rows = static_cast<const uint8_t*>(x_.cache.pool_storage().raw()) +
                           int64_t{l} * geo.block_size * row_bytes;
  auto gather = [&](const void* in, const int32_t* index, void* out, int64_t rows) {
    cuda::gather_rows({.in = in,
                       .index = index,
                       .out = out,
                       .rows = rows,
                       .row_bytes = d_lat * 2,
                       .in_stride = d_lat * 2,
                       .out_stride = d_lat * 2},
                      s);
  };
  // The pool's rows as bf16 rows (fp8 ones dequantised on the way).
  auto gather_pool = [&](const int32_t* index, bf16* out, int64_t rows) {
    if (element == cuda::LatentElement::kBf16) {
      gather(layer_rows, index, out, rows);
      return;
    }
    cuda::fp8_latent_gather({.pool = layer_rows,
                             .index = index,
                             .out = out,
                             .rows = rows,
                             .out_stride = d_lat,
                             .d_c = static_cast<int32_t>(d_c),
                             .d_r = static_cast<int32_t>(d_r)},
                            s);
  };
  for (size_t i = 0; i < batch_.seqs.size(); ++i) {
    if (meta_.batch.forms[i] != AttnForm::kDecompressed) continue;
    const ForwardSeq& seq = batch_.seqs[i];
    const int64_t n = seq.num_tokens, L = seq.start + seq.num_tokens, r0 = meta_.batch.seq_begin[i];
    const int64_t local = meta_.ctx_local[i], o = meta_.ctx_offset[i];
    bf16* context = b_.context.data<bf16>();
    if (!sharded) {
      gather_pool(meta(o), context, L);
    } else {
      // Each rank contributes its rows padded to the largest share (ShardPlan::max_local_keys),
      // then the gathered rows are put back in position order.
      bf16* mine = b_.context_mine.data<bf16>();
      gather_pool(meta(o), mine, local);
      DeviceExchange(x_).collective(*x_.comm, [&] {
        x_.comm->all_gather(reinterpret_cast<const float*>(mine), local * d_lat / 2,
                            b_.context_all.data<float>());
      });
      gather(b_.context_all.raw(), meta(o + local), context, L);
    }
    // The up-projection absorption avoids: [L, H_l * (d_n + d_v)] = c W_kvb^T.
    cuda::GemmParams g{context, d.kv_b.raw(), b_.up.raw(), L,         H_l * d_kv,
                       d_c,     d_lat,        d_c,         H_l * d_kv};
    g.c_type = DType::kBF16;
    g.b_constant = true;  // a weight
    cuda::gemm(x_.blas, g);
    const int32_t* cu = meta(meta_.o_cu + 4 * static_cast<int64_t>(i));
    cuda::mha_prefill({.q = b_.q.data<bf16>() + r0 * H_l * d_qk,
                       .k_nope = b_.up.data<bf16>(),
                       .k_rope = context + d_c,
                       .v = b_.up.data<bf16>() + d_n,
                       .q_token_stride = H_l * d_qk,
                       .q_head_stride = d_qk,
                       .kn_token_stride = H_l * d_kv,
                       .kn_head_stride = d_kv,
                       .kr_token_stride = d_lat,
                       .kr_head_stride = 0,
                       .v_token_stride = H_l * d_kv,
                       .v_head_stride = d_kv,
                       .cu_q = cu,
                       .cu_k = cu + 2,
                       .num_seqs = 1,
                       .max_q = static_cast<int32_t>(n),
                       .heads = static_cast<int32_t>(H_l),
                       .d_nope = static_cast<int32_t>(d_n),
                       .d_rope = static_cast<int32_t>(d_r),
                       .d_v = static_cast<int32_t>(d_v),
                       .scale = x_.scale,
                       .out = b_.o_v.data<bf16>() + r0 * H_l * d_v,
                       .lse = nullptr},
                      s);
  }
}

void CudaStep::ffn(const DeviceLayer& d) {
  const int64_t T = meta_.T, D = c_.hidden_size;
  const cudaStream_t s = x_.stream;
  float* out = b_.delta.data<float>();
  if (!d.is_moe) {
    mlp(d.mlp, b_.xn.data<bf16>(), out);
    return;
  }
  const int64_t E = c_.n_routed_experts, K = c_.num_experts_per_tok;
  cuda::MoeGateParams gp{};
  gp.logits = b_.router_logits.data<float>();
  gp.bias = d.correction_bias.data<float>();
  gp.tokens = T;
  gp.experts = E;
  gp.n_group = c_.n_group;
  gp.topk_group = c_.topk_group;
  gp.top_k = K;
  gp.gate = moe_gate_kind(c_.gate);
  gp.renormalize = c_.renormalize_topk();
  gp.scaling = static_cast<float>(c_.routed_scaling_factor);
  gp.ids = b_.topk_ids.data<int32_t>();
  gp.weights = b_.topk_weights.data<float>();
  // The router in fp32, like transformers: at up to kMoeRouteMaxTokens tokens product and gate
  // in one launch. Its logits are summed as the weight-streaming products sum (cuBLAS sums the
  // product above 2 rows otherwise), so it goes with the small-row path and stays out of the
  // deterministic one.
  if (T <= cuda::kMoeRouteMaxTokens && small_row_kernels()) {
    cuda::moe_route({.x = b_.xn32.data<float>(),
                     .weight = d.gate.data<float>(),
                     .d = D,
                     .logits = b_.router_logits.data<float>(),
                     .counter = b_.route_counter.data<int32_t>(),
                     .gate = gp},
                    s);
  } else {
    cuda::GemmParams g{b_.xn32.raw(), d.gate.raw(), b_.router_logits.raw(), T, E, D, D, D, E};
    g.ab_type = DType::kF32;
    g.b_constant = true;  // a weight
    cuda::gemm(x_.blas, g);
    cuda::moe_gate(gp, s);
  }
  auto shared_experts_first = [&] {
    if (d.shared.width > 0) {
      mlp(d.shared, b_.xn.data<bf16>(), out);
    } else {
      MLA_CUDA_CHECK(cudaMemsetAsync(out, 0, T * D * sizeof(float), s));
    }
  };
  if (d.experts_gate_up.fp8()) {
    shared_experts_first();
    cuda::moe_experts_fp8({.x = b_.xn.data<bf16>(),
                           .ids = b_.topk_ids.data<int32_t>(),
                           .weights = b_.topk_weights.data<float>(),
                           .gate_up = d.experts_gate_up.w.data<uint8_t>(),
                           .gate_up_scale = d.experts_gate_up.scale.data<float>(),
                           .down = d.experts_down.w.data<uint8_t>(),
                           .down_scale = d.experts_down.scale.data<float>(),
                           .out = out,
                           .tokens = T,
                           .top_k = K,
                           .d = D,
                           .inter = c_.moe_intermediate_size,
                           .experts = E,
                           .first_expert = d.first_expert,
                           .local_experts = d.local_experts},
                          b_.moe_workspace.raw(), b_.moe_workspace.nbytes(), s);
    return;
  }
  cuda::MoeExpertsParams ep{};
  ep.x = b_.xn.data<bf16>();
  ep.ids = b_.topk_ids.data<int32_t>();
  ep.weights = b_.topk_weights.data<float>();
  ep.gate_up = d.experts_gate_up.w.data<bf16>();
  ep.down = d.experts_down.w.data<bf16>();
  ep.out = out;
  ep.tokens = T;
  ep.top_k = K;
  ep.first_expert = d.first_expert;
  ep.local_experts = d.local_experts;
  ep.d = D;
  ep.inter = c_.moe_intermediate_size;
  ep.experts = E;
  // The weight-streaming expert kernels go with the small-row products (CudaOptions).
  ep.gemv_max_slots = small_row_kernels() ? cuda::kMoeGemvMaxSlots : 0;
  // With few slots the shared experts' bf16 rows stream in the routed experts' kernels.
  if (d.shared.width > 0 && d.shared.width % 8 == 0 && !d.shared.gate_up.fp8() &&
      !d.shared.down.fp8() && cuda::moe_experts_streams(ep)) {
    ep.shared = {.gate_up = d.shared.gate_up.w.data<bf16>(),
                 .down = d.shared.down.w.data<bf16>(),
                 .act = b_.act.data<bf16>(),
                 .inter = d.shared.width};
  } else {
    shared_experts_first();
  }
  cuda::moe_experts(ep, b_.moe_workspace.raw(), b_.moe_workspace.nbytes(), s);
}

void CudaStep::linear_pair(const void* x, int64_t rows, int64_t in, const LinearOut& first,
                           const LinearOut& second) {
  if (first.w.fp8() || second.w.fp8()) {
    linear(x, rows, in, first.w, first.out, first.y, first.y_type);
    linear(x, rows, in, second.w, second.out, second.y, second.y_type);
    return;
  }
  auto params = [&](const LinearOut& o) {
    return cuda::linear_params(x, rows, in, o.w.w.raw(), o.out, o.y, o.y_type);
  };
  cuda::gemm_pair(x_.blas, params(first), params(second));
}

void CudaStep::linear(const void* x, int64_t rows, int64_t in, const DeviceLinear& w, int64_t out,
                      void* y, DType y_type, float beta) {
  if (!w.fp8()) {
    cuda::linear(x_.blas, x, rows, in, w.w.raw(), out, y, y_type, beta);
    return;
  }
  cuda::fp8_quantize_rows({.x = x,
                           .x_dtype = DType::kBF16,
                           .m = rows,
                           .k = in,
                           .ldx = in,
                           .q = b_.fp8_x.data<uint8_t>(),
                           .scale = b_.fp8_scale.data<float>()},
                          x_.stream);
  const cuda::Fp8GemmParams p{.qx = b_.fp8_x.data<uint8_t>(),
                              .sx = b_.fp8_scale.data<float>(),
                              .m = rows,
                              .k = in,
                              .w = w.w.data<uint8_t>(),
                              .w_scale = w.scale.data<float>(),
                              .n = out,
                              .y = y,
                              .y_dtype = y_type,
                              .ldy = out,
                              .beta = beta};
  // Prefill-sized products on tensor cores, where cuBLASLt has an algorithm; fp8_gemm reads the
  // weights once per 16 rows, and is the one whose rows do not depend on the others.
  if (rows > cuda::kFp8GemmRowTile && !x_.batch_invariant && w.block_scale.defined() &&
      cuda::fp8_gemm_lt(x_.blas, p, w.block_scale.data<float>())) {
    return;
  }
  cuda::fp8_gemm(p, x_.stream);
}

void CudaStep::mlp(const DeviceMlp& w, const bf16* x, float* out) {
  const int64_t T = meta_.T, D = c_.hidden_size;
  linear(x, T, D, w.gate_up, 2 * w.width, b_.gate_up.raw(), DType::kF32);
  cuda::silu_mul_bf16({.gate_up = b_.gate_up.data<float>(),
                       .out = b_.act.data<bf16>(),
                       .rows = T,
                       .width = w.width},
                      x_.stream);
  linear(b_.act.raw(), T, w.width, w.down, D, out, DType::kF32);
}

}  // namespace mla
