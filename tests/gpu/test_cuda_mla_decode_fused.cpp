// cuda::mla_decode_fused (the query to W_UV's output in one kernel) against the CPU chain it
// replaces, fed the same bf16-rounded inputs: RoPE (cpu::rope_table, cpu::rope_rotate) and
// W_UK^T on the query, each rounded to bf16; cpu::latent_attention over a poisoned paged pool
// (tests/gpu/latent_pool_test_util.h: any read outside a sequence's keys turns its output into
// NaN); o~ rounded to bf16; W_UV. Outputs are poisoned before every run, and the workspace is
// zeroed once only, so a launch that left a counter set would fail the runs after it. Also
// launched right after latent_store, as in a decode step, to check it reads the row just written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/latent_store.h"
#include "kernels/cuda/mla_decode_fused.h"
#include "kernels/dtype.h"
#include "kernels/error.h"
#include "tests/gpu/bf16_test_util.h"
#include "tests/gpu/latent_pool_test_util.h"

namespace mla {
namespace {

using test::Cache;
using test::kDc;
using test::kDr;
using test::pages_of;
constexpr int32_t kDn = cuda::kMlaDecodeFusedNopeDim, kDv = cuda::kMlaDecodeFusedValueDim;
constexpr int32_t kDqk = kDn + kDr, kKvb = kDn + kDv;

// Tolerances against the largest |out| of the row. The kernel keeps scores, softmax weights and
// sums in fp32 like the reference, but sums in another order, which can move a bf16 rounding of
// q~ or o~ by one unit (2^-8 relative), and it rounds out to bf16: a simulation of the kernel's
// arithmetic lands near 3e-3 (worst element) and 2e-3 (relative norm).
constexpr float kOutTolOfRowMax = 1e-2f;
constexpr double kOutTolRelNorm = 5e-3;

float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

struct Problem {
  Cache cache;  // sequence t is token t's
  int32_t heads = 0;
  bool interleave = false;
  float attention_factor = 1.0f, scale = 0.0f;
  std::vector<uint16_t> q;     // [T, heads, kDqk]
  std::vector<uint16_t> kv_b;  // [heads, kKvb, kDc]
  std::vector<int32_t> positions;
  std::vector<float> inv_freq;  // [kDr / 2]

