// CUDA absorbed-MLA decode (cuda::mla_decode) against cpu::latent_attention fed the same
// bf16-rounded inputs, on fresh random data: a pool of three layers with the tested layer in
// the middle, each sequence's pages scattered over the pool, every other layer, every unused
// page and every row past a sequence's keys NaN, block-table entries past each sequence's pages
// out of range, and outputs poisoned before the run. Any read outside the keys a query may see
// turns its output into NaN. The same cases run on an fp8 pool (packed rows, poisoned with
// 0xff: NaN codes, NaN scales and NaN rotary values), against the reference fed the rows
// dequantised and rounded to bf16, as the kernel reads them.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu/fp8_latent.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/mla_decode.h"
#include "kernels/dtype.h"
#include "tests/gpu/bf16_test_util.h"
#include "tests/gpu/latent_pool_test_util.h"

namespace mla {
namespace {

using test::Cache;
using test::kBlock;
using test::kDc;
using test::kDr;
using test::kWidth;
using test::make_cache;
using test::pages_of;

// Tolerances. out: the kernel rounds the softmax weights P to bf16 for the tensor cores (a
// relative error <= 2^-8 per weight, random in sign) and rounds out to bf16 (<= 2^-8 relative);
// scores and sums are fp32. Both stay far inside 2e-2 of the row's largest |out|, and the
// relative error norm of the whole output lands near 2e-3, inside 1e-2. lse: fp32 sums of
// exponentials give errors near 1e-5; 2e-3 still catches one 64-key tile missing from a
// 17000-key sequence (ln(266/265) = 3.8e-3).
constexpr float kOutTolOfRowMax = 2e-2f;
constexpr double kOutTolRelNorm = 1e-2;
constexpr float kLseTol = 2e-3f;

const __nv_bfloat16* as_bf16(const uint16_t* p) {
  return reinterpret_cast<const __nv_bfloat16*>(p);
}
// One decode call's query side.
struct Queries {
  int32_t s_q, heads;
  float scale;
  std::vector<uint16_t> q;        // [batch, s_q, heads, 576] bf16
  std::vector<int32_t> num_keys;  // [batch, s_q]: the causal step's {L - s_q + 1, ..., L}
};

Queries make_queries(const Cache& cache, int32_t s_q, int32_t heads, float scale,
                     std::mt19937& rng) {
  Queries qs{s_q, heads, scale, {}, {}};
  std::normal_distribution<float> normal;
  qs.q.resize(int64_t{cache.batch()} * s_q * heads * kWidth);
  for (auto& v : qs.q) v = f32_to_bf16(normal(rng));
  for (int32_t len : cache.lengths) {
    for (int32_t i = 0; i < s_q; ++i) qs.num_keys.push_back(std::max(len - (s_q - 1 - i), 0));
  }
  return qs;
}

struct Result {
  std::vector<float> out;  // [batch, s_q, heads, 512]
  std::vector<float> lse;  // [batch, s_q, heads]
};

// cpu::latent_attention, one (sequence, head) per job, spread over the host's cores.
Result reference(const Cache& cache, const Queries& qs) {
  const int32_t batch = cache.batch(), s_q = qs.s_q, heads = qs.heads;
  Result ref;
  ref.out.resize(int64_t{batch} * s_q * heads * kDc);
  ref.lse.resize(int64_t{batch} * s_q * heads);
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    std::vector<float> q_lat(s_q * kDc), q_rope(s_q * kDr), out(s_q * kDc), lse(s_q);
    std::vector<const float*> page_ptrs;
    for (int64_t job; (job = next++) < int64_t{batch} * heads;) {
      const int32_t b = static_cast<int32_t>(job / heads), h = static_cast<int32_t>(job % heads);
      for (int32_t i = 0; i < s_q; ++i) {
        const uint16_t* row = qs.q.data() + ((int64_t{b} * s_q + i) * heads + h) * kWidth;
        for (int32_t d = 0; d < kDc; ++d) q_lat[i * kDc + d] = bf16_to_f32(row[d]);
        for (int32_t d = 0; d < kDr; ++d) q_rope[i * kDr + d] = bf16_to_f32(row[kDc + d]);
      }
      page_ptrs.clear();
      for (int32_t k = 0; k < pages_of(cache.lengths[b]); ++k) {
        page_ptrs.push_back(cache.c[b].data() + int64_t{k} * kBlock * kWidth);
      }
      cpu::latent_attention({q_lat.data(), q_rope.data(), page_ptrs.data(),
                             qs.num_keys.data() + int64_t{b} * s_q, s_q, 1, kDc, kDr, kBlock,
                             qs.scale, out.data(), lse.data()});
      for (int32_t i = 0; i < s_q; ++i) {
        const int64_t row = (int64_t{b} * s_q + i) * heads + h;
        std::copy_n(out.data() + i * kDc, kDc, ref.out.data() + row * kDc);
        ref.lse[row] = lse[i];
      }
    }
  };
  std::vector<std::thread> threads(std::max(1u, std::thread::hardware_concurrency()));
  for (auto& t : threads) t = std::thread(worker);
  for (auto& t : threads) t.join();
  return ref;
}

// The cache and queries on the device, with poisoned outputs and workspace.
class DeviceProblem {
 public:
  DeviceProblem(const Cache& cache, const Queries& qs, int num_sms)
      : pool_(cache.pool),
        table_(cache.block_table),
        q_(qs.q),
        num_keys_(qs.num_keys),
        out_(qs.q.size() / kWidth * kDc),
        lse_(qs.q.size() / kWidth),
        workspace_(cuda::mla_decode_workspace_bytes(cache.batch(), qs.s_q, qs.heads, num_sms)) {
    params_.q = as_bf16(q_.get());
    params_.pool = pool_.get();
    params_.element = cache.element;
    params_.layer = Cache::kLayer;
    params_.num_layers = Cache::kNumLayers;
    params_.block_table = table_.get();
    params_.table_stride = cache.table_stride;
    params_.num_keys = num_keys_.get();
    params_.batch = cache.batch();
    params_.s_q = qs.s_q;
    params_.heads = qs.heads;
    params_.scale = qs.scale;
    params_.out = reinterpret_cast<__nv_bfloat16*>(out_.get());
    params_.lse = lse_.get();
    params_.num_sms = num_sms;
  }

