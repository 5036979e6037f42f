// Decompressed-form (MHA) causal attention for long prefill chunks on the GPU: the context
// latents have been up-projected to per-head k_nope and v, and the rotary key k_r is shared by
// all heads (or given per head). Varlen over sequences. The CPU reference is
// mla::cpu::dense_attention. Launchers take a stream, never synchronise and never allocate;
// everything is CUDA-graph capturable.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace mla::cuda {

// All strides are in elements, multiples of 8; all pointers 16-byte aligned.
struct MhaPrefillParams {
  // query (t, h): d_nope + d_rope values at q + t * q_token_stride + h * q_head_stride
  const __nv_bfloat16* q;
  // key j, head h: d_nope values at k_nope + j * kn_token_stride + h * kn_head_stride
  const __nv_bfloat16* k_nope;
  // key j, head h: d_rope values at k_rope + j * kr_token_stride + h * kr_head_stride
  // (kr_head_stride 0: one rotary key shared by all heads)
  const __nv_bfloat16* k_rope;
  // value j, head h: d_v values at v + j * v_token_stride + h * v_head_stride
  const __nv_bfloat16* v;
  int64_t q_token_stride, q_head_stride, kn_token_stride, kn_head_stride, kr_token_stride,
      kr_head_stride, v_token_stride, v_head_stride;
  const int32_t* cu_q;  // [num_seqs + 1]: sequence s's queries are [cu_q[s], cu_q[s + 1])
  const int32_t* cu_k;  // [num_seqs + 1]: its keys are [cu_k[s], cu_k[s + 1]), as many or more
  // max_q: host-known bound on any sequence's query count (sizes the grid).
  // d_nope, d_rope, d_v: multiples of 16; d_nope + d_rope in [16, 256], d_v in [16, 256]
  // (DeepSeek: 128, 64, 128). d_rope may be 0 (k_rope then unused).
  int32_t num_seqs, max_q, heads, d_nope, d_rope, d_v;
  float scale;
  __nv_bfloat16* out;  // [total_q, heads, d_v], contiguous
  float* lse;          // [total_q, heads]: natural log of sum_j exp(scaled score); may be null
};

// Causal with the queries at the end of the keys: query i of sequence s (0-based within the
// sequence) attends keys [0, nk - nq + i] of it, nq and nk its query and key counts (nk >= nq
// is the caller's promise; keys past nk are never read).
//   out[t, h] = sum_j softmax(s)_j v[j, h],
//   s_j = scale * (q_nope[t, h] . k_nope[j, h] + q_rope[t, h] . k_rope[j, h])
// Deterministic: the same inputs give bit-identical outputs.
void mha_prefill(const MhaPrefillParams& p, cudaStream_t stream);

// Why mha_prefill cannot run heads of these dimensions; empty when it can.
std::string mha_prefill_unsupported(int32_t d_nope, int32_t d_rope, int32_t d_v);

}  // namespace mla::cuda
