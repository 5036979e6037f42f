#include "runtime/cuda/step_buffers.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/mla_decode.h"
#include "kernels/cuda/mla_decode_fused.h"
#include "kernels/cuda/moe_experts.h"
#include "kernels/cuda/moe_experts_fp8.h"
#include "kernels/cuda/sampling.h"

namespace mla {

StepBuffers::~StepBuffers() {
  if (meta_host != nullptr) cudaFreeHost(meta_host);
}

template <typename Alloc>
void StepBuffers::layout(int64_t T, int64_t S, Alloc&& alloc) const {
  const ModelConfig& c = *sizing_.config;
  const ShardPlan& shard = sizing_.shard;
  const int64_t D = c.hidden_size, H = c.num_heads, H_l = shard.local_heads(), P = shard.tp_size(),
                d_c = c.kv_lora_rank, d_lat = c.latent_width(), d_qk = c.qk_head_dim(),
                d_v = c.v_head_dim, d_r = c.qk_rope_head_dim;
  // The runner's cache has the model's shard plan (ModelRunner checks it).
  const bool sharded = !shard.holds_every_page();
  const int64_t H_a = sharded ? H : H_l;
  const int64_t width = std::max<int64_t>(sizing_.max_mlp_width, 1);
  const DType f32 = DType::kF32, b16 = DType::kBF16, i32 = DType::kI32, u8 = DType::kU8;
  alloc(&StepBuffers::x, {T, D}, f32);
  alloc(&StepBuffers::delta, {T, D}, f32);
  alloc(&StepBuffers::xn, {T, D}, b16);
  alloc(&StepBuffers::xn32, {T, D}, f32);
  if (c.q_lora_rank > 0) {
    alloc(&StepBuffers::qa32, {T, c.q_lora_rank}, f32);
    alloc(&StepBuffers::qn, {T, c.q_lora_rank}, b16);
  }
  alloc(&StepBuffers::kv32, {T, d_lat}, f32);
  alloc(&StepBuffers::q, {T, H_l * d_qk}, b16);
  alloc(&StepBuffers::q_rope, {T, H_l * d_r}, b16);
  alloc(&StepBuffers::q_latent, {T, H_l * d_lat}, b16);
  if (sharded) {
    alloc(&StepBuffers::q_gathered, {P * T, H_l * d_lat}, b16);
    alloc(&StepBuffers::q_ordered, {T, H * d_lat}, b16);
    alloc(&StepBuffers::a2a_send, {P * T, H_l * d_c}, b16);
    alloc(&StepBuffers::a2a_recv, {P * T, H_l * d_c}, b16);
    alloc(&StepBuffers::lse_send, {P * T, H_l}, f32);
    alloc(&StepBuffers::lse_recv, {P * T, H_l}, f32);
    alloc(&StepBuffers::o_attended, {T, H_a * d_c},
          b16);  // unsharded, attention writes o_latent directly
  }
  alloc(&StepBuffers::lse, {T, H_a}, f32);
  alloc(&StepBuffers::o_latent, {T, H_l * d_c}, b16);
  alloc(&StepBuffers::o_v, {T, H_l * d_v}, b16);
  alloc(&StepBuffers::gate_up, {T, 2 * width}, f32);
  alloc(&StepBuffers::act, {T, width}, b16);
  if (sizing_.fp8_max_in > 0) {
    alloc(&StepBuffers::fp8_x, {T, sizing_.fp8_max_in}, u8);
    alloc(&StepBuffers::fp8_scale, {T, sizing_.fp8_max_in / 128}, f32);
  }
  if (c.n_routed_experts > 0) {
    const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, E_l = E / P;
    alloc(&StepBuffers::router_logits, {T, E}, f32);
    alloc(&StepBuffers::topk_ids, {T, K}, i32);
    alloc(&StepBuffers::topk_weights, {T, K}, f32);
    alloc(&StepBuffers::route_counter, {1}, i32);
    const int64_t I = c.moe_intermediate_size;
    alloc(&StepBuffers::moe_workspace,
          {static_cast<int64_t>(sizing_.fp8_experts
                                    ? cuda::moe_experts_fp8_workspace_bytes(T, K, E_l, D, I)
                                    : cuda::moe_experts_workspace_bytes(T, K, E_l, D, I))},
          u8);
  }
  alloc(&StepBuffers::decode_workspace,
        {static_cast<int64_t>(cuda::mla_decode_workspace_bytes(
            static_cast<int32_t>(S), 1, static_cast<int32_t>(H_a), sizing_.num_sms))},
        u8);
  alloc(&StepBuffers::fused_workspace,
        {static_cast<int64_t>(
            cuda::mla_decode_fused_workspace_bytes(static_cast<int32_t>(H_l), sizing_.num_sms))},
        u8);
  alloc(&StepBuffers::x_last, {S, D}, b16);
  alloc(&StepBuffers::logits, {S, c.vocab_size}, f32);
  alloc(&StepBuffers::sampled, {S}, i32);
  alloc(&StepBuffers::logprobs, {S}, f32);
  alloc(&StepBuffers::sample_params, {static_cast<int64_t>(cuda::sampling_params_bytes(S))}, u8);
  alloc(&StepBuffers::sort_workspace,
        {static_cast<int64_t>(cuda::sampling_workspace_bytes(S, c.vocab_size))}, u8);
}

void StepBuffers::reserve(int64_t tokens, int64_t seqs) {
  if (tokens <= cap_tokens_ && seqs <= cap_seqs_) return;
  const int64_t T = std::max(tokens, cap_tokens_), S = std::max(seqs, cap_seqs_);
  generation_++;
  cap_tokens_ = cap_seqs_ = 0;  // until every buffer has its new size
  layout(T, S, [this](Tensor StepBuffers::*buffer, Shape shape, DType dtype) {
    this->*buffer = Tensor();  // free the old buffer first: the new one may need its room
    this->*buffer = cuda::device_empty(std::move(shape), dtype);
  });
  // cuda::moe_route's launches leave their counter at zero; it starts there, before any step
  // (on a non-blocking stream, which a plain cudaMemset would not order against) runs.
  // So do cuda::mla_decode_fused's counters.
  if (route_counter.defined()) MLA_CUDA_CHECK(cudaMemset(route_counter.raw(), 0, sizeof(int32_t)));
  MLA_CUDA_CHECK(cudaMemset(fused_workspace.raw(), 0, fused_workspace.nbytes()));
  MLA_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  cap_tokens_ = T;
  cap_seqs_ = S;
}

int64_t StepBuffers::bytes_for(int64_t tokens, int64_t seqs) const {
  int64_t bytes = 0;
  layout(tokens, seqs, [&](Tensor StepBuffers::*, Shape shape, DType dtype) {
    int64_t n = dtype_size(dtype);
    for (int64_t d : shape) n *= d;
    bytes += n;
  });
  return bytes;
}

void StepBuffers::reserve_meta(int64_t words) {
  if (words <= meta_cap_) return;
  const int64_t n = std::max(words, 2 * meta_cap_);
  generation_++;
  meta_cap_ = 0;  // until both buffers have their new size
  if (meta_host != nullptr) MLA_CUDA_CHECK(cudaFreeHost(meta_host));
  meta_host = nullptr;
  meta_dev = Tensor();
  MLA_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&meta_host), n * sizeof(int32_t),
                               cudaHostAllocDefault));
  meta_dev = cuda::device_empty({n}, DType::kI32);
  meta_cap_ = n;
}

void StepBuffers::reserve_context(int64_t keys, int64_t local_keys) {
  const ModelConfig& c = *sizing_.config;
  const int64_t d_lat = c.latent_width(), H_l = sizing_.shard.local_heads(),
                d_kv = c.qk_nope_head_dim + c.v_head_dim, P = sizing_.shard.tp_size();
  if (!context.defined() || context.dim(0) < keys) {
    context = cuda::device_empty({keys, d_lat}, DType::kBF16);
    up = cuda::device_empty({keys, H_l * d_kv}, DType::kBF16);
  }
  if (P > 1 && (!context_all.defined() || context_all.dim(0) < P * local_keys)) {
    context_mine = cuda::device_empty({local_keys, d_lat}, DType::kBF16);
    context_all = cuda::device_empty({P * local_keys, d_lat}, DType::kBF16);
  }
}

void StepBuffers::reserve_prefill_workspace(size_t bytes) {
  if (!prefill_workspace.defined() || prefill_workspace.nbytes() < bytes) {
    prefill_workspace = cuda::device_empty({static_cast<int64_t>(bytes)}, DType::kU8);
  }
}

}  // namespace mla