  void poison() {
    poison_outputs();
    workspace_.poison();
  }
  void poison_outputs() {
    out_.poison();
    lse_.poison();
  }
  void set_reuse_plan(bool reuse) { params_.reuse_plan = reuse; }
  void set_kernel(cuda::MlaDecodeKernel kernel) { params_.kernel = kernel; }
  void launch(cudaStream_t stream) { cuda::mla_decode(params_, workspace_.get(), stream); }
  Result run() {
    poison();
    launch(nullptr);
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    return result();
  }
  Result result() const {
    Result r;
    for (uint16_t v : out_.download()) r.out.push_back(bf16_to_f32(v));
    r.lse = lse_.download();
    return r;
  }
  std::vector<uint16_t> raw_out() const { return out_.download(); }

 private:
  test::DeviceArray<uint8_t> pool_;
  test::DeviceArray<int32_t> table_;
  test::DeviceArray<uint16_t> q_;
  test::DeviceArray<int32_t> num_keys_;
  test::DeviceArray<uint16_t> out_;
  test::DeviceArray<float> lse_;
  test::DeviceArray<uint8_t> workspace_;
  cuda::MlaDecodeParams params_{};
};

void expect_matches(const Result& got, const Result& ref, const Queries& qs,
                    const std::string& label) {
  const int64_t rows = static_cast<int64_t>(ref.lse.size());
  int64_t failures = 0;
  double err_sq = 0.0, ref_sq = 0.0;
  float worst_lse = 0.0f;
  for (int64_t row = 0; row < rows; ++row) {
    const int32_t keys = qs.num_keys[row / qs.heads];
    const float* g = got.out.data() + row * kDc;
    const float* r = ref.out.data() + row * kDc;
    if (keys == 0) {
      const bool zero = std::all_of(g, g + kDc, [](float v) { return v == 0.0f; });
      if ((!zero || got.lse[row] != -std::numeric_limits<float>::infinity()) && failures++ < 5) {
        ADD_FAILURE() << label << ": row " << row << " has no keys: want out 0, lse -inf; got lse "
                      << got.lse[row] << ", out[0] " << g[0];
      }
      continue;
    }
    float row_max = 0.0f;
    for (int32_t d = 0; d < kDc; ++d) row_max = std::max(row_max, std::abs(r[d]));
    for (int32_t d = 0; d < kDc; ++d) {
      const float err = std::abs(g[d] - r[d]);
      err_sq += double{err} * err;
      ref_sq += double{r[d]} * r[d];
      if (!(err <= kOutTolOfRowMax * row_max) && failures++ < 5) {
        ADD_FAILURE() << label << ": out[row " << row << "][" << d << "] = " << g[d] << ", want "
                      << r[d] << " (row max " << row_max << ", keys " << keys << ")";
      }
    }
    const float lse_err = std::abs(got.lse[row] - ref.lse[row]);
    worst_lse = std::max(worst_lse, lse_err);
    if (!(lse_err <= kLseTol) && failures++ < 5) {
      ADD_FAILURE() << label << ": lse[row " << row << "] = " << got.lse[row] << ", want "
                    << ref.lse[row] << " (keys " << keys << ")";
    }
  }
  const double rel = ref_sq > 0.0 ? std::sqrt(err_sq / ref_sq) : 0.0;
  EXPECT_EQ(failures, 0) << label;
  EXPECT_LE(rel, kOutTolRelNorm) << label;
  std::printf("%s: |out - ref| / |ref| = %.2e, max lse error %.2e\n", label.c_str(), rel,
              worst_lse);
}

int device_sms() {
  int sms = 0;
  MLA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  return sms;
}

// The kernels a cache runs on: both bf16 kernels (whatever kAuto picks), fp8's one.
std::vector<cuda::MlaDecodeKernel> kernels_for(const Cache& cache) {
  if (cache.element == cuda::LatentElement::kFp8) return {cuda::MlaDecodeKernel::kAuto};
  return {cuda::MlaDecodeKernel::kSplitKeys, cuda::MlaDecodeKernel::kPairedTiles};
}

std::string kernel_name(cuda::MlaDecodeKernel kernel) {
  switch (kernel) {
    case cuda::MlaDecodeKernel::kSplitKeys:
      return "split keys";
    case cuda::MlaDecodeKernel::kPairedTiles:
      return "paired tiles";
    default:
      return "auto";
  }
}

void check_case(const Cache& cache, int32_t s_q, int32_t heads, float scale,
                const std::vector<int>& sms_list, std::mt19937& rng) {
  const Queries qs = make_queries(cache, s_q, heads, scale, rng);
  const Result ref = reference(cache, qs);
  for (int sms : sms_list) {
    for (const auto kernel : kernels_for(cache)) {
      DeviceProblem problem(cache, qs, sms);
      problem.set_kernel(kernel);
      const std::string label =
          std::string(cache.element == cuda::LatentElement::kFp8 ? "fp8, " : "") +
          kernel_name(kernel) + ", batch " + std::to_string(cache.batch()) + ", heads " +
          std::to_string(heads) + ", s_q " + std::to_string(s_q) + ", num_sms " +
          std::to_string(sms);
      expect_matches(problem.run(), ref, qs, label);
    }
  }
}

// Lengths around the page size and far past it in one batch; every head count a DeepSeek
// model or a tensor-parallel shard of one may have; num_sms = 3 puts several sequences into
// one CTA's work and splits the long ones at other places.
TEST(CudaMlaDecode, MixedLengthsAllHeadCounts) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(4242);
  const Cache cache = make_cache({1, 63, 64, 65, 1000, 5000, 17000}, rng);
  for (int32_t heads : {1, 16, 32, 64, 128}) {
    for (int32_t s_q : {1, 2}) {
      check_case(cache, s_q, heads, 1.0f / 24.0f, {device_sms(), 3}, rng);
    }
  }
}

