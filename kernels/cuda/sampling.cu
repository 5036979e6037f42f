#include <climits>
#include <cstddef>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/sampling.h"
#include "kernels/cuda/workspace_layout.h"

namespace mla::cuda {
namespace {

constexpr int kPrepareThreads = 512;
constexpr int kPickThreads = 256;
constexpr int kPickItems = 4;  // consecutive sorted candidates per thread per chunk
constexpr int64_t kChunk = kPickThreads * kPickItems;
constexpr size_t kAlign = kWorkspaceAlign;
constexpr unsigned kFull = 0xffffffffu;

// mla::uniform_for (runtime/sampler.cpp), bit for bit.
__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__device__ __forceinline__ double uniform_for(uint64_t seed, int64_t position) {
  const uint64_t bits = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(position)));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// Byte offsets of the workspace's parts.
struct Layout {
  size_t row_max, lse_sum, total, begin, end, keys[2], ids[2], sort_temp;
  size_t sort_temp_bytes, bytes;
};

Layout make_layout(int64_t rows, int64_t vocab) {
  Layout l{};
  WorkspaceLayout parts;
  const auto r = static_cast<size_t>(rows), n = static_cast<size_t>(rows * vocab);
  l.row_max = parts.take(r * sizeof(float));
  l.lse_sum = parts.take(r * sizeof(double));
  l.total = parts.take(r * sizeof(double));
  l.begin = parts.take(r * sizeof(int32_t));
  l.end = parts.take(r * sizeof(int32_t));
  for (int b = 0; b < 2; ++b) {
    l.keys[b] = parts.take(n * sizeof(float));
    l.ids[b] = parts.take(n * sizeof(int32_t));
  }
  cub::DoubleBuffer<float> keys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> ids(nullptr, nullptr);
  MLA_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, l.sort_temp_bytes, keys, ids, static_cast<int>(n), static_cast<int>(rows),
      static_cast<int32_t*>(nullptr), static_cast<int32_t*>(nullptr)));
  l.sort_temp = parts.take(l.sort_temp_bytes);
  l.bytes = parts.bytes();
  return l;
}

// The workspace's parts as typed pointers.
struct RowState {
  float* row_max;   // [rows] max logit
  double* lse_sum;  // [rows] sum exp(logit - max): token_logprob's sum
  double* total;    // [rows] sum exp((logit - max) / temperature) over the row, top_k == 0 only
  int32_t* begin;   // [rows] sort segment of each row: empty for greedy rows
  int32_t* end;     // [rows]
  float* keys;      // [rows, vocab] the sort's input: the logits of sampled rows
  int32_t* ids;     // [rows, vocab] the sort's input values: 0, 1, ..., vocab - 1
};

struct Best {
  float value;
  int32_t index;
};

// Larger value, then lower index: the CPU's first-maximum scan (as in argmax.cu).
__device__ __forceinline__ Best better(Best a, Best b) {
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

template <int Threads>
__device__ Best block_best(Best b) {
  __shared__ Best partial[Threads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    b = better(
        b, Best{__shfl_xor_sync(kFull, b.value, offset), __shfl_xor_sync(kFull, b.index, offset)});
  }
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = b;
  __syncthreads();
  b = partial[0];
  for (int w = 1; w < Threads / 32; ++w) b = better(b, partial[w]);
  return b;
}

// Every thread gets the same sum, added in the same order.
template <int Threads>
__device__ double block_sum(double v) {
  __shared__ double partial[Threads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFull, v, offset);
  __syncthreads();  // a previous call's readers are done with `partial`
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  v = 0;
  for (int w = 0; w < Threads / 32; ++w) v += partial[w];
  return v;
}

// One block per row: the max and argmax, then token_logprob's sum and (for sampled rows
// without top_k) the sampling mass, each in double as on the CPU. Greedy rows end here.
__global__ void __launch_bounds__(kPrepareThreads)
    sample_prepare_kernel(SampleParams p, RowState s) {
  const int64_t row = blockIdx.x, vocab = p.vocab;
  const float* lg = p.logits + row * vocab;
  // Threads without an element hold (-inf, INT32_MAX), which loses to any real element.
  Best b{-INFINITY, INT32_MAX};
  for (int64_t i = threadIdx.x; i < vocab; i += kPrepareThreads) {
    const float v = lg[i];
    if (v > b.value || b.index == INT32_MAX) b = {v, static_cast<int32_t>(i)};
  }
  b = block_best<kPrepareThreads>(b);

  const float temperature = p.params[row].temperature;
  const bool sampled = !p.all_greedy && temperature != 0.0f;
  const bool whole_row_mass = sampled && p.params[row].top_k == 0;
  const double max_logit = b.value, t = temperature;
  float* keys = s.keys + row * vocab;
  int32_t* ids = s.ids + row * vocab;
  double lse = 0, total = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += kPrepareThreads) {
    const float v = lg[i];
    lse += exp(v - max_logit);
    if (whole_row_mass) total += exp((v - max_logit) / t);
    if (sampled) {
      keys[i] = v;
      ids[i] = static_cast<int32_t>(i);
    }
  }
  lse = block_sum<kPrepareThreads>(lse);
  total = block_sum<kPrepareThreads>(total);
  if (threadIdx.x == 0) {
    s.row_max[row] = b.value;
    s.lse_sum[row] = lse;
    s.total[row] = total;
    s.begin[row] = static_cast<int32_t>(row * vocab);
    s.end[row] = static_cast<int32_t>(row * vocab + (sampled ? vocab : 0));
    if (!sampled) {
      p.tokens[row] = b.index;
      p.logprobs[row] = static_cast<float>(lg[b.index] - max_logit - log(lse));
    }
  }
}

