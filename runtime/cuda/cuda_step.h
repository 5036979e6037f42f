// CudaStep: one forward step of the DeepSeek model on the GPU, enqueued on the runner's stream
// (the body of an uncaptured step and of every captured graph). bf16 operands (fp8 weights with
// block-scaled products under fp8_weights keep), fp32 accumulation and residual stream. Notation as
// in runtime/model_config.h.
//
// A layer, in paper order (each named tensor is one the step dumps when asked,
// ModelRunner::set_dump):
//   attn_norm  x_n = RMSNorm(x)                                            [T, D]
//   q          = W_qb RMSNorm(W_qa x_n) (or W_q x_n): q_nope [T, H_l, d_n], q_rope [T, H_l, d_r]
//   latent     c = RMSNorm(W_kva x_n [:d_c]),  k_rope = RoPE(W_kva x_n [d_c:])  -> the cache
//   latent form      q_absorbed q~ = W_UK^T q_nope (factored) or W_Q' x (premerged)  [T, H_l, d_c]
//                    p = softmax(scale (q~ . c + q_rope . k_rope)),  o~ = sum p c
//                    attn_out = W_o (W_UV o~)  (factored)  or  W_O' o~  (premerged)
//   decompressed     k = [W_UK c ; k_rope], v = W_UV c over the context, MHA, attn_out = W_o o
//   ffn_norm, ffn_out (dense SwiGLU or MoE), layer_out = x after both residual adds.
// Under a sequence-sharded cache the latent form's attention is distributed: all-gather the
// absorbed queries of all H heads, attend them over this rank's pages, all-to-all the partial
// outputs and LSEs to the ranks owning the heads, merge by LSE.
#pragma once

#include <cuda_runtime.h>

#include "kernels/cuda/fp8_latent.h"
#include "kernels/cuda/gemm.h"
#include "parallel/communicator.h"
#include "runtime/cuda/device_weights.h"
#include "runtime/cuda/step_buffers.h"
#include "runtime/cuda/step_metadata.h"
#include "runtime/cuda/step_profiler.h"
#include "runtime/forward_batch.h"
#include "runtime/latent_cache.h"

namespace mla {

class TensorDump;

// Everything a step reads and writes, bound by the runner.
struct CudaStepContext {
  const ModelConfig& config;
  const ShardPlan& shard;
  const DeviceWeights& weights;
  bool premerged;  // the latent form's weights are W_Q' and W_O'
  float scale;     // softmax scale
  float rope_factor;
  int num_sms;
  cudaStream_t stream;
  const cuda::Blas& blas;
  StepBuffers& buffers;
  StepProfiler& profiler;
  LatentCache& cache;
  Communicator* comm;  // null for one rank
  bool ordered;        // comm enqueues its collectives on `stream` (no host syncs)
  TensorDump* dump;    // null unless named intermediates are wanted (never in graphs)
  // ModelOptions::deterministic: batch-invariant products (blas), single-split latent
  // attention for every token (no mla_decode plan, which cuts the whole batch's keys), and the
  // tiled expert kernels at any batch.
  bool batch_invariant;
  // CudaOptions::prefetch_weights: layers prefetch weights on `side_stream`, forked from and
  // joined back to `stream` through the two events (all three owned by the runner).
  bool prefetch_weights;
  bool fused_attention;  // CudaOptions::fused_attention
  cudaStream_t side_stream;
  cudaEvent_t fork, join;
  int64_t l2_bytes;
};

// The kernels' name for how a device cache stores its rows.
cuda::LatentElement latent_element(CacheStorage storage);

class CudaStep {
 public:
  CudaStep(const CudaStepContext& ctx, const ForwardBatch& batch, const StepMetadata& meta)
      : x_(ctx), c_(ctx.config), b_(ctx.buffers), batch_(batch), meta_(meta) {}

  // Enqueues the step up to the logits of the sequences that want them (rows in batch order,
  // in buffers.logits).
  void enqueue();

 private:
  const int32_t* meta(int64_t offset) const { return b_.meta_dev.data<int32_t>() + offset; }
  void attention(int64_t l, const DeviceLayer& d);
  void latent_attention(int64_t l, const __nv_bfloat16* q_local);
  // Whether this step's latent attention runs as cuda::mla_decode_fused (from the query to
  // W_UV's output), given that RoPE would write the query's rotary block into q~ directly.
  bool fused_attention(bool rope_into_latent) const;
  // cuda::mla_decode_fused: o_v [T, H_l, d_v] from q [T, H_l, d_qk] (unrotated) and the cache.
  void fused_latent_attention(int64_t l, const DeviceLayer& d);
  void decompressed(int64_t l, const DeviceLayer& d);
  void ffn(const DeviceLayer& d);
  // CudaOptions::prefetch_weights: at decode's few tokens, a MoE layer's o_proj and shared
  // experts into L2 on the side stream, forked here (after the query and latent products).
  void prefetch_after_attention_inputs(const DeviceLayer& d);
  void mlp(const DeviceMlp& w, const __nv_bfloat16* x, float* out);
  // y [rows, out] = x [rows, in] (bf16) times w^T (+ beta y): cuBLAS for a bf16 weight; for an
  // fp8 weight, x quantised per row and 128 columns, then cuda::fp8_gemm_lt for more rows than
  // a tile of fp8_gemm (unless batch-invariant), else (or where cuBLASLt has no algorithm)
  // cuda::fp8_gemm.
  void linear(const void* x, int64_t rows, int64_t in, const DeviceLinear& w, int64_t out, void* y,
              DType y_type, float beta = 0.0f);
  // One product of linear()'s: y [rows, out] of y_type from weight w.
  struct LinearOut {
    const DeviceLinear& w;
    int64_t out;
    void* y;
    DType y_type;
  };
  // Two products of the same x: one launch where both weights are bf16 and the small-row
  // kernel takes them (cuda::gemm_pair), else linear() twice.
  void linear_pair(const void* x, int64_t rows, int64_t in, const LinearOut& first,
                   const LinearOut& second);
  void all_reduce(float* data, int64_t n);
  bool dumps(const char* name, int64_t layer) const;
  // Dumps `rows` x `cols` values of a device tensor, taken `cols` at a time every `stride`
  // elements from `data` (bf16 or fp32), as fp32 of `shape`.
  void dump(const char* name, int64_t layer, const void* data, DType dtype, int64_t rows,
            int64_t cols, int64_t stride, std::vector<int64_t> shape);
  // layer_out: the residual stream after the layer (x + the FFN's delta, which the next
  // layer's norm adds).
  void dump_layer_out(int64_t layer);
  // latent and k_rope of the step's tokens, read back from the cache pages.
  void dump_latents(int64_t layer);
  cuda::LatentElement latent_element() const { return mla::latent_element(x_.cache.storage()); }
  // Whether few-token steps take the weight-streaming kernels (small-row products, experts,
  // the fused router): CudaOptions::small_gemm, and not the deterministic option, since they
  // sum in another order than the kernels whose rows do not depend on the batch.
  bool small_row_kernels() const {
    return x_.blas.options().small_gemm && !x_.blas.options().batch_invariant;
  }
  // final_norm and logits of every row.
  void dump_final();

  const CudaStepContext& x_;
  const ModelConfig& c_;
  StepBuffers& b_;
  const ForwardBatch& batch_;
  const StepMetadata& meta_;
  bool forked_ = false;  // the side stream has work not yet joined back to the step's stream
};

}  // namespace mla