// A realistic decode batch: 128 sequences of random lengths, DeepSeek-V3's softmax scale.
TEST(CudaMlaDecode, RandomBatch128) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(777);
  std::uniform_int_distribution<int32_t> length(1, 1500);
  std::vector<int32_t> lengths(128);
  for (auto& len : lengths) len = length(rng);
  const Cache cache = make_cache(lengths, rng);
  check_case(cache, 1, 16, 0.1352f, {device_sms()}, rng);
  check_case(cache, 2, 128, 0.1352f, {device_sms()}, rng);
}

// Queries that see no keys (a sequence of length 0; with s_q = 2 the first query of a
// sequence of length 1) get out = 0 and lse = -inf, and their neighbours are unaffected.
TEST(CudaMlaDecode, ZeroKeys) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(99);
  const Cache cache = make_cache({0, 5, 1, 130, 0}, rng);
  for (int32_t heads : {16, 128}) {  // 64 query rows or fewer, and more (the two schedules)
    for (int32_t s_q : {1, 2}) check_case(cache, s_q, heads, 1.0f / 24.0f, {device_sms(), 1}, rng);
  }
}

// One long sequence: the planner must cut it into about one piece per SM group, and the
// combine kernel must merge them.
TEST(CudaMlaDecode, LongSequenceManySplits) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(31337);
  const Cache cache = make_cache({70001}, rng);
  check_case(cache, 2, 16, 1.0f / 24.0f, {device_sms()}, rng);
  check_case(cache, 1, 128, 0.1352f, {device_sms()}, rng);
}

