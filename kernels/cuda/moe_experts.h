// Routed MoE experts on the GPU, for all tokens and all of this rank's experts at once:
//   out[t] += sum over k with ids[t, k] local of
//             weights[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = ids[t, k]
// The CPU path (DeepseekModel::moe) runs one SwiGLU MLP per expert on its gathered tokens.
//
// Four kernels, all sized from (tokens, top_k, local_experts, d, inter) only, so a launch is
// CUDA-graph capturable and never reads device values on the host:
//   1. dispatch: counts the (token, k) slots of each local expert and lists them grouped by
//      expert (ascending slot order inside an expert), cut into row tiles;
//   2. grouped GEMM 1 (bf16 tensor cores, fp32 accumulate): each tile's gathered x rows times
//      its expert's gate and up rows, SiLU(gate) * up fused, rounded to bf16;
//   3. grouped GEMM 2: those activations times the expert's down rows, fp32;
//   4. combine: out[t] += w[t, k] * y[slot (t, k)], adding the token's slots in k order.
// GEMM blocks loop over (tile, column block) pairs that exist, so experts without tokens cost
// nothing; an expert's weights are read once per tile of up to 16 rows (64 rows when the batch
// averages 32 or more slots per expert). No float atomics: the result is deterministic.
// With few slots (decode at batch 1 or 2: at most gemv_max_slots) kernels 1-3 give way to two
// weight-streaming kernels, one block row per slot, that stream the slot's expert rows at close
// to copy bandwidth (row_dots.cuh; an expert picked by two slots is read twice) as programmatic
// dependent launches; the combine is the same. There the shared experts may come along
// (MoeExpertsParams::shared): each token's shared MLP is one more row of the same two kernels,
// its weights streamed at the routed experts' rate, which saves the decode step the shared
// MLP's three launches (two small products and the SwiGLU) per MoE layer.
//
// Precision: inputs bf16, products accumulated in fp32; the activations between the GEMMs are
// rounded to bf16 (as a bf16 model would store them); y and out stay fp32.
// Launchers take a stream and never synchronise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mla::cuda {

inline constexpr int64_t kMoeMaxLocalExperts = 256;
inline constexpr int64_t kMoeMaxTopK = 32;
// Default MoeExpertsParams::gemv_max_slots: DeepSeek-V2/V3 decode at batch 1 and 2.
inline constexpr int64_t kMoeGemvMaxSlots = 16;

// The shared experts of a MoE layer: one SwiGLU MLP of width `inter` (n_shared_experts x
// moe_intermediate_size, this rank's share of it under tensor parallelism) every token goes
// through, unweighted.
struct MoeSharedExperts {
  const __nv_bfloat16* gate_up = nullptr;  // [2 * inter, d]: gate rows, then up rows
  const __nv_bfloat16* down = nullptr;     // [d, inter]
  __nv_bfloat16* act = nullptr;            // [tokens, inter] scratch: SiLU(gate) * up
  int64_t inter = 0;                       // a multiple of 8; 0: no shared experts here
};

struct MoeExpertsParams {
  const __nv_bfloat16* x;        // [tokens, d] the FFN input (post-attention RMSNorm)
  const int32_t* ids;            // [tokens, top_k] global expert ids, as moe_gate writes them
  const float* weights;          // [tokens, top_k] routing weights
  const __nv_bfloat16* gate_up;  // [local_experts, 2 * inter, d]: gate rows, then up rows
  const __nv_bfloat16* down;     // [local_experts, d, inter]
  float* out;                    // [tokens, d]: the routed experts' sum is added to it
  int64_t tokens, top_k;         // top_k in [1, kMoeMaxTopK]
  int64_t d, inter;              // multiples of 8
  int64_t experts;               // routed experts of the whole model (picks the tile size)
  // This rank holds experts [first_expert, first_expert + local_experts); slots routed
  // elsewhere are skipped (another rank adds them). local_experts <= kMoeMaxLocalExperts.
  int64_t first_expert, local_experts;
  // tokens * top_k up to this many slots run the weight-streaming kernels instead of the tiled
  // GEMMs (0: never). Default: kMoeGemvMaxSlots.
  int64_t gemv_max_slots = kMoeGemvMaxSlots;
  // Only where moe_experts_streams(*this): the shared experts, run in the weight-streaming
  // kernels. Then out[t] = shared(x[t]) + the routed sum: out's earlier contents are not read.
  MoeSharedExperts shared{};
};

// Whether p runs the weight-streaming kernels (tokens * top_k <= gemv_max_slots, and their
// grid, a row per slot and per token, within CUDA's 65,535 rows), the path that can take the
// shared experts.
bool moe_experts_streams(const MoeExpertsParams& p);

// Workspace for up to max_tokens tokens. With S = max_tokens * top_k slots and
// R = min(S, S / 16 + min(S, local_experts)) row tiles: S * (2 * inter + 4 * d + 8) bytes (the
// bf16 activations, the fp32 expert outputs, two slot lists) + 8 * R (the tile list)
// + 4 * (local_experts + 2), each of the 8 parts rounded up to 256 bytes. DeepSeek-V3
// (d 7168, inter 2048, top_k 8): 256 KiB per token.
size_t moe_experts_workspace_bytes(int64_t max_tokens, int64_t top_k, int64_t local_experts,
                                   int64_t d, int64_t inter);

// x, gate_up, down and out must be 16-byte aligned (and the shared experts' gate_up, down and
// act); `workspace` 256-byte aligned, of at least moe_experts_workspace_bytes(tokens, top_k,
// local_experts, d, inter) bytes (a workspace sized for more tokens serves fewer). Throws
// kInvalidArgument for shared experts on a call that does not stream.
void moe_experts(const MoeExpertsParams& p, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream);

}  // namespace mla::cuda
