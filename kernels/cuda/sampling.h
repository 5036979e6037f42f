// Token sampling on the GPU: per row of fp32 logits, the token mla::sample_token
// (runtime/sampler.h) picks with that row's parameters, and its log-probability as
// mla::token_logprob gives it. Greedy rows take the argmax (lowest index on ties); sampled
// rows sort the whole row (stable, descending: ties by ascending id, as the CPU orders its
// candidates), then walk the sorted row in double precision exactly as the CPU does: top_k
// cut, top_p cut, inverse CDF of the draw uniform_for(seed, position).
//
// Agreement with the CPU: every decision compares the draw (or top_p x total) against
// running sums of exp() in double. Those sums are formed in a different order here, and
// CUDA's and glibc's double exp may differ in the last ulp, so a sum can differ from the
// CPU's by ~1e-16 relative; the token differs only when the draw falls that close to a
// boundary between two tokens' cumulative masses (about one draw in 1e13).
//
// Launchers take a stream, never synchronise, never allocate, and are CUDA-graph capturable.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mla::cuda {

// One request's sampling parameters, as mla::SamplingParams holds them (validated by the
// caller: the device does not check them), plus the position its draw is for.
struct SampleRow {
  float temperature;  // 0 greedy, else > 0 and finite
  int32_t top_k;      // in [0, vocab]; 0 keeps all
  float top_p;        // in (0, 1]
  uint64_t seed;
  int64_t position;  // the draw is uniform_for(seed, position)
};

struct SampleParams {
  const float* logits;      // [rows, vocab]; free of NaN and +inf, a finite value per row
  const SampleRow* params;  // [rows], device memory
  int32_t* tokens;          // [rows]
  float* logprobs;          // [rows]: log_softmax(logits)[token] at temperature 1
  int64_t rows, vocab;      // rows * vocab <= INT32_MAX
  // Every row takes the argmax whatever its temperature, and the sort is skipped: for steps
  // where the host knows every request is greedy.
  bool all_greedy = false;
};

// Bytes of the device copy of `rows` SampleRows.
inline size_t sampling_params_bytes(int64_t rows) {
  return static_cast<size_t>(rows) * sizeof(SampleRow);
}

// Workspace for up to `rows` rows of `vocab` logits: about 16 * rows * vocab bytes (the sort's
// double-buffered keys and ids) plus the sort's scratch. Queries the current device (the
// sort's tuning depends on it).
size_t sampling_workspace_bytes(int64_t rows, int64_t vocab);

// Three kernels: a pass per row (max, argmax, softmax sums; greedy rows finish there), the
// segmented sort of the sampled rows (greedy rows are empty segments), and a block per sampled
// row walking its sorted head. `workspace` is 256-byte aligned, workspace_bytes at least
// sampling_workspace_bytes(p.rows, p.vocab).
void sample(const SampleParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace mla::cuda