// Speculative steps (s_q 3 and 4) on the unbalanced batch ThunderMLA reports FlashMLA at 52 us
// on (s_q 4, 16 heads): one long sequence among short ones, so its pieces span many parts.
TEST(CudaMlaDecode, SpeculativeStepsOnAnUnbalancedBatch) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(4641);
  for (const auto element : {cuda::LatentElement::kBf16, cuda::LatentElement::kFp8}) {
    const Cache cache = make_cache({4641, 45118, 1730, 1696, 2}, rng, element);
    for (int32_t heads : {16, 128}) {
      for (int32_t s_q : {3, 4}) check_case(cache, s_q, heads, 0.1352f, {device_sms(), 3}, rng);
    }
  }
}

// An fp8 pool: pages staged as they are and dequantised in shared memory, across the mixed
// lengths (splits, partial last pages, several sequences in one CTA) and both tile schedules.
TEST(CudaMlaDecode, Fp8CacheMixedLengths) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(656);
  const Cache cache =
      make_cache({0, 1, 63, 64, 65, 1000, 5000, 17000}, rng, cuda::LatentElement::kFp8);
  for (int32_t heads : {16, 128}) {
    for (int32_t s_q : {1, 2}) check_case(cache, s_q, heads, 0.1352f, {device_sms(), 3}, rng);
  }
}

// The same launch twice, a launch reusing the first one's plan, and the launch captured in a
// CUDA graph and replayed give bit-identical outputs (no atomics, no dependence on scheduling).
void check_deterministic_and_graph_capturable(cuda::LatentElement element,
                                              cuda::MlaDecodeKernel kernel) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> length(1, 4000);
  std::vector<int32_t> lengths(64);
  for (auto& len : lengths) len = length(rng);
  lengths[3] = 30000;  // split across many parts
  const Cache cache = make_cache(lengths, rng, element);
  const Queries qs = make_queries(cache, 2, 64, 0.1352f, rng);
  DeviceProblem problem(cache, qs, device_sms());
  problem.set_kernel(kernel);
  problem.run();
  const std::vector<uint16_t> first = problem.raw_out();
  const std::vector<float> first_lse = problem.result().lse;
  problem.run();
  EXPECT_EQ(problem.raw_out(), first) << "second launch differs";
  problem.poison_outputs();
  problem.set_reuse_plan(true);
  problem.launch(nullptr);
  MLA_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(problem.raw_out(), first) << "launch reusing the plan differs";
  problem.set_reuse_plan(false);

  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  problem.poison();
  MLA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  problem.launch(stream);
  MLA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MLA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  MLA_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
  EXPECT_EQ(problem.raw_out(), first) << "graph replay differs";
  const std::vector<float> lse = problem.result().lse;
  EXPECT_EQ(std::memcmp(lse.data(), first_lse.data(), lse.size() * sizeof(float)), 0);
  MLA_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MLA_CUDA_CHECK(cudaGraphDestroy(graph));
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST(CudaMlaDecode, DeterministicAndGraphCapturable) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_deterministic_and_graph_capturable(cuda::LatentElement::kBf16,
                                           cuda::MlaDecodeKernel::kSplitKeys);
}

// The paired-tile kernel's warpgroups hand P and the row bases to each other and reload each
// part of a tile when its last reader is done: a missed wait would show as runs that differ.
TEST(CudaMlaDecode, PairedTilesDeterministicAndGraphCapturable) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_deterministic_and_graph_capturable(cuda::LatentElement::kBf16,
                                           cuda::MlaDecodeKernel::kPairedTiles);
}

// The fp8 pipeline (two staging slots, rotary values copied into the tile mid-tile) too: a
// race between a page's copy and its dequantisation would show as runs that differ.
TEST(CudaMlaDecode, Fp8DeterministicAndGraphCapturable) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_deterministic_and_graph_capturable(cuda::LatentElement::kFp8, cuda::MlaDecodeKernel::kAuto);
}

}  // namespace
}  // namespace mla