using BlockScan = cub::BlockScan<double, kPickThreads>;

struct ScanShared {
  typename BlockScan::TempStorage scan;
  unsigned long long first;
  double prefix;
};

struct Found {
  int64_t index;  // the first candidate whose running mass satisfies the test, or n
  double prefix;  // the running mass through that candidate (through all n if none)
};

struct Never {
  __device__ bool operator()(double) const { return false; }
};
struct Reaches {  // the CPU's top_p loop stops once kept_total >= mass
  double mass;
  __device__ bool operator()(double prefix) const { return prefix >= mass; }
};
struct Exceeds {  // the CPU's draw picks the first candidate with target < cumulative
  double target;
  __device__ bool operator()(double prefix) const { return target < prefix; }
};

// Walks the first n sorted candidates in chunks, summing exp((logit - max) / t) in double:
// the CPU's running sums, each formed here as a chunk carry plus a block scan.
template <class Test>
__device__ Found scan_until(const float* keys, int64_t n, double max_logit, double t, Test test,
                            ScanShared& shared) {
  double carry = 0;
  for (int64_t base = 0; base < n; base += kChunk) {
    const int64_t mine = base + threadIdx.x * kPickItems;
    double w[kPickItems];
#pragma unroll
    for (int j = 0; j < kPickItems; ++j) {
      w[j] = mine + j < n ? exp((keys[mine + j] - max_logit) / t) : 0.0;
    }
    double chunk_total;
    BlockScan(shared.scan).InclusiveSum(w, w, chunk_total);
    int64_t hit = -1;
    double hit_prefix = 0;
#pragma unroll
    for (int j = 0; j < kPickItems; ++j) {
      if (hit < 0 && mine + j < n && test(carry + w[j])) {
        hit = mine + j;
        hit_prefix = carry + w[j];
      }
    }
    if (__syncthreads_or(hit >= 0)) {
      if (threadIdx.x == 0) shared.first = ULLONG_MAX;
      __syncthreads();
      if (hit >= 0) atomicMin(&shared.first, static_cast<unsigned long long>(hit));
      __syncthreads();
      const auto first = static_cast<int64_t>(shared.first);
      if (hit == first) shared.prefix = hit_prefix;
      __syncthreads();
      return {first, shared.prefix};
    }
    carry += chunk_total;
  }
  return {n, carry};
}

