// CUDA latent-form prefill attention against cpu::latent_attention on the bf16-rounded inputs:
// batches mixing fresh prefills, later chunks and tokens without keys, over a pool with
// shuffled pages, several layers, NaN in every unwritten row and out-of-range page ids past
// each sequence's end; outputs and workspace poisoned; a second run, replayed from a CUDA
// graph, must agree bit for bit. An fp8 pool (packed rows, unwritten ones 0xff: NaN codes,
// scales and rotary values) is checked against the rows dequantised and rounded to bf16.
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
#include "kernels/cuda/mla_prefill.h"
#include "kernels/dtype.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

constexpr int32_t kDc = 512, kDr = 64, kWidth = kDc + kDr, kBlock = 64;
constexpr uint16_t kBf16NaN = 0x7fc0;
constexpr int32_t kBadPage = 1 << 30;

__nv_bfloat16* as_bf16(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

// One sequence of the batch: `context` keys written to the cache, and the number of keys each
// of its query tokens attends.
struct SeqSpec {
  int32_t context;
  std::vector<int32_t> num_keys;
};

// The num_keys of a causal chunk: the last `chunk` tokens of a `context`-token prefix.
std::vector<int32_t> causal_chunk(int32_t context, int32_t chunk) {
  std::vector<int32_t> keys(chunk);
  for (int32_t i = 0; i < chunk; ++i) keys[i] = context - chunk + i + 1;
  return keys;
}

// Builds the batch, runs the kernel twice and compares with the CPU reference on every token of
// sequences up to `full_check_context` keys and on a sample of the longer ones.
void check_mla_prefill(int32_t heads, const std::vector<SeqSpec>& seqs, uint32_t seed,
                       cuda::LatentElement element = cuda::LatentElement::kBf16) {
  SCOPED_TRACE("heads = " + std::to_string(heads));
  const bool fp8 = element == cuda::LatentElement::kFp8;
  const cpu::Fp8LatentRow f{.d_c = kDc, .d_r = kDr};
  const int64_t row_bytes = cuda::latent_row_bytes(element, kDc, kDr);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  const auto random_bf16 = [&] { return f32_to_bf16(dist(rng)); };
  constexpr int32_t kLayers = 3, kLayer = 1;
  constexpr int32_t kFullCheckContext = 1000, kSampleStride = 23;

  // Pages: shuffled ids, two spare pages nobody owns, every unwritten row NaN. Other layers of
  // owned pages hold different random rows, so reading the wrong layer shows.
  const auto num_seqs = static_cast<int32_t>(seqs.size());
  int32_t total_pages = 2, max_pages = 0;
  for (const SeqSpec& s : seqs) {
    const int32_t pages = (s.context + kBlock - 1) / kBlock;
    total_pages += pages;
    max_pages = std::max(max_pages, pages);
  }
  std::vector<int32_t> page_ids(total_pages);
  std::iota(page_ids.begin(), page_ids.end(), 0);
  std::shuffle(page_ids.begin(), page_ids.end(), rng);
  const int32_t table_stride = max_pages + 2;
  std::vector<int32_t> table(static_cast<size_t>(num_seqs) * table_stride, kBadPage);
  std::vector<uint8_t> pool(total_pages * size_t{kLayers} * kBlock * row_bytes, 0xff);
  if (!fp8) {
    for (size_t i = 0; i < pool.size(); i += 2) std::memcpy(&pool[i], &kBf16NaN, 2);
  }
  const auto row_at = [&](int32_t page, int32_t layer, int32_t row) {
    return pool.data() + ((static_cast<size_t>(page) * kLayers + layer) * kBlock + row) * row_bytes;
  };
  // Row values as the kernel reads them: bf16, or fp8 dequantised and rounded to bf16.
  const auto read_row = [&](const uint8_t* row, float* out) {
    if (fp8) {
      cpu::dequantize_latent_fp8(f, row, 1, out, kWidth);
      for (int32_t i = 0; i < kWidth; ++i) out[i] = bf16_to_f32(f32_to_bf16(out[i]));
    } else {
      convert_to_f32(DType::kBF16, row, kWidth, out);
    }
  };
  int32_t next_page = 0;
  for (int32_t s = 0; s < num_seqs; ++s) {
    for (int32_t j = 0; j < seqs[s].context; ++j) {
      if (j % kBlock == 0) table[s * table_stride + j / kBlock] = page_ids[next_page++];
      for (int32_t layer = 0; layer < kLayers; ++layer) {
        uint8_t* row = row_at(table[s * table_stride + j / kBlock], layer, j % kBlock);
        float values[kWidth];
        for (float& v : values) v = dist(rng);
        if (fp8) {
          cpu::quantize_latent_fp8(f, values, 1, kWidth, row);
        } else {
          for (int32_t i = 0; i < kWidth; ++i) {
            const uint16_t v = f32_to_bf16(values[i]);
            std::memcpy(row + 2 * i, &v, 2);
          }
        }
      }
    }
  }

  std::vector<int32_t> token_seq, num_keys;
  for (int32_t s = 0; s < num_seqs; ++s) {
    for (int32_t n : seqs[s].num_keys) {
      token_seq.push_back(s);
      num_keys.push_back(n);
    }
  }
  const auto tokens = static_cast<int32_t>(token_seq.size());
  std::vector<uint16_t> q(static_cast<size_t>(tokens) * heads * kWidth);
  for (auto& v : q) v = random_bf16();

  test::DeviceArray<uint16_t> d_q(q.size());
  test::DeviceArray<uint8_t> d_pool(pool.size());
  test::DeviceArray<int32_t> d_table(table.size()), d_token_seq(tokens), d_num_keys(tokens);
  test::DeviceArray<uint16_t> d_out(static_cast<size_t>(tokens) * heads * kDc);
  test::DeviceArray<float> d_lse(static_cast<size_t>(tokens) * heads);
  const size_t workspace_bytes = cuda::mla_prefill_workspace_size(tokens, heads);
  test::DeviceArray<unsigned char> d_workspace(workspace_bytes);
  d_q.upload(q);
  d_pool.upload(pool);
  d_table.upload(table);
  d_token_seq.upload(token_seq);
  d_num_keys.upload(num_keys);

  cuda::MlaPrefillParams p{};
  p.q = as_bf16(d_q.get());
  p.pool = d_pool.get();
  p.element = element;
  p.layer = kLayer;
  p.num_layers = kLayers;
  p.block_table = d_table.get();
  p.table_stride = table_stride;
  p.token_seq = d_token_seq.get();
  p.num_keys = d_num_keys.get();
  p.tokens = tokens;
  p.heads = heads;
  p.scale = 1.0f / std::sqrt(192.0f);  // DeepSeek's (d_n + d_r)^-0.5: score std about 1.7
  p.out = as_bf16(d_out.get());
  p.lse = d_lse.get();

  std::vector<uint16_t> out[2];
  std::vector<float> lse[2];
  // Run 0 on the default stream, run 1 replayed from a CUDA graph; they must agree bit for bit.
  void* workspace = workspace_bytes ? d_workspace.get() : nullptr;
  for (int run = 0; run < 2; ++run) {
    d_out.poison();
    d_lse.poison();
    d_workspace.poison();
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    if (run == 0) {
      cuda::mla_prefill(p, workspace, nullptr);
    } else {
      test::run_in_graph([&](cudaStream_t stream) { cuda::mla_prefill(p, workspace, stream); });
    }
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    out[run] = d_out.download();
    lse[run] = d_lse.download();
  }
  EXPECT_EQ(std::memcmp(out[0].data(), out[1].data(), out[0].size() * 2), 0)
      << "two runs differ (out)";
  EXPECT_EQ(std::memcmp(lse[0].data(), lse[1].data(), lse[0].size() * 4), 0)
      << "two runs differ (lse)";

  // Reference, one token per work item.
  std::vector<int32_t> checked;
  for (int32_t t = 0, first = 0; t < tokens; ++t) {
    if (t > 0 && token_seq[t] != token_seq[t - 1]) first = t;
    const bool last = t + 1 == tokens || token_seq[t + 1] != token_seq[t];
    if (seqs[token_seq[t]].context <= kFullCheckContext || (t - first) % kSampleStride == 0 ||
        last) {
      checked.push_back(t);
    }
  }
  std::vector<std::vector<float>> pages_f32(num_seqs);
  std::vector<std::vector<const float*>> page_ptrs(num_seqs);
  for (int32_t s = 0; s < num_seqs; ++s) {
    const int32_t pages = (seqs[s].context + kBlock - 1) / kBlock;
    pages_f32[s].assign(static_cast<size_t>(pages) * kBlock * kWidth,
                        std::numeric_limits<float>::quiet_NaN());
    for (int32_t k = 0; k < pages; ++k) {
      for (int32_t r = 0; r < kBlock && k * kBlock + r < seqs[s].context; ++r) {
        read_row(row_at(table[s * table_stride + k], kLayer, r),
                 pages_f32[s].data() + (static_cast<size_t>(k) * kBlock + r) * kWidth);
      }
    }
    for (int32_t k = 0; k < pages; ++k) {
      page_ptrs[s].push_back(pages_f32[s].data() + static_cast<size_t>(k) * kBlock * kWidth);
    }
  }
  std::vector<float> ref_out(static_cast<size_t>(tokens) * heads * kDc);
  std::vector<float> ref_lse(static_cast<size_t>(tokens) * heads);
  test::parallel_for(static_cast<int64_t>(checked.size()), [&](int64_t i) {
    const int32_t t = checked[i];
    std::vector<float> q_lat(static_cast<size_t>(heads) * kDc),
        q_rope(static_cast<size_t>(heads) * kDr);
    for (int32_t h = 0; h < heads; ++h) {
      const uint16_t* row = q.data() + (static_cast<size_t>(t) * heads + h) * kWidth;
      for (int32_t d = 0; d < kDc; ++d) q_lat[h * kDc + d] = bf16_to_f32(row[d]);
      for (int32_t d = 0; d < kDr; ++d) q_rope[h * kDr + d] = bf16_to_f32(row[kDc + d]);
    }
    cpu::LatentAttentionParams r{};
    r.q_lat = q_lat.data();
    r.q_rope = q_rope.data();
    r.page_ptrs = page_ptrs[token_seq[t]].data();
    r.num_keys = &num_keys[t];
    r.tokens = 1;
    r.heads = heads;
    r.d_c = kDc;
    r.d_r = kDr;
    r.block_size = kBlock;
    r.scale = p.scale;
    r.out = ref_out.data() + static_cast<size_t>(t) * heads * kDc;
    r.lse = ref_lse.data() + static_cast<size_t>(t) * heads;
    cpu::latent_attention(r);
  });

  // Tolerances. out: the kernel rounds P to bf16 before P V (2^-8 relative per weight, random
  // in sign, so about 2^-8 of the row's RMS in total) and rounds its fp32 result once to bf16
  // (2^-8 relative); hence 2^-7 |ref| + 2^-6 RMS(ref row), a few times both. lse: only fp32
  // summation order and ex2.approx differ from the reference (~1e-5), so 1e-3 absolute.
  int64_t failures = 0;
  for (int32_t t : checked) {
    for (int32_t h = 0; h < heads; ++h) {
      const size_t row = static_cast<size_t>(t) * heads + h;
      const uint16_t* got = out[0].data() + row * kDc;
      const float* want = ref_out.data() + row * kDc;
      const float got_lse = lse[0][row];
      const auto where = [&] {
        return "token " + std::to_string(t) + " (sequence " + std::to_string(token_seq[t]) +
               ", num_keys " + std::to_string(num_keys[t]) + "), head " + std::to_string(h);
      };
      if (num_keys[t] <= 0) {
        bool zero = true;
        for (int32_t d = 0; d < kDc; ++d) zero = zero && bf16_to_f32(got[d]) == 0.0f;
        if ((!zero || got_lse != -std::numeric_limits<float>::infinity()) && failures++ < 10) {
          ADD_FAILURE() << where() << ": want out 0 and lse -inf, got lse " << got_lse;
        }
        continue;
      }
      double sq = 0;
      for (int32_t d = 0; d < kDc; ++d) sq += double{want[d]} * want[d];
      const double rms = std::sqrt(sq / kDc);
      for (int32_t d = 0; d < kDc; ++d) {
        const float g = bf16_to_f32(got[d]);
        const double tol = std::ldexp(std::abs(want[d]), -7) + std::ldexp(rms, -6);
        if (!(std::abs(g - want[d]) <= tol) && failures++ < 10) {
          ADD_FAILURE() << where() << ", dim " << d << ": got " << g << ", want " << want[d];
        }
      }
      if (!(std::abs(got_lse - ref_lse[row]) <= 1e-3) && failures++ < 10) {
        ADD_FAILURE() << where() << ": lse " << got_lse << ", want " << ref_lse[row];
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

// The chunk mix of a busy prefill step. Tiles of several tokens (heads < 64) straddle
// sequence boundaries; the first sequence's num_keys go up and down and include 0.
std::vector<SeqSpec> mixed_chunks() {
  return {
      {150, {17, 0, 150, 3, 64, 65, 0, 128, 1}},
      {1, causal_chunk(1, 1)},
      {100, causal_chunk(100, 100)},
      {0, {0, 0, 0}},
      {1000, causal_chunk(1000, 37)},
      {5000, causal_chunk(5000, 300)},
  };
}

TEST(CudaMlaPrefill, MixedChunksMatchCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // 1 head: 64 tokens per tile (few CTAs, so the keys are split across CTAs); 16: 4 tokens
  // per tile; 128: two 64-head tiles per token.
  for (int32_t heads : {1, 16, 128}) check_mla_prefill(heads, mixed_chunks(), 4242 + heads);
}

TEST(CudaMlaPrefill, ShortSequencesAndOddHeadCounts) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // Decode-like batches: many sequences of 1-3 tokens, so tiles hold many sequences. 20 heads
  // leave 4 of 64 tile rows unused; 100 heads make two 50-head tiles.
  std::mt19937 rng(99);
  std::uniform_int_distribution<int32_t> context(1, 300), chunk(1, 3);
  std::vector<SeqSpec> seqs;
  for (int i = 0; i < 40; ++i) {
    const int32_t c = context(rng);
    seqs.push_back({c, causal_chunk(c, std::min(c, chunk(rng)))});
  }
  seqs[7].num_keys = {0};
  seqs[20].num_keys.assign(seqs[20].num_keys.size(), 0);
  for (int32_t heads : {1, 20, 100}) check_mla_prefill(heads, seqs, 777 + heads);
}

TEST(CudaMlaPrefill, Fp8CacheMixedChunks) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int32_t heads : {1, 16, 128}) {
    check_mla_prefill(heads, mixed_chunks(), 656 + heads, cuda::LatentElement::kFp8);
  }
}

TEST(CudaMlaPrefill, FewTokensLongContext) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // Few tiles for 128 heads: the keys are split across CTAs and merged by LSE.
  const std::vector<SeqSpec> seqs = {
      {3000, causal_chunk(3000, 5)}, {64, {64}}, {0, {0}}, {777, {1, 700, 0, 777}}};
  check_mla_prefill(128, seqs, 31337);
}

}  // namespace
}  // namespace mla
