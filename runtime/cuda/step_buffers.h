// StepBuffers: the device scratch a CUDA step runs in, sized for a token and sequence capacity
// and grown (never shrunk) when a step needs more, plus the pinned staging and device copy of
// the packed step metadata (runtime/cuda/step_metadata.h).
//
// Names follow the notation of runtime/cuda/cuda_step.h: T tokens, S sequences, H_l local heads,
// H_a heads attended on this rank (all H under a sequence-sharded cache, else H_l).
// Not thread-safe; lives on the device that was current when it was made.
#pragma once

#include <cstdint>

#include "kernels/tensor.h"
#include "parallel/shard_plan.h"
#include "runtime/model_config.h"

namespace mla {

struct StepBuffers {
  // What the sizes derive from (set once).
  struct Sizing {
    const ModelConfig* config = nullptr;
    ShardPlan shard{1, 0, 1};
    int64_t max_mlp_width = 0;
    int num_sms = 0;
    int64_t fp8_max_in = 0;    // DeviceWeights::fp8_max_in: room for quantised activations
    bool fp8_experts = false;  // the routed experts' workspace is moe_experts_fp8's
  };

  explicit StepBuffers(Sizing sizing) : sizing_(sizing) {}
  ~StepBuffers();
  StepBuffers(const StepBuffers&) = delete;
  StepBuffers& operator=(const StepBuffers&) = delete;

  // Makes room for a step of `tokens` tokens and `seqs` sequences. Growth moves buffers and
  // bumps generation() first; if an allocation fails part way the capacities drop to 0, so the
  // next step allocates everything again.
  void reserve(int64_t tokens, int64_t seqs);
  // Room for `words` int32 words of step metadata (moves like reserve()).
  void reserve_meta(int64_t words);
  // Decompressed form: room for a context of `keys` latents, and under a sharded cache
  // `local_keys` rows per rank. Never captured in graphs.
  void reserve_context(int64_t keys, int64_t local_keys);
  // The latent prefill kernel's workspace: its size depends on the step's shape.
  void reserve_prefill_workspace(size_t bytes);
  // Device bytes reserve(tokens, seqs) holds, without allocating (for cache sizing).
  int64_t bytes_for(int64_t tokens, int64_t seqs) const;

  int64_t token_capacity() const { return cap_tokens_; }
  // Changes whenever a buffer that CUDA graphs capture may have moved (even by a growth that
  // failed): graphs captured under another generation must not replay.
  uint64_t generation() const { return generation_; }

  // [T, D] residual stream, its update, the normalised bf16 activations; fp32 copy for the router
  Tensor x, delta, xn, xn32;
  Tensor qa32, qn;               // [T, d_q] q LoRA down-projection, normalised
  Tensor kv32;                   // [T, d_c + d_r] new latents before the norm and RoPE
  Tensor q;                      // [T, H_l, d_n + d_r]
  Tensor q_rope;                 // [T, H_l, d_r] premerged rope rows
  Tensor q_latent;               // [T, H_l, d_c + d_r] absorbed queries
  Tensor q_gathered, q_ordered;  // sharded: [P, T, H_l, d_c + d_r], [T, H, d_c + d_r]
  Tensor o_attended, lse;        // sharded: [T, H_a, d_c]; [T, H_a]
  Tensor o_latent;               // [T, H_l, d_c]
  Tensor o_v;                    // [T, H_l, d_v]
  Tensor a2a_send, a2a_recv;     // sharded: [P, T, H_l, d_c]
  Tensor lse_send, lse_recv;     // sharded: [P, T, H_l]
  Tensor gate_up, act;           // [T, 2 * width] fp32, [T, width] bf16
  Tensor fp8_x, fp8_scale;       // fp8 products: [T, fp8_max_in] e4m3 input, [T, fp8_max_in / 128]
  Tensor router_logits, topk_ids, topk_weights, moe_workspace;
  Tensor route_counter;  // [1] int32 for cuda::moe_route: zero between its launches
  Tensor decode_workspace, prefill_workspace;
  // cuda::mla_decode_fused's: its counters are zero between launches, and from reserve() on.
  Tensor fused_workspace;
  Tensor x_last, logits;  // [S, D] rows wanting logits, [S, V]
  Tensor sampled, logprobs, sample_params, sort_workspace;
  Tensor context, context_mine, context_all, up;  // decompressed form
  // Packed int32 step metadata: pinned host staging and its device copy.
  int32_t* meta_host = nullptr;
  Tensor meta_dev;

 private:
  // Calls alloc(&StepBuffers::buffer, shape, dtype) for every buffer a step of (tokens, seqs)
  // needs: one list serves allocation and sizing.
  template <typename Alloc>
  void layout(int64_t tokens, int64_t seqs, Alloc&& alloc) const;

  Sizing sizing_;
  int64_t cap_tokens_ = 0, cap_seqs_ = 0, meta_cap_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace mla
