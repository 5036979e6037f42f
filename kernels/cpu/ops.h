// CPU reference ops, fp32. These define the numerics every other backend is tested against.
//
// All pointers are host memory, row-major, non-aliasing unless a function says "in place".
// Functions are thread-safe (no shared state); matrix products go through OpenBLAS.
#pragma once

#include <cstdint>

namespace mla::cpu {

// General product with leading dimensions: y = x * op(w) + beta * y, x [m, k] (row stride
// ldx), op(w) = w^T for w [n, k] when trans_w, else w [k, n]; y [m, n] (row stride ldy).
void gemm(bool trans_w, int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx,
          const float* w, int64_t ldw, float* y, int64_t ldy, float beta = 0.0f);
// gemm whose every row comes out the same whatever the number of rows m (the engine's
// deterministic option): a BLAS picks its kernel, and so a row's summation order, by the
// product's shape, so the rows go through it in tiles of exactly kInvariantRows, the last
// one padded with zero rows. Costs up to kInvariantRows - 1 rows of extra work per call.
inline constexpr int64_t kInvariantRows = 16;
void gemm_batch_invariant(bool trans_w, int64_t m, int64_t n, int64_t k, const float* x,
                          int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
                          float beta = 0.0f);
// y[m, n] = x[m, k] * w[n, k]^T + beta * y   (a Linear layer: w stored [out, in]);
// batch-invariant (as gemm_batch_invariant) when asked.
void matmul_nt(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
               float beta = 0.0f, bool batch_invariant = false);
// y[m, n] = x[m, k] * w[k, n] + beta * y
void matmul_nn(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
               float beta = 0.0f);

// y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w, for each of `rows` rows of width d.
// x and y may alias (in place).
void rms_norm(const float* x, int64_t rows, int64_t d, int64_t x_stride, const float* w, float eps,
              float* y, int64_t y_stride);

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, width + i]   gate_up: [rows, 2 * width]
void silu_mul(const float* gate_up, int64_t rows, int64_t width, float* out);

// Rotates `x` (d values) in place by angles pos * inv_freq[j], with cos/sin scaled by
// `attention_factor`. interleave: pairs (2j, 2j+1) rotate and the result is written
// de-interleaved (out[j], out[j + d/2]); otherwise pairs (j, j + d/2) rotate in place.
// cos_sin: [d/2] cos values followed by [d/2] sin values for this position (see rope_table).
// d <= kMaxRopeDim.
inline constexpr int64_t kMaxRopeDim = 512;
void rope_rotate(float* x, int64_t d, const float* cos_sin, bool interleave);
// cos_sin[d/2 + d/2] for one position, as transformers computes it in fp32.
void rope_table(int64_t pos, const float* inv_freq, int64_t d, float attention_factor,
                float* cos_sin);

// In-place softmax over n values; returns log(sum(exp(x))) of the input (the LSE).
float softmax_inplace(float* x, int64_t n);

// a[i] += b[i]
void add_inplace(float* a, const float* b, int64_t n);

// Paged latent attention (the absorbed MLA core): for each query token t and head h,
//   s_j = scale * (q_lat[t,h] . c_j + q_rope[t,h] . kr_j)  for keys j < num_keys[t]
//   out[t,h] = sum_j softmax(s)_j c_j,   lse[t,h] = log sum_j exp(s_j)
// Keys live in pages of `block_size` rows of width d_c + d_r (c then k_r); key j of the
// sequence is row j % block_size of page_ptrs[j / block_size].
struct LatentAttentionParams {
  const float* q_lat;             // [tokens, heads, d_c]
  const float* q_rope;            // [tokens, heads, d_r]
  const float* const* page_ptrs;  // [pages] -> [block_size, d_c + d_r]
  const int32_t* num_keys;        // [tokens] keys visible to each token (causal)
  int64_t tokens, heads, d_c, d_r, block_size;
  float scale;
  float* out;  // [tokens, heads, d_c]
  float* lse;  // [tokens, heads]; -inf where num_keys is 0
};
void latent_attention(const LatentAttentionParams& p);

// Merges P partial attention outputs of the same rows by their log-sum-exps (the last step of
// sequence-sharded attention; the reference of cuda::lse_merge):
//   out = sum_r exp(lse_r - m) part_r / sum_r exp(lse_r - m),  m = max_r lse_r,
//   out_lse = m + log(sum_r exp(lse_r - m)).
// A part with lse -inf (no visible keys) weighs nothing; a row with no part at all is 0.
struct LseMergeParams {
  const float* parts;  // [P, rows, d]
  const float* lse;    // [P, rows]
  int64_t P, rows, d;
  float* out;      // [rows, d]
  float* out_lse;  // [rows] or null
};
void lse_merge(const LseMergeParams& p);

// Dense causal attention in the decompressed (MHA) form for one sequence:
//   s = scale * q[t,h] . k[j,h],  out[t,h] = sum_j softmax(s)_j v[j,h],  j < num_keys[t]
struct DenseAttentionParams {
  const float* q;           // [tokens, heads, d_qk]
  const float* k;           // [keys, heads, d_qk]
  const float* v;           // [keys, heads, d_v]
  const int32_t* num_keys;  // [tokens]
  int64_t tokens, keys, heads, d_qk, d_v;
  float scale;
  float* out;  // [tokens, heads, d_v]
};
void dense_attention(const DenseAttentionParams& p);

}  // namespace mla::cpu
