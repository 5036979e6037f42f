// Absorbed-MLA decode for steps of a few tokens, from the query to W_UV's output in one kernel.
// For each token t (one per sequence: a pure decode step) and local head h:
//   q_rope = RoPE(q[t, h, d_n:])                    fp32, rounded to bf16 (as cuda::rope_bf16)
//   q~     = W_UK[h]^T q[t, h, :d_n]                fp32 sums, rounded to bf16 (as the product)
//   o~     = softmax(scale (q~ . c + q_rope . k_r)) c    over the sequence's keys, fp32
//   out    = W_UV[h] bf16(o~)                       fp32 sums, rounded to bf16     [T, H, d_v]
// -- what a decode step otherwise runs as five dependent kernels (the W_UK^T product, RoPE, the
// split-KV attention and its combine, the W_UV product), each a launch and a round trip through
// memory. At batch 1 and a short context those kernels read little and wait on each other; here
// W_UK[h] and the block's first page (but for the newest key, which latent_store writes earlier
// in the step) are staged into shared memory while the kernel before still runs
// (programmatic dependent launch), and W_UV[h] streams in behind the block's last page. Older
// keys must not change during the step (one new token per sequence: a pure decode step).
//
// Grid (splits, heads, tokens): a block attends one range of its sequence's 64-key pages and
// leaves its partial o~ and LSE in the workspace; the last block of a (token, head) to finish
// merges the partials by LSE in split order (so results do not depend on which block is last)
// and applies W_UV. Scores, softmax and o~ stay in fp32 (the split-KV kernel rounds P to bf16
// for its tensor cores); the kernel reads only keys [0, num_keys[t]) of pages named by the
// block table. Launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mla::cuda {

// The shapes the kernel is built for (DeepSeek-V2-Lite, V2 and V3 alike).
inline constexpr int32_t kMlaDecodeFusedNopeDim = 128;   // d_n (qk_nope_head_dim)
inline constexpr int32_t kMlaDecodeFusedValueDim = 128;  // d_v (v_head_dim)
// Decode steps it is meant for: few tokens and short contexts. It reads the cache once per
// (token, head) where the split-KV kernels share each page among the heads, and each block walks
// its pages one after another; so it runs only where every (token, head) gets at least two SMs'
// worth of splits and a block at most kMlaDecodeFusedMaxPagesPerBlock pages.
inline constexpr int32_t kMlaDecodeFusedMaxTokens = 4;
inline constexpr int32_t kMlaDecodeFusedMaxKeys = 2048;
inline constexpr int32_t kMlaDecodeFusedMaxPagesPerBlock = 4;

struct MlaDecodeFusedParams {
  const __nv_bfloat16* q;     // [T, heads, d_n + d_r]: q_nope, then q_rope before RoPE
  const __nv_bfloat16* kv_b;  // [heads, d_n + d_v, d_c]: W_UK[h] rows, then W_UV[h] rows
  const int32_t* positions;   // [T]: absolute positions, for the rotation
  const float* inv_freq;      // [d_r / 2]
  float attention_factor;     // scales cos and sin (YaRN's mscale)
  bool interleave;            // rope_interleave, as in RopeBf16Params
  const void* pool;           // bf16 rows [num_pages, num_layers, 64, d_c + d_r]
  int32_t layer, num_layers;
  const int32_t* block_table;  // [T, table_stride]: page ids of token t's sequence
  int32_t table_stride;
  const int32_t* num_keys;  // [T]: keys token t attends, in [0, max_keys]
  int32_t max_keys;         // bound on num_keys (sizes the splits), <= kMlaDecodeFusedMaxKeys
  float scale;              // softmax scale
  __nv_bfloat16* out;       // [T, heads, d_v]
  int32_t T, heads;
  int num_sms;  // the device's, for the split count
};

// Whether the kernel is built for these dimensions (d_c kMlaDecodeLatentDim, d_r
// kMlaDecodeRopeDim, pages of kMlaDecodeBlockSize, d_n and d_v above).
bool mla_decode_fused_supports(int64_t d_c, int64_t d_r, int64_t d_n, int64_t d_v,
                               int64_t block_size);

// The pages [first, last) of a sequence with `keys` keys that split `split` of `splits` attends
// (64 keys a page; splits past the sequence's pages get none: first >= last).
struct MlaDecodeFusedPages {
  int32_t first, last;
};
__host__ __device__ inline MlaDecodeFusedPages mla_decode_fused_pages(int32_t keys, int32_t splits,
                                                                      int32_t split) {
  const int32_t pages = (keys + 63) / 64;
  const int32_t per_split = (pages + splits - 1) / splits;
  const int32_t first = split * per_split;
  return {first, first + per_split < pages ? first + per_split : pages};
}

// The number of splits the kernel runs for this shape (the grid's x).
int32_t mla_decode_fused_splits(int32_t T, int32_t heads, int32_t max_keys, int num_sms);

// Whether a step of T tokens, `heads` heads and at most max_keys keys a token is one the kernel
// is meant for, on a device of num_sms SMs (see above).
bool mla_decode_fused_fits(int32_t T, int32_t heads, int32_t max_keys, int num_sms);

// Bytes of workspace for `heads` heads on a device of num_sms SMs (any T up to
// kMlaDecodeFusedMaxTokens). It ends in one counter per (token, head), which must be zero before
// the first launch (zero the whole workspace once); every launch leaves them zero again.
size_t mla_decode_fused_workspace_bytes(int32_t heads, int num_sms);

// Enqueues the kernel as a programmatic dependent of the previous kernel on `stream`. Throws
// kInvalidArgument where mla_decode_fused_fits is false, the layer is outside the pool, or the
// workspace is shorter than mla_decode_fused_workspace_bytes(heads, num_sms).
void mla_decode_fused(const MlaDecodeFusedParams& p, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream);

}  // namespace mla::cuda
