// What the two routed-expert paths (moe_experts.h: bf16 weights; moe_experts_fp8.h: fp8
// weights kept) share: the workspace layout, the dispatch that groups a batch's (token, k)
// slots by local expert and cuts them into row tiles, and the combine that adds the weighted
// expert outputs back into each token's row. Internal to kernels/cuda; include from .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/workspace_layout.h"

namespace mla::cuda::moe {

inline constexpr size_t kAlign = kWorkspaceAlign;
// The fewest rows a row tile of any path has (it bounds the tile list's size).
inline constexpr int kMinTileRows = 16;

// Upper bound on the row tiles of `slots` slots over `experts` experts, bm rows per tile:
// sum ceil(c_e / bm) <= slots / bm + (experts with a slot).
int64_t max_row_tiles(int64_t slots, int64_t experts, int64_t bm);

// Byte offsets of the workspace's parts; the fp8 parts are 0 bytes without fp8.
struct Layout {
  size_t offsets, num_tiles, tile_expert, tile_row, sorted_slot, slot_pos, act, y;
  size_t qx, sx, qact, sact;
  size_t bytes;
};

// The workspace of a batch of `tokens`; `fp8` adds the quantised activations.
Layout make_layout(int64_t tokens, int64_t top_k, int64_t local_experts, int64_t d, int64_t inter,
                   bool fp8);

// The workspace's parts as typed pointers.
// make_layout's bytes, for the public *_workspace_bytes functions; throws kInvalidArgument for
// a shape no batch has (d and inter below `min_width`).
size_t workspace_bytes(int64_t max_tokens, int64_t top_k, int64_t local_experts, int64_t d,
                       int64_t inter, int64_t min_width, bool fp8);

struct Plan {
  int32_t* offsets;         // [local_experts + 1] first sorted position of each local expert
  int32_t* num_tiles;       // [1] row tiles in use
  int32_t* tile_expert;     // [max tiles] local expert of each row tile
  int32_t* tile_row;        // [max tiles] first sorted position of each row tile
  int32_t* sorted_slot;     // [slots] slot (t * top_k + k) at each sorted position
  int32_t* slot_pos;        // [slots] sorted position of each slot; -1 where not local
  __nv_bfloat16* act;       // [slots, inter] SiLU(gate) * up, by sorted position
  float* y;                 // [slots, d] expert outputs, by sorted position
  uint8_t* qx = nullptr;    // fp8: [tokens, d] the input quantised, e4m3
  float* sx = nullptr;      // fp8: [tokens, d / 128] its scales
  uint8_t* qact = nullptr;  // fp8: [slots, inter] act quantised
  float* sact = nullptr;    // fp8: [slots, inter / 128]
};

// The plan in `workspace` for a batch of `tokens` (make_layout's parts). Throws
// kInvalidArgument for a workspace smaller than the layout or not kAlign-aligned.
Plan workspace_plan(void* workspace, size_t workspace_bytes, int64_t tokens, int64_t top_k,
                    int64_t local_experts, int64_t d, int64_t inter, bool fp8);

// Checks the shape every path shares (kInvalidArgument naming the bad value): tokens >= 0,
// top_k in [1, kMoeMaxTopK], d and inter positive multiples of `multiple`, the local experts
// inside the model's and at most kMoeMaxLocalExperts.
void check_shape(int64_t tokens, int64_t top_k, int64_t d, int64_t inter, int64_t multiple,
                 int64_t first_expert, int64_t local_experts, int64_t experts);

// Fills plan's offsets, tiles (of tile_rows rows, >= kMinTileRows), sorted_slot and slot_pos
// from ids [slots] (one block; positions inside an expert follow slot order).
void launch_dispatch(const int32_t* ids, int64_t slots, int64_t first_expert, int64_t local_experts,
                     int tile_rows, const Plan& plan, cudaStream_t stream);

// out[t] += sum over t's local slots, in k order, of weights[t, k] * y[slot_pos[t, k]];
// launched as a programmatic dependent of the kernel before it.
void launch_combine(const Plan& plan, const float* weights, float* out, int64_t tokens,
                    int64_t top_k, int64_t d, cudaStream_t stream);

}  // namespace mla::cuda::moe
