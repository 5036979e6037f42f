// CUDA decompressed-form (MHA) causal prefill attention against cpu::dense_attention on the
// bf16-rounded inputs, varlen over sequences with fresh prefills (nq = nk) and later chunks
// (nq < nk). Inputs sit in the layouts the runtime produces (k_nope and v interleaved in one
// GEMM output, k_rope shared by all heads inside a wider row) with NaN in every gap;
// outputs are poisoned; a second run, replayed from a CUDA graph, must agree bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/mha_prefill.h"
#include "kernels/dtype.h"
#include "tests/gpu/bf16_test_util.h"

namespace mla {
namespace {

constexpr uint16_t kBf16NaN = 0x7fc0;

__nv_bfloat16* as_bf16(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

struct Dims {
  int32_t heads, d_nope, d_rope, d_v;
  bool shared_rope;  // k_rope one per key (head stride 0) or one per key and head
};

struct SeqLen {
  int32_t nq, nk;
};

void check_mha_prefill(const Dims& dims, const std::vector<SeqLen>& seqs, bool with_lse,
                       uint32_t seed) {
  const int32_t H = dims.heads, d_nope = dims.d_nope, d_rope = dims.d_rope, d_v = dims.d_v;
  const int32_t d_qk = d_nope + d_rope;
  SCOPED_TRACE("heads " + std::to_string(H) + ", dims " + std::to_string(d_nope) + "/" +
               std::to_string(d_rope) + "/" + std::to_string(d_v) +
               (dims.shared_rope ? ", shared k_rope" : ", per-head k_rope"));
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;

  const auto num_seqs = static_cast<int32_t>(seqs.size());
  std::vector<int32_t> cu_q{0}, cu_k{0};
  int32_t max_q = 0;
  for (const SeqLen& s : seqs) {
    cu_q.push_back(cu_q.back() + s.nq);
    cu_k.push_back(cu_k.back() + s.nk);
    max_q = std::max(max_q, s.nq);
  }
  const int32_t total_q = cu_q.back();
  // Two NaN keys past the last sequence: a kernel reading past nk sees them.
  const int32_t key_rows = cu_k.back() + 2;

  // Layouts (element strides, all multiples of 8):
  //   q      [total_q, H, d_qk + 8]: 8 NaN after each head's query
  //   kv     [key_rows, H, d_nope + d_v]: k_nope then v, as one up-projection GEMM writes them
  //   k_rope [key_rows, 16 + d_rope] (shared; 16 NaN first, like k_r at the end of a latent
  //          row) or [key_rows, H, d_rope] (per head)
  const int64_t q_head_stride = d_qk + 8, q_token_stride = H * q_head_stride;
  const int64_t kv_head_stride = d_nope + d_v, kv_token_stride = H * kv_head_stride;
  const int64_t kr_head_stride = dims.shared_rope ? 0 : d_rope;
  const int64_t kr_token_stride = dims.shared_rope ? 16 + d_rope : int64_t{H} * d_rope;
  const int64_t kr_offset = dims.shared_rope ? 16 : 0;
  std::vector<uint16_t> q(total_q * q_token_stride, kBf16NaN);
  std::vector<uint16_t> kv(key_rows * kv_token_stride, kBf16NaN);
  std::vector<uint16_t> kr(std::max<int64_t>(key_rows * kr_token_stride, 1), kBf16NaN);
  const auto fill = [&](uint16_t* dst, int32_t n) {
    for (int32_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(dist(rng));
  };
  for (int32_t t = 0; t < total_q; ++t) {
    for (int32_t h = 0; h < H; ++h) fill(&q[t * q_token_stride + h * q_head_stride], d_qk);
  }
  for (int32_t j = 0; j < cu_k.back(); ++j) {
    for (int32_t h = 0; h < H; ++h) {
      fill(&kv[j * kv_token_stride + h * kv_head_stride], d_nope + d_v);
      if (h == 0 || !dims.shared_rope) {
        fill(&kr[j * kr_token_stride + kr_offset + h * kr_head_stride], d_rope);
      }
    }
  }

  test::DeviceArray<uint16_t> d_q(q.size()), d_kv(kv.size()), d_kr(kr.size());
  test::DeviceArray<int32_t> d_cu_q(cu_q.size()), d_cu_k(cu_k.size());
  test::DeviceArray<uint16_t> d_out(static_cast<size_t>(total_q) * H * d_v);
  test::DeviceArray<float> d_lse(static_cast<size_t>(total_q) * H);
  d_q.upload(q);
  d_kv.upload(kv);
  d_kr.upload(kr);
  d_cu_q.upload(cu_q);
  d_cu_k.upload(cu_k);

  cuda::MhaPrefillParams p{};
  p.q = as_bf16(d_q.get());
  p.k_nope = as_bf16(d_kv.get());
  p.k_rope = d_rope > 0 ? as_bf16(d_kr.get()) + kr_offset : nullptr;
  p.v = as_bf16(d_kv.get()) + d_nope;
  p.q_token_stride = q_token_stride;
  p.q_head_stride = q_head_stride;
  p.kn_token_stride = p.v_token_stride = kv_token_stride;
  p.kn_head_stride = p.v_head_stride = kv_head_stride;
  p.kr_token_stride = kr_token_stride;
  p.kr_head_stride = kr_head_stride;
  p.cu_q = d_cu_q.get();
  p.cu_k = d_cu_k.get();
  p.num_seqs = num_seqs;
  p.max_q = max_q;
  p.heads = H;
  p.d_nope = d_nope;
  p.d_rope = d_rope;
  p.d_v = d_v;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d_qk));  // score std about 1
  p.out = as_bf16(d_out.get());
  p.lse = with_lse ? d_lse.get() : nullptr;

  std::vector<uint16_t> out[2];
  std::vector<float> lse[2];
  // Run 0 on the default stream, run 1 replayed from a CUDA graph; they must agree bit for bit.
  for (int run = 0; run < 2; ++run) {
    d_out.poison();
    d_lse.poison();
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    if (run == 0) {
      cuda::mha_prefill(p, nullptr);
    } else {
      test::run_in_graph([&](cudaStream_t stream) { cuda::mha_prefill(p, stream); });
    }
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    out[run] = d_out.download();
    lse[run] = d_lse.download();
  }
  EXPECT_EQ(std::memcmp(out[0].data(), out[1].data(), out[0].size() * 2), 0)
      << "two runs differ (out)";
  EXPECT_EQ(std::memcmp(lse[0].data(), lse[1].data(), lse[0].size() * 4), 0)
      << "two runs differ (lse)";
  if (!with_lse) {
    uint32_t bits = 0;
    for (float v : lse[0]) {
      std::memcpy(&bits, &v, 4);
      if (bits != 0xFFFFFFFFu) {
        ADD_FAILURE() << "lse written although null was passed";
        break;
      }
    }
  }

  // Reference: full keys [nk, H, d_qk] per sequence, 16 query tokens per work item.
  std::vector<float> ref_out(static_cast<size_t>(total_q) * H * d_v);
  std::vector<float> ref_lse(static_cast<size_t>(total_q) * H);
  std::vector<std::vector<float>> q_f(num_seqs), k_f(num_seqs), v_f(num_seqs);
  std::vector<std::vector<int32_t>> num_keys(num_seqs);
  struct Item {
    int32_t seq, begin, end;
  };
  std::vector<Item> items;
  for (int32_t s = 0; s < num_seqs; ++s) {
    const int32_t nq = seqs[s].nq, nk = seqs[s].nk;
    q_f[s].resize(static_cast<size_t>(nq) * H * d_qk);
    k_f[s].resize(static_cast<size_t>(nk) * H * d_qk);
    v_f[s].resize(static_cast<size_t>(nk) * H * d_v);
    for (int32_t i = 0; i < nq; ++i) {
      for (int32_t h = 0; h < H; ++h) {
        for (int32_t d = 0; d < d_qk; ++d) {
          q_f[s][(static_cast<size_t>(i) * H + h) * d_qk + d] =
              bf16_to_f32(q[(cu_q[s] + i) * q_token_stride + h * q_head_stride + d]);
        }
      }
      num_keys[s].push_back(nk - nq + i + 1);
    }
    for (int32_t j = 0; j < nk; ++j) {
      const int64_t row = cu_k[s] + j;
      for (int32_t h = 0; h < H; ++h) {
        float* k = &k_f[s][(static_cast<size_t>(j) * H + h) * d_qk];
        float* v = &v_f[s][(static_cast<size_t>(j) * H + h) * d_v];
        const uint16_t* kv_row = &kv[row * kv_token_stride + h * kv_head_stride];
        const uint16_t* kr_row = &kr[row * kr_token_stride + kr_offset + h * kr_head_stride];
        for (int32_t d = 0; d < d_nope; ++d) k[d] = bf16_to_f32(kv_row[d]);
        for (int32_t d = 0; d < d_rope; ++d) k[d_nope + d] = bf16_to_f32(kr_row[d]);
        for (int32_t d = 0; d < d_v; ++d) v[d] = bf16_to_f32(kv_row[d_nope + d]);
      }
    }
    for (int32_t b = 0; b < nq; b += 16) items.push_back({s, b, std::min(nq, b + 16)});
  }
  test::parallel_for(static_cast<int64_t>(items.size()), [&](int64_t i) {
    const Item& it = items[i];
    const int32_t nk = seqs[it.seq].nk;
    cpu::DenseAttentionParams r{};
    r.q = q_f[it.seq].data() + static_cast<size_t>(it.begin) * H * d_qk;
    r.k = k_f[it.seq].data();
    r.v = v_f[it.seq].data();
    r.num_keys = num_keys[it.seq].data() + it.begin;
    r.tokens = it.end - it.begin;
    r.keys = nk;
    r.heads = H;
    r.d_qk = d_qk;
    r.d_v = d_v;
    r.scale = p.scale;
    r.out = ref_out.data() + (static_cast<size_t>(cu_q[it.seq]) + it.begin) * H * d_v;
    cpu::dense_attention(r);
    // dense_attention has no LSE output: the same scores again, through softmax_inplace.
    std::vector<float> scores(nk);
    for (int32_t t = it.begin; t < it.end; ++t) {
      const int32_t n = num_keys[it.seq][t];
      for (int32_t h = 0; h < H; ++h) {
        const float* qv = &q_f[it.seq][(static_cast<size_t>(t) * H + h) * d_qk];
        for (int32_t j = 0; j < n; ++j) {
          const float* k = &k_f[it.seq][(static_cast<size_t>(j) * H + h) * d_qk];
          float s = 0.0f;
          for (int32_t d = 0; d < d_qk; ++d) s += qv[d] * k[d];
          scores[j] = s * p.scale;
        }
        ref_lse[(static_cast<size_t>(cu_q[it.seq]) + t) * H + h] =
            cpu::softmax_inplace(scores.data(), n);
      }
    }
  });

  // Tolerances. out: the kernel rounds P to bf16 before P V (2^-8 relative per weight, random
  // in sign, so about 2^-8 of the row's RMS in total) and rounds its fp32 result once to bf16
  // (2^-8 relative); hence 2^-7 |ref| + 2^-6 RMS(ref row), a few times both. lse: only fp32
  // summation order and ex2.approx differ from the reference (~1e-5), so 1e-3 absolute.
  int64_t failures = 0;
  for (int32_t s = 0; s < num_seqs; ++s) {
    for (int32_t i = 0; i < seqs[s].nq; ++i) {
      for (int32_t h = 0; h < H; ++h) {
        const size_t row = (static_cast<size_t>(cu_q[s]) + i) * H + h;
        const uint16_t* got = out[0].data() + row * d_v;
        const float* want = ref_out.data() + row * d_v;
        const auto where = [&] {
          return "sequence " + std::to_string(s) + " (nq " + std::to_string(seqs[s].nq) + ", nk " +
                 std::to_string(seqs[s].nk) + "), query " + std::to_string(i) + ", head " +
                 std::to_string(h);
        };
        double sq = 0;
        for (int32_t d = 0; d < d_v; ++d) sq += double{want[d]} * want[d];
        const double rms = std::sqrt(sq / d_v);
        for (int32_t d = 0; d < d_v; ++d) {
          const float g = bf16_to_f32(got[d]);
          const double tol = std::ldexp(std::abs(want[d]), -7) + std::ldexp(rms, -6);
          if (!(std::abs(g - want[d]) <= tol) && failures++ < 10) {
            ADD_FAILURE() << where() << ", dim " << d << ": got " << g << ", want " << want[d];
          }
        }
        if (with_lse && !(std::abs(lse[0][row] - ref_lse[row]) <= 1e-3) && failures++ < 10) {
          ADD_FAILURE() << where() << ": lse " << lse[0][row] << ", want " << ref_lse[row];
        }
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

// Fresh prefills (nq = nk) of lengths around the 64-row and 64-key tiles, and later chunks
// (nq < nk), one of a single query.
std::vector<SeqLen> mixed_sequences() {
  return {{1, 1}, {77, 77}, {50, 300}, {200, 200}, {1, 513}, {64, 64}, {129, 400}, {130, 130}};
}

TEST(CudaMhaPrefill, DeepSeekDimsMatchCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int32_t heads : {1, 16, 32}) {
    check_mha_prefill({heads, 128, 64, 128, true}, mixed_sequences(), true, 100 + heads);
  }
}

TEST(CudaMhaPrefill, SmallDimsMatchCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int32_t heads : {1, 16, 32}) {
    check_mha_prefill({heads, 16, 16, 16, heads != 16}, mixed_sequences(), heads != 1, 200 + heads);
  }
}

TEST(CudaMhaPrefill, OtherHeadDimsMatchCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // Each shape takes a different compile-time tile: no rotary part (48/0/80), d_qk = 256
  // (192/64/128), d_v = 256 (128/64/256, d_qk below its tile's bound).
  const std::vector<SeqLen> seqs = {{70, 70}, {3, 150}, {100, 165}};
  check_mha_prefill({3, 48, 0, 80, true}, seqs, true, 301);
  check_mha_prefill({3, 192, 64, 128, false}, seqs, true, 302);
  check_mha_prefill({3, 128, 64, 256, true}, seqs, true, 303);
}

}  // namespace
}  // namespace mla