  int32_t T() const { return cache.batch(); }
};

// q~ of (token t, head h) as the reference makes it (before its bf16 rounding).
std::vector<float> absorbed_query(const Problem& p, int32_t t, int32_t h) {
  const uint16_t* q = p.q.data() + (int64_t{t} * p.heads + h) * kDqk;
  const uint16_t* w = p.kv_b.data() + int64_t{h} * kKvb * kDc;
  std::vector<float> q_lat(kDc);
  for (int32_t j = 0; j < kDc; ++j) {
    double s = 0.0;
    for (int32_t i = 0; i < kDn; ++i) s += double{bf16_to_f32(q[i])} * bf16_to_f32(w[i * kDc + j]);
    q_lat[j] = static_cast<float>(s);
  }
  return q_lat;
}

// dominant_newest: each sequence's newest key (the row a decode step's latent_store writes just
// before the kernel runs) is made to carry most of head 0's softmax weight, so an error on that
// row cannot hide under the others.
Problem make_problem(const std::vector<int32_t>& lengths, int32_t heads, bool interleave,
                     std::mt19937& rng, bool dominant_newest = false) {
  Problem p;
  p.cache = test::make_cache(lengths, rng);
  p.heads = heads;
  p.interleave = interleave;
  p.attention_factor = interleave ? 1.25f : 1.0f;
  p.scale = 1.0f / std::sqrt(static_cast<float>(kDqk));
  std::normal_distribution<float> normal;
  p.q.resize(int64_t{p.T()} * heads * kDqk);
  for (auto& v : p.q) v = f32_to_bf16(normal(rng));
  // W_UK scaled so that q~ is about unit normal, like the checkpoints' absorbed queries.
  p.kv_b.resize(int64_t{heads} * kKvb * kDc);
  for (auto& v : p.kv_b) v = f32_to_bf16(normal(rng) / std::sqrt(static_cast<float>(kDn)));
  std::uniform_int_distribution<int32_t> pos(0, 6000);
  for (int32_t t = 0; t < p.T(); ++t) p.positions.push_back(pos(rng));
  for (int32_t j = 0; j < kDr / 2; ++j) {
    p.inv_freq.push_back(std::pow(10000.0f, -2.0f * static_cast<float>(j) / kDr));
  }
  for (int32_t t = 0; dominant_newest && t < p.T(); ++t) {
    if (lengths[t] == 0) continue;
    std::vector<float> row = absorbed_query(p, t, 0);
    for (float& v : row) v *= 0.25f;
    row.resize(test::kWidth, 0.0f);
    test::set_row(p.cache, t, lengths[t] - 1, row.data());
  }
  return p;
}

// out [T, heads, kDv] as the CPU chain computes it.
std::vector<float> reference(const Problem& p) {
  std::vector<float> out(int64_t{p.T()} * p.heads * kDv);
  std::vector<float> q_lat(kDc), q_rope(kDr), o(kDc), cos_sin(kDr);
  float lse = 0.0f;
  for (int32_t t = 0; t < p.T(); ++t) {
    std::vector<const float*> pages;
    for (int32_t k = 0; k < pages_of(p.cache.lengths[t]); ++k) {
      pages.push_back(p.cache.c[t].data() + int64_t{k} * test::kBlock * test::kWidth);
    }
    cpu::rope_table(p.positions[t], p.inv_freq.data(), kDr, p.attention_factor, cos_sin.data());
    for (int32_t h = 0; h < p.heads; ++h) {
      const uint16_t* q = p.q.data() + (int64_t{t} * p.heads + h) * kDqk;
      const uint16_t* w = p.kv_b.data() + int64_t{h} * kKvb * kDc;
      for (int32_t d = 0; d < kDr; ++d) q_rope[d] = bf16_to_f32(q[kDn + d]);
      cpu::rope_rotate(q_rope.data(), kDr, cos_sin.data(), p.interleave);
      for (float& v : q_rope) v = round_bf16(v);
      q_lat = absorbed_query(p, t, h);
      for (float& v : q_lat) v = round_bf16(v);
      cpu::latent_attention({q_lat.data(), q_rope.data(), pages.data(), &p.cache.lengths[t], 1, 1,
                             kDc, kDr, test::kBlock, p.scale, o.data(), &lse});
      for (float& v : o) v = round_bf16(v);
      for (int32_t r = 0; r < kDv; ++r) {
        double s = 0.0;
        for (int32_t j = 0; j < kDc; ++j) s += double{bf16_to_f32(w[(kDn + r) * kDc + j])} * o[j];
        out[(int64_t{t} * p.heads + h) * kDv + r] = static_cast<float>(s);
      }
    }
  }
  return out;
}

// The problem on the device; the workspace is zeroed here, once.
class DeviceProblem {
 public:
  DeviceProblem(const Problem& p, int num_sms, int32_t max_keys)
      : host_pool_(p.cache.pool),
        pool_(p.cache.pool),
        table_(p.cache.block_table),
        q_(p.q),
        kv_b_(p.kv_b),
        positions_(p.positions),
        inv_freq_(p.inv_freq),
        num_keys_(p.cache.lengths),
        out_(int64_t{p.T()} * p.heads * kDv),
        workspace_(cuda::mla_decode_fused_workspace_bytes(p.heads, num_sms)) {
    MLA_CUDA_CHECK(cudaMemset(workspace_.get(), 0, workspace_.bytes()));
    params_ = {.q = reinterpret_cast<const __nv_bfloat16*>(q_.get()),
               .kv_b = reinterpret_cast<const __nv_bfloat16*>(kv_b_.get()),
               .positions = positions_.get(),
               .inv_freq = inv_freq_.get(),
               .attention_factor = p.attention_factor,
               .interleave = p.interleave,
               .pool = pool_.get(),
               .layer = Cache::kLayer,
               .num_layers = Cache::kNumLayers,
               .block_table = table_.get(),
               .table_stride = p.cache.table_stride,
               .num_keys = num_keys_.get(),
               .max_keys = max_keys,
               .scale = p.scale,
               .out = reinterpret_cast<__nv_bfloat16*>(out_.get()),
               .T = p.T(),
               .heads = p.heads,
               .num_sms = num_sms};
  }

  void launch(cudaStream_t stream) {
    cuda::mla_decode_fused(params_, workspace_.get(), static_cast<size_t>(workspace_.bytes()),
                           stream);
  }
  std::vector<uint16_t> run() {
    out_.poison();
    launch(nullptr);
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    return out_.download();
  }
  void poison_out() { out_.poison(); }
  void reset_pool() { pool_.upload(host_pool_); }
  void* pool() const { return pool_.get(); }
  const int32_t* positions() const { return positions_.get(); }
  const float* inv_freq() const { return inv_freq_.get(); }
  std::vector<uint16_t> out() const { return out_.download(); }