// One block per sampled row, on its sorted candidates: mla::sample_token's walk.
__global__ void __launch_bounds__(kPickThreads)
    sample_pick_kernel(SampleParams p, RowState s, const float* sorted_keys,
                       const int32_t* sorted_ids) {
  const int64_t row = blockIdx.x, vocab = p.vocab;
  const SampleRow params = p.params[row];
  const float temperature = params.temperature;
  if (temperature == 0.0f) return;
  __shared__ ScanShared shared;
  const float* keys = sorted_keys + row * vocab;
  const int32_t* ids = sorted_ids + row * vocab;
  const int32_t top_k = params.top_k;
  // An out-of-range top_k (the caller validates) reads no further than the row.
  const int64_t n = top_k > 0 && top_k < vocab ? top_k : vocab;
  const double max_logit = keys[0], t = temperature;

  const double total =
      top_k > 0 ? scan_until(keys, n, max_logit, t, Never{}, shared).prefix : s.total[row];
  int64_t kept = n;
  double kept_total = total;
  const float top_p = params.top_p;
  if (top_p < 1.0f) {
    const Found f = scan_until(keys, n, max_logit, t, Reaches{top_p * total}, shared);
    kept = f.index < n ? f.index + 1 : n;
    kept_total = f.prefix;
  }
  const double target = uniform_for(params.seed, params.position) * kept_total;
  const Found f = scan_until(keys, kept - 1, max_logit, t, Exceeds{target}, shared);
  if (threadIdx.x == 0) {
    const int32_t token = ids[f.index];
    p.tokens[row] = token;
    p.logprobs[row] = static_cast<float>(p.logits[row * vocab + token] - double{s.row_max[row]} -
                                         log(s.lse_sum[row]));
  }
}

}  // namespace

size_t sampling_workspace_bytes(int64_t rows, int64_t vocab) {
  MLA_REQUIRE(rows >= 0 && vocab >= 1 && rows * vocab <= INT32_MAX,
              "sampling needs rows >= 0, vocab >= 1, rows * vocab <= {}, got {} x {}", INT32_MAX,
              rows, vocab);
  return make_layout(rows, vocab).bytes;
}

void sample(const SampleParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  // Check shapes
  MLA_REQUIRE(p.rows >= 0 && p.vocab >= 1 && p.rows * p.vocab <= INT32_MAX,
              "sampling needs rows >= 0, vocab >= 1, rows * vocab <= {}, got {} x {}", INT32_MAX,
              p.rows, p.vocab);
  if (p.rows == 0) return;
  MLA_REQUIRE(
      p.logits != nullptr && p.params != nullptr && p.tokens != nullptr && p.logprobs != nullptr,
      "sampling needs logits, params, tokens and logprobs");
  // Check workspace
  const Layout l = make_layout(p.rows, p.vocab);
  MLA_REQUIRE(workspace != nullptr && workspace_bytes >= l.bytes,
              "sampling {} rows of {} needs {} workspace bytes, got {}", p.rows, p.vocab, l.bytes,
              workspace_bytes);
  MLA_REQUIRE(reinterpret_cast<uintptr_t>(workspace) % kAlign == 0,
              "the sampling workspace must be {}-byte aligned", kAlign);

  auto* ws = static_cast<char*>(workspace);
  const RowState s{
      reinterpret_cast<float*>(ws + l.row_max), reinterpret_cast<double*>(ws + l.lse_sum),
      reinterpret_cast<double*>(ws + l.total),  reinterpret_cast<int32_t*>(ws + l.begin),
      reinterpret_cast<int32_t*>(ws + l.end),   reinterpret_cast<float*>(ws + l.keys[0]),
      reinterpret_cast<int32_t*>(ws + l.ids[0])};
  const auto rows = static_cast<unsigned>(p.rows);
  sample_prepare_kernel<<<rows, kPrepareThreads, 0, stream>>>(p, s);
  MLA_CUDA_CHECK(cudaGetLastError());
  if (p.all_greedy) return;

  // Radix sort is stable and orders -0.0 and +0.0 as equal: ties stay in ascending id order,
  // the CPU's candidate order. Which buffer ends up current is decided on the host.
  cub::DoubleBuffer<float> keys(s.keys, reinterpret_cast<float*>(ws + l.keys[1]));
  cub::DoubleBuffer<int32_t> ids(s.ids, reinterpret_cast<int32_t*>(ws + l.ids[1]));
  size_t temp_bytes = l.sort_temp_bytes;
  MLA_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      ws + l.sort_temp, temp_bytes, keys, ids, static_cast<int>(p.rows * p.vocab),
      static_cast<int>(p.rows), s.begin, s.end, 0, static_cast<int>(sizeof(float) * 8), stream));
  sample_pick_kernel<<<rows, kPickThreads, 0, stream>>>(p, s, keys.Current(), ids.Current());
  MLA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mla::cuda