 private:
  std::vector<uint8_t> host_pool_;
  test::DeviceArray<uint8_t> pool_;
  test::DeviceArray<int32_t> table_;
  test::DeviceArray<uint16_t> q_, kv_b_;
  test::DeviceArray<int32_t> positions_;
  test::DeviceArray<float> inv_freq_;
  test::DeviceArray<int32_t> num_keys_;
  test::DeviceArray<uint16_t> out_;
  test::DeviceArray<uint8_t> workspace_;
  cuda::MlaDecodeFusedParams params_{};
};

void expect_matches(const std::vector<uint16_t>& got_bits, const std::vector<float>& ref,
                    const Problem& p, const std::string& label) {
  int64_t failures = 0;
  double err_sq = 0.0, ref_sq = 0.0;
  for (int64_t row = 0; row < int64_t{p.T()} * p.heads; ++row) {
    const int32_t keys = p.cache.lengths[row / p.heads];
    const float* r = ref.data() + row * kDv;
    float row_max = 0.0f;
    for (int32_t d = 0; d < kDv; ++d) row_max = std::max(row_max, std::abs(r[d]));
    for (int32_t d = 0; d < kDv; ++d) {
      const float g = bf16_to_f32(got_bits[row * kDv + d]);
      const float err = std::abs(g - r[d]);
      err_sq += double{err} * err;
      ref_sq += double{r[d]} * r[d];
      // No keys: exactly zero (o~ = 0).
      const bool ok = keys == 0 ? g == 0.0f : err <= kOutTolOfRowMax * row_max;
      if (!ok && failures++ < 5) {
        ADD_FAILURE() << label << ": out[row " << row << "][" << d << "] = " << g << ", want "
                      << r[d] << " (row max " << row_max << ", keys " << keys << ")";
      }
    }
  }
  const double rel = ref_sq > 0.0 ? std::sqrt(err_sq / ref_sq) : 0.0;
  EXPECT_EQ(failures, 0) << label;
  EXPECT_LE(rel, kOutTolRelNorm) << label;
  std::printf("%s: |out - ref| / |ref| = %.2e\n", label.c_str(), rel);
}

int device_sms() {
  int sms = 0;
  MLA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  return sms;
}

// The split plan alone (no device needed): for every shape the kernel takes, the splits'
// pages cover each sequence's pages once, in order, at most kMlaDecodeFusedMaxPagesPerBlock to
// a split.
TEST(CudaMlaDecodeFused, SplitsCoverEveryPageOnce) {
  for (int sms : {16, 78, 114, 132}) {
    for (int32_t T = 1; T <= cuda::kMlaDecodeFusedMaxTokens; ++T) {
      for (int32_t heads : {1, 2, 8, 16, 64}) {
        for (int32_t max_keys = 0; max_keys <= cuda::kMlaDecodeFusedMaxKeys; max_keys += 64) {
          if (!cuda::mla_decode_fused_fits(T, heads, max_keys, sms)) continue;
          const int32_t splits = cuda::mla_decode_fused_splits(T, heads, max_keys, sms);
          ASSERT_GE(splits, 1);
          ASSERT_LE(int64_t{T} * heads * splits, std::max(sms, T * heads));  // workspace slots
          for (int32_t keys : {0, 1, 63, 64, 65, max_keys / 2 + 1, max_keys}) {
            if (keys > max_keys) continue;
            int32_t next = 0;
            for (int32_t split = 0; split < splits; ++split) {
              const cuda::MlaDecodeFusedPages r = cuda::mla_decode_fused_pages(keys, splits, split);
              if (r.first >= r.last) continue;
              ASSERT_EQ(r.first, next) << "keys " << keys << " split " << split;
              ASSERT_LE(r.last - r.first, cuda::kMlaDecodeFusedMaxPagesPerBlock)
                  << "keys " << keys << ", " << splits << " splits on " << sms << " SMs";
              next = r.last;
            }
            ASSERT_EQ(next, pages_of(keys)) << "keys " << keys << ", " << splits << " splits";
          }
        }
      }
    }
  }
}

TEST(CudaMlaDecodeFused, MatchesTheCpuChain) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(2026);
  struct Case {
    std::vector<int32_t> lengths;
    int32_t heads;
    bool interleave, dominant_newest;
  };
  // Single keys, page edges, the longest context, a sequence with no keys beside one with
  // many, one head and 64, four tokens, a newest key that carries the softmax.
  const std::vector<Case> cases = {
      {{513}, 16, false, false},    {{1}, 16, true, false},
      {{2048}, 16, true, false},    {{64, 65}, 16, false, false},
      {{0, 700}, 16, true, false},  {{1, 64, 300, 512}, 16, false, false},
      {{300}, 1, true, false},      {{400}, 64, false, false},
      {{513, 700}, 16, true, true}, {{2, 200, 64, 1}, 16, false, true},
  };
  for (const Case& c : cases) {
    const Problem p = make_problem(c.lengths, c.heads, c.interleave, rng, c.dominant_newest);
    const std::vector<float> ref = reference(p);
    const int32_t longest = *std::max_element(c.lengths.begin(), c.lengths.end());
    // The device's SMs and just enough for two splits a (token, head); max_keys the bound a
    // step passes, 512, and the longest sequence exactly (one split for a page or less): those
    // the kernel is built for.
    int configs = 0;
    for (int sms : {device_sms(), 2 * p.T() * c.heads}) {
      for (int32_t max_keys : {cuda::kMlaDecodeFusedMaxKeys, 512, longest}) {
        if (max_keys < longest || !cuda::mla_decode_fused_fits(p.T(), c.heads, max_keys, sms)) {
          continue;
        }
        ++configs;
        DeviceProblem d(p, sms, max_keys);
        std::string label = "T " + std::to_string(p.T()) + ", heads " + std::to_string(c.heads) +
                            ", first length " + std::to_string(c.lengths[0]) + ", num_sms " +
                            std::to_string(sms) + ", max_keys " + std::to_string(max_keys);
        expect_matches(d.run(), ref, p, label);
        expect_matches(d.run(), ref, p, label + ", second run");
      }
    }
    EXPECT_GT(configs, 0) << "no configuration fits the case of first length " << c.lengths[0];
  }
}

// Bit-identical across runs (the merge goes in split order whichever block is last) and when
// replayed from a CUDA graph.
TEST(CudaMlaDecodeFused, DeterministicAndGraphCapturable) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(7);
  // Two tokens over a table of 16 pages, as a decode step's graph passes them.
  const Problem p = make_problem({777, 1000}, 16, true, rng);
  ASSERT_TRUE(cuda::mla_decode_fused_fits(p.T(), 16, 1024, device_sms()));
  DeviceProblem d(p, device_sms(), 1024);
  const std::vector<uint16_t> first = d.run();
  for (int i = 0; i < 3; ++i) ASSERT_EQ(d.run(), first) << "run " << i;
  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  d.poison_out();
  test::run_in_graph_on(stream, [&] { d.launch(stream); });
  EXPECT_EQ(d.out(), first);
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));
}

// In a decode step the kernel runs right after latent_store, which writes the newest key of each
// sequence: launched as its programmatic dependent (on a stream and in a graph), the kernel reads
// the row latent_store wrote, not the NaN poison it replaced, and the newest key carries most of
// head 0's weight, so a stale row could not hide.
TEST(CudaMlaDecodeFused, ReadsTheNewestRowsLatentStoreWritesJustBefore) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(11);
  const std::vector<int32_t> lengths = {513, 700};
  Problem p = make_problem(lengths, 16, true, rng);
  const int32_t T = p.T();
  // The newest rows as latent_store makes them from kv (its own test checks it against this
  // construction): c = RMSNorm(kv[:d_c]) * w, k_r = RoPE(kv[d_c:]); kv's c is head 0's q~, so
  // the new key dominates.
  const float eps = 1e-6f;
  std::vector<float> kv(int64_t{T} * test::kWidth), norm_w = test::random_normal(kDc, rng, 0.1f);
  for (float& w : norm_w) w += 1.0f;
  std::vector<int32_t> slot_pages, slot_offsets;
  std::vector<float> row(test::kWidth), nan_row(test::kWidth, std::nanf("")), cos_sin(kDr);
  for (int32_t t = 0; t < T; ++t) {
    const int32_t k = lengths[t] - 1;
    const std::vector<float> q_lat = absorbed_query(p, t, 0);
    std::normal_distribution<float> normal;
    float* in = kv.data() + int64_t{t} * test::kWidth;
    for (int32_t i = 0; i < kDc; ++i) in[i] = q_lat[i];
    for (int32_t i = 0; i < kDr; ++i) in[kDc + i] = normal(rng);
    std::copy_n(in, test::kWidth, row.data());
    cpu::rms_norm(row.data(), 1, kDc, kDc, norm_w.data(), eps, row.data(), kDc);
    cpu::rope_table(p.positions[t], p.inv_freq.data(), kDr, p.attention_factor, cos_sin.data());
    cpu::rope_rotate(row.data() + kDc, kDr, cos_sin.data(), p.interleave);
    // The pool's row NaN until latent_store writes it; the reference's the row it writes.
    test::set_row(p.cache, t, k, nan_row.data());
    for (int32_t i = 0; i < test::kWidth; ++i) {
      p.cache.c[t][int64_t{k} * test::kWidth + i] = round_bf16(row[i]);
    }
    slot_pages.push_back(p.cache.block_table[int64_t{t} * p.cache.table_stride + k / test::kBlock]);
    slot_offsets.push_back(k % test::kBlock);
  }
  const std::vector<float> ref = reference(p);

  ASSERT_TRUE(cuda::mla_decode_fused_fits(T, 16, 1024, device_sms()));
  DeviceProblem d(p, device_sms(), 1024);
  test::DeviceArray<float> kv_dev(kv), norm_w_dev(norm_w);
  test::DeviceArray<int32_t> pages_dev(slot_pages), offsets_dev(slot_offsets);
  const cuda::LatentStoreParams store{.kv = kv_dev.get(),
                                      .kv_stride = test::kWidth,
                                      .norm_w = norm_w_dev.get(),
                                      .eps = eps,
                                      .positions = d.positions(),
                                      .inv_freq = d.inv_freq(),
                                      .attention_factor = p.attention_factor,
                                      .interleave = p.interleave,
                                      .slot_pages = pages_dev.get(),
                                      .slot_offsets = offsets_dev.get(),
                                      .pool = d.pool(),
                                      .element = cuda::LatentElement::kBf16,
                                      .layer = Cache::kLayer,
                                      .num_layers = Cache::kNumLayers,
                                      .block_size = test::kBlock,
                                      .d_c = kDc,
                                      .d_r = kDr,
                                      .T = T};
  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  d.poison_out();
  cuda::latent_store(store, stream);
  d.launch(stream);
  MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
  expect_matches(d.out(), ref, p, "after latent_store, on a stream");
  d.reset_pool();  // NaN rows again
  d.poison_out();
  test::run_in_graph_on(stream, [&] {
    cuda::latent_store(store, stream);
    d.launch(stream);
  });
  expect_matches(d.out(), ref, p, "after latent_store, in a graph");
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST(CudaMlaDecodeFused, RefusesShapesOutsideItsRange) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // T, heads, max_keys, num_sms: no tokens, too many, no heads, too many keys, fewer than two
  // SMs a (token, head), more than 4 pages a block.
  const std::vector<std::tuple<int32_t, int32_t, int32_t, int>> bad_shapes = {
      {0, 16, 64, 132},  {cuda::kMlaDecodeFusedMaxTokens + 1, 16, 64, 132},
      {1, 0, 64, 132},   {1, 16, cuda::kMlaDecodeFusedMaxKeys + 1, 132},
      {1, 128, 64, 132}, {2, 16, 2048, 132}};
  for (const auto& [T, heads, max_keys, sms] : bad_shapes) {
    EXPECT_FALSE(cuda::mla_decode_fused_fits(T, heads, max_keys, sms))
        << "T " << T << ", heads " << heads << ", max_keys " << max_keys << ", sms " << sms;
    cuda::MlaDecodeFusedParams bad{};
    bad.T = T;
    bad.heads = heads;
    bad.max_keys = max_keys;
    bad.num_sms = sms;
    bad.num_layers = 1;
    EXPECT_THROW(cuda::mla_decode_fused(bad, nullptr, size_t{1} << 30, nullptr), Error)
        << "T " << T << ", heads " << heads << ", max_keys " << max_keys;
  }
  // A shape it is built for, with a workspace one counter short.
  cuda::MlaDecodeFusedParams ok{};
  ok.T = 1;
  ok.heads = 16;
  ok.max_keys = 64;
  ok.num_sms = 132;
  ok.num_layers = 1;
  EXPECT_THROW(cuda::mla_decode_fused(ok, nullptr,
                                      cuda::mla_decode_fused_workspace_bytes(16, 132) - 4, nullptr),
               Error);
  EXPECT_TRUE(cuda::mla_decode_fused_fits(1, 16, 2048, 132));
  EXPECT_TRUE(cuda::mla_decode_fused_fits(4, 16, 512, 132));
  EXPECT_TRUE(cuda::mla_decode_fused_supports(512, 64, 128, 128, 64));
  EXPECT_FALSE(cuda::mla_decode_fused_supports(512, 64, 128, 128, 16));
  EXPECT_FALSE(cuda::mla_decode_fused_supports(256, 64, 128, 128, 64));
  EXPECT_FALSE(cuda::mla_decode_fused_supports(512, 64, 192, 128, 64));
}

}  // namespace
}  // namespace mla
