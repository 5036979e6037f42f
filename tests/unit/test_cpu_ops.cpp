// The fp32 CPU reference ops against plain double-precision loops, on fresh random inputs.
// Outputs start as NaN so an element an op forgets to write fails the comparison; padding
// between rows holds a sentinel that must survive untouched.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/ops.h"

namespace mla {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kPad = 12345.0f;  // padding between rows: never written by an op

std::vector<float> random_vector(std::mt19937& rng, size_t n, float stddev = 1.0f) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// Relative error of `got` against `want`: ||got - want|| / ||want||; infinite on NaN.
double rel_error(const float* got, const double* want, int64_t n) {
  double err = 0, norm = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    err += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(err / std::max(norm, 1e-300));
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// ---------------------------------------------------------------------------------------
// gemm, matmul_nt, matmul_nn

struct GemmCase {
  bool trans_w;
  int64_t m, n, k, pad_x, pad_w, pad_y;
  float beta;
  unsigned seed;
  bool batch_invariant = false;  // through gemm_batch_invariant
};

void check_gemm(const GemmCase& c) {
  SCOPED_TRACE(testing::Message() << "trans_w " << c.trans_w << " m " << c.m << " n " << c.n
                                  << " k " << c.k << " beta " << c.beta);
  std::mt19937 rng(c.seed);
  const int64_t ldx = c.k + c.pad_x;
  const int64_t w_rows = c.trans_w ? c.n : c.k, w_cols = c.trans_w ? c.k : c.n;
  const int64_t ldw = w_cols + c.pad_w, ldy = c.n + c.pad_y;
  // Padding of the inputs is NaN: a product that reads it poisons the result.
  std::vector<float> x(c.m * ldx, kNaN), w(w_rows * ldw, kNaN), y(c.m * ldy, kPad);
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < c.m; ++i)
    for (int64_t j = 0; j < c.k; ++j) x[i * ldx + j] = normal(rng);
  for (int64_t i = 0; i < w_rows; ++i)
    for (int64_t j = 0; j < w_cols; ++j) w[i * ldw + j] = normal(rng);
  for (int64_t i = 0; i < c.m; ++i)
    for (int64_t j = 0; j < c.n; ++j) y[i * ldy + j] = c.beta == 0.0f ? kNaN : normal(rng);

  std::vector<double> want(c.m * c.n);
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t j = 0; j < c.n; ++j) {
      double s = c.beta == 0.0f ? 0.0 : static_cast<double>(c.beta) * y[i * ldy + j];
      for (int64_t l = 0; l < c.k; ++l) {
        const double wv = c.trans_w ? w[j * ldw + l] : w[l * ldw + j];
        s += static_cast<double>(x[i * ldx + l]) * wv;
      }
      want[i * c.n + j] = s;
    }
  }
  if (c.batch_invariant) {
    cpu::gemm_batch_invariant(c.trans_w, c.m, c.n, c.k, x.data(), ldx, w.data(), ldw, y.data(), ldy,
                              c.beta);
  } else {
    cpu::gemm(c.trans_w, c.m, c.n, c.k, x.data(), ldx, w.data(), ldw, y.data(), ldy, c.beta);
  }
  std::vector<float> got(c.m * c.n);
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t j = 0; j < c.n; ++j) got[i * c.n + j] = y[i * ldy + j];
    for (int64_t j = c.n; j < ldy; ++j) ASSERT_EQ(y[i * ldy + j], kPad) << "padding written";
  }
  EXPECT_LT(rel_error(got.data(), want.data(), c.m * c.n), 1e-6);
}

TEST(CpuOps, GemmBothTransposesWithPaddedLeadingDims) {
  unsigned seed = 100;
  for (bool trans_w : {false, true}) {
    for (float beta : {0.0f, 1.0f, 0.5f}) {
      check_gemm({trans_w, 7, 5, 3, 2, 3, 4, beta, seed++});
      check_gemm({trans_w, 1, 33, 17, 5, 1, 7, beta, seed++});
      check_gemm({trans_w, 40, 24, 96, 8, 16, 3, beta, seed++});
      check_gemm({trans_w, 3, 1, 64, 0, 0, 0, beta, seed++});
    }
  }
}

TEST(CpuOps, BatchInvariantGemmComputesTheSameProduct) {
  unsigned seed = 300;
  for (bool trans_w : {false, true}) {
    for (float beta : {0.0f, 1.0f, 0.5f}) {
      for (int64_t m : {1, 15, 16, 17, 40}) {
        check_gemm({trans_w, m, 24, 96, 8, 16, 3, beta, seed++, /*batch_invariant=*/true});
      }
    }
  }
}

// Each row of gemm_batch_invariant is the same bits whatever the number of rows around it
// (what the engine's deterministic option rests on).
TEST(CpuOps, BatchInvariantGemmRowsDoNotDependOnTheOtherRows) {
  std::mt19937 rng(17);
  const int64_t rows = 40, k = 512, n = 96;
  const auto x = random_vector(rng, rows * k), w = random_vector(rng, n * k);
  std::vector<float> all(rows * n);
  cpu::matmul_nt(x.data(), rows, k, w.data(), n, all.data(), 0.0f, /*batch_invariant=*/true);
  for (int64_t m : {1, 2, 7, 16, 17, 33}) {
    for (int64_t first : {int64_t{0}, rows - m}) {
      std::vector<float> some(m * n);
      cpu::matmul_nt(x.data() + first * k, m, k, w.data(), n, some.data(), 0.0f, true);
      for (int64_t i = 0; i < m * n; ++i) {
        ASSERT_EQ(some[i], all[first * n + i])
            << m << " rows from row " << first << ", value " << i;
      }
    }
  }
}

TEST(CpuOps, MatmulNtAndNnWithAccumulation) {
  std::mt19937 rng(7);
  const int64_t m = 6, k = 19, n = 11;
  const auto x = random_vector(rng, m * k);
  const auto w_nt = random_vector(rng, n * k);  // [n, k]
  const auto w_nn = random_vector(rng, k * n);  // [k, n]
  const auto y0 = random_vector(rng, m * n);
  for (float beta : {0.0f, 1.0f}) {
    SCOPED_TRACE(testing::Message() << "beta " << beta);
    std::vector<double> want_nt(m * n), want_nn(m * n);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double s_nt = beta * static_cast<double>(y0[i * n + j]), s_nn = s_nt;
        for (int64_t l = 0; l < k; ++l) {
          s_nt += static_cast<double>(x[i * k + l]) * w_nt[j * k + l];
          s_nn += static_cast<double>(x[i * k + l]) * w_nn[l * n + j];
        }
        want_nt[i * n + j] = s_nt;
        want_nn[i * n + j] = s_nn;
      }
    }
    std::vector<float> y_nt = beta == 0.0f ? std::vector<float>(m * n, kNaN) : y0;
    std::vector<float> y_nn = y_nt;
    cpu::matmul_nt(x.data(), m, k, w_nt.data(), n, y_nt.data(), beta);
    cpu::matmul_nn(x.data(), m, k, w_nn.data(), n, y_nn.data(), beta);
    EXPECT_LT(rel_error(y_nt.data(), want_nt.data(), m * n), 1e-6);
    EXPECT_LT(rel_error(y_nn.data(), want_nn.data(), m * n), 1e-6);
  }
}

// ---------------------------------------------------------------------------------------
// rms_norm, silu_mul, add_inplace, softmax_inplace

std::vector<double> rms_norm_reference(const std::vector<float>& x, int64_t rows, int64_t d,
                                       int64_t stride, const std::vector<float>& w, float eps) {
  std::vector<double> out(rows * d);
  for (int64_t r = 0; r < rows; ++r) {
    double ms = 0;
    for (int64_t i = 0; i < d; ++i)
      ms += static_cast<double>(x[r * stride + i]) * x[r * stride + i];
    const double inv = 1.0 / std::sqrt(ms / d + eps);
    for (int64_t i = 0; i < d; ++i) out[r * d + i] = x[r * stride + i] * inv * w[i];
  }
  return out;
}

TEST(CpuOps, RmsNormContiguousStridedAndInPlace) {
  std::mt19937 rng(11);
  const int64_t rows = 5, d = 48, x_stride = 56, y_stride = 61;
  const float eps = 1e-6f;
  auto x = random_vector(rng, rows * x_stride, 3.0f);
  for (int64_t r = 0; r < rows; ++r)
    std::fill(x.begin() + r * x_stride + d, x.begin() + (r + 1) * x_stride, kNaN);
  const auto w = random_vector(rng, d);
  const auto want = rms_norm_reference(x, rows, d, x_stride, w, eps);

  // Strided input and output.
  std::vector<float> y(rows * y_stride, kPad);
  for (int64_t r = 0; r < rows; ++r) std::fill_n(&y[r * y_stride], d, kNaN);
  cpu::rms_norm(x.data(), rows, d, x_stride, w.data(), eps, y.data(), y_stride);
  std::vector<float> got(rows * d);
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(&y[r * y_stride], d, &got[r * d]);
    for (int64_t i = d; i < y_stride; ++i) ASSERT_EQ(y[r * y_stride + i], kPad);
  }
  EXPECT_LT(rel_error(got.data(), want.data(), rows * d), 1e-6);

  // In place, same stride: the padding (NaN here) must neither be read nor written.
  auto inplace = x;
  cpu::rms_norm(inplace.data(), rows, d, x_stride, w.data(), eps, inplace.data(), x_stride);
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(&inplace[r * x_stride], d, &got[r * d]);
    for (int64_t i = d; i < x_stride; ++i) ASSERT_TRUE(std::isnan(inplace[r * x_stride + i]));
  }
  EXPECT_LT(rel_error(got.data(), want.data(), rows * d), 1e-6);

  // eps matters for a near-zero row: rsqrt(0 + eps) instead of a division by zero.
  std::vector<float> zero(d, 0.0f), out(d, kNaN);
  cpu::rms_norm(zero.data(), 1, d, d, w.data(), eps, out.data(), d);
  for (float v : out) EXPECT_EQ(v, 0.0f);
}

TEST(CpuOps, SiluMulAndAddInplace) {
  std::mt19937 rng(13);
  const int64_t rows = 4, width = 37;
  auto gate_up = random_vector(rng, rows * 2 * width, 4.0f);
  gate_up[0] = -120.0f;  // exp(120) overflows fp32: silu must still be ~0, not NaN
  gate_up[1] = 120.0f;
  std::vector<float> out(rows * width, kNaN);
  cpu::silu_mul(gate_up.data(), rows, width, out.data());
  std::vector<double> want(rows * width);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < width; ++i) {
      const double g = gate_up[r * 2 * width + i], u = gate_up[r * 2 * width + width + i];
      want[r * width + i] = g / (1.0 + std::exp(-g)) * u;
    }
  }
  EXPECT_LT(rel_error(out.data(), want.data(), rows * width), 1e-6);
  EXPECT_TRUE(std::isfinite(out[0]));
  EXPECT_NEAR(out[0], 0.0f, 1e-30f);

  auto a = random_vector(rng, 29);
  const auto b = random_vector(rng, 29);
  const auto a0 = a;
  cpu::add_inplace(a.data(), b.data(), 29);
  for (int i = 0; i < 29; ++i) EXPECT_EQ(a[i], a0[i] + b[i]);
}

TEST(CpuOps, SoftmaxReturnsLseAndDoesNotOverflow) {
  std::mt19937 rng(17);
  for (float offset : {0.0f, 80.0f, 1000.0f, -1000.0f}) {
    SCOPED_TRACE(testing::Message() << "offset " << offset);
    auto x = random_vector(rng, 23, 5.0f);
    for (auto& v : x) v += offset;
    // LSE in double around the max, then log-space probabilities.
    const double mx = *std::max_element(x.begin(), x.end());
    double sum = 0;
    for (float v : x) sum += std::exp(static_cast<double>(v) - mx);
    const double want_lse = mx + std::log(sum);
    std::vector<double> want(x.size());
    for (size_t i = 0; i < x.size(); ++i) want[i] = std::exp(static_cast<double>(x[i]) - want_lse);

    const float lse = cpu::softmax_inplace(x.data(), static_cast<int64_t>(x.size()));
    EXPECT_NEAR(lse, want_lse, 1e-6 * std::max(1.0, std::fabs(want_lse)));
    EXPECT_LT(rel_error(x.data(), want.data(), static_cast<int64_t>(x.size())), 1e-6);
    EXPECT_NEAR(std::accumulate(x.begin(), x.end(), 0.0), 1.0, 1e-6);
  }
  // One value: probability 1, LSE the value itself.
  float one = 3.5f;
  EXPECT_EQ(cpu::softmax_inplace(&one, 1), 3.5f);
  EXPECT_EQ(one, 1.0f);
  // Nothing to normalise: the LSE of an empty set is -inf.
  EXPECT_EQ(cpu::softmax_inplace(nullptr, 0), -kInf);
}

// ---------------------------------------------------------------------------------------
// RoPE

std::vector<float> random_inv_freq(std::mt19937& rng, int64_t half) {
  std::uniform_real_distribution<float> u(1e-4f, 1.0f);
  std::vector<float> f(half);
  for (auto& v : f) v = u(rng);
  return f;
}

// pairs (2j, 2j+1) -> (j, j + d/2): what interleave=true reads, laid out as interleave=false.
std::vector<float> deinterleave(const std::vector<float>& x) {
  const size_t half = x.size() / 2;
  std::vector<float> out(x.size());
  for (size_t j = 0; j < half; ++j) {
    out[j] = x[2 * j];
    out[j + half] = x[2 * j + 1];
  }
  return out;
}

std::vector<float> rotated(std::vector<float> x, int64_t pos, const std::vector<float>& inv_freq,
                           float factor, bool interleave) {
  const int64_t d = static_cast<int64_t>(x.size());
  std::vector<float> cs(d, kNaN);
  cpu::rope_table(pos, inv_freq.data(), d, factor, cs.data());
  cpu::rope_rotate(x.data(), d, cs.data(), interleave);
  return x;
}

TEST(CpuOps, RopeTableIsCosSinOfFp32AngleTimesFactor) {
  std::mt19937 rng(19);
  const int64_t d = 64, half = d / 2;
  const auto inv_freq = random_inv_freq(rng, half);
  for (int64_t pos : {0, 1, 7, 4095, 100000}) {
    for (float factor : {1.0f, 1.3683f}) {
      std::vector<float> cs(d, kNaN);
      cpu::rope_table(pos, inv_freq.data(), d, factor, cs.data());
      for (int64_t j = 0; j < half; ++j) {
        // transformers forms the angle in fp32 (inv_freq @ positions), then takes cos/sin.
        const double angle = static_cast<float>(pos) * inv_freq[j];
        EXPECT_NEAR(cs[j], std::cos(angle) * factor, 2e-6) << "pos " << pos << " j " << j;
        EXPECT_NEAR(cs[half + j], std::sin(angle) * factor, 2e-6) << "pos " << pos << " j " << j;
      }
    }
  }
}

TEST(CpuOps, RopeRotateMatchesComplexMultiplication) {
  std::mt19937 rng(23);
  for (int64_t d : {int64_t{2}, int64_t{16}, int64_t{64}, cpu::kMaxRopeDim}) {
    const int64_t half = d / 2;
    const auto inv_freq = random_inv_freq(rng, half);
    for (bool interleave : {true, false}) {
      for (int64_t pos : {0, 3, 1000}) {
        SCOPED_TRACE(testing::Message()
                     << "d " << d << " interleave " << interleave << " pos " << pos);
        const float factor = 1.25f;
        const auto x = random_vector(rng, d);
        const auto got = rotated(x, pos, inv_freq, factor, interleave);
        std::vector<double> want(d);
        for (int64_t j = 0; j < half; ++j) {
          // Pair j as a complex number, rotated by e^{i pos theta_j}, scaled by the factor.
          const std::complex<double> z = interleave ? std::complex<double>(x[2 * j], x[2 * j + 1])
                                                    : std::complex<double>(x[j], x[j + half]);
          const double angle = static_cast<float>(pos) * inv_freq[j];
          const std::complex<double> r = z * std::polar<double>(factor, angle);
          want[j] = r.real();  // both layouts write pair j to (j, j + d/2)
          want[j + half] = r.imag();
        }
        EXPECT_LT(rel_error(got.data(), want.data(), d), 1e-6);
      }
    }
  }
}

TEST(CpuOps, RopeWithFactorOnePreservesNorm) {
  std::mt19937 rng(29);
  const int64_t d = 64;
  const auto inv_freq = random_inv_freq(rng, d / 2);
  const auto x = random_vector(rng, d);
  for (bool interleave : {true, false}) {
    for (int64_t pos : {1, 17, 5000}) {
      const auto y = rotated(x, pos, inv_freq, 1.0f, interleave);
      EXPECT_NEAR(dot(y, y), dot(x, x), 1e-5 * dot(x, x));
    }
    // The factor scales the norm by exactly that factor.
    const auto y = rotated(x, 9, inv_freq, 2.0f, interleave);
    EXPECT_NEAR(dot(y, y), 4.0 * dot(x, x), 1e-5 * dot(x, x));
  }
  // Position 0, factor 1: identity without interleave, a pure de-interleave with it.
  EXPECT_EQ(rotated(x, 0, inv_freq, 1.0f, false), x);
  EXPECT_EQ(rotated(x, 0, inv_freq, 1.0f, true), deinterleave(x));
}

// What attention needs from RoPE: q.k after rotation depends only on the distance of the
// positions, and both layouts give the same scores when q and k share the layout (the
// interleaved layout pairs (2j, 2j+1), the other (j, j + d/2) - the same pairs, renamed).
TEST(CpuOps, RopeScoresDependOnRelativePositionInBothLayouts) {
  std::mt19937 rng(31);
  const int64_t d = 64;
  const auto inv_freq = random_inv_freq(rng, d / 2);
  const auto q = random_vector(rng, d), k = random_vector(rng, d);
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{5, 2}, {40, 1}, {300, 260}}) {
    SCOPED_TRACE(testing::Message() << "q at " << m << ", k at " << n);
    const double inter =
        dot(rotated(q, m, inv_freq, 1.0f, true), rotated(k, n, inv_freq, 1.0f, true));
    const double plain = dot(rotated(deinterleave(q), m, inv_freq, 1.0f, false),
                             rotated(deinterleave(k), n, inv_freq, 1.0f, false));
    EXPECT_NEAR(inter, plain, 1e-5 * std::sqrt(dot(q, q) * dot(k, k)));
    // Shifting both positions leaves the score unchanged (up to fp32 angle rounding).
    const double shifted =
        dot(rotated(q, m - n, inv_freq, 1.0f, true), rotated(k, 0, inv_freq, 1.0f, true));
    EXPECT_NEAR(inter, shifted, 1e-4 * std::sqrt(dot(q, q) * dot(k, k)));
    // Sanity: a different distance gives a different score.
    const double other =
        dot(rotated(q, m - n + 1, inv_freq, 1.0f, true), rotated(k, 0, inv_freq, 1.0f, true));
    EXPECT_GT(std::fabs(inter - other), 1e-3);
  }
}

// ---------------------------------------------------------------------------------------
// latent_attention and dense_attention

// A sequence's latents [keys, d_c + d_r] spread over shuffled pages of a pool whose unused
// rows and unreferenced pages are NaN.
struct PagedLatents {
  std::vector<float> pool;
  std::vector<const float*> page_ptrs;

  PagedLatents(const std::vector<float>& latents, int64_t keys, int64_t width, int64_t block,
               std::mt19937& rng) {
    const int64_t pages = (keys + block - 1) / block;
    const int64_t pool_pages = pages + 3;  // spare pages nobody references
    pool.assign(pool_pages * block * width, kNaN);
    std::vector<int64_t> order(pool_pages);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int64_t p = 0; p < pages; ++p) page_ptrs.push_back(&pool[order[p] * block * width]);
    for (int64_t j = 0; j < keys; ++j) {
      std::copy_n(&latents[j * width], width,
                  const_cast<float*>(page_ptrs[j / block]) + (j % block) * width);
    }
  }
};

// out[t,h] and lse[t,h] read straight from the latents, in double.
void latent_attention_reference(const std::vector<float>& q_lat, const std::vector<float>& q_rope,
                                const std::vector<float>& latents,
                                const std::vector<int32_t>& num_keys, int64_t heads, int64_t d_c,
                                int64_t d_r, double scale, std::vector<double>& out,
                                std::vector<double>& lse) {
  const int64_t tokens = static_cast<int64_t>(num_keys.size()), width = d_c + d_r;
  out.assign(tokens * heads * d_c, 0.0);
  lse.assign(tokens * heads, -INFINITY);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t n = num_keys[t];
      if (n == 0) continue;
      std::vector<double> s(n);
      for (int64_t j = 0; j < n; ++j) {
        double v = 0;
        for (int64_t i = 0; i < d_c; ++i)
          v += static_cast<double>(q_lat[(t * heads + h) * d_c + i]) * latents[j * width + i];
        for (int64_t i = 0; i < d_r; ++i)
          v +=
              static_cast<double>(q_rope[(t * heads + h) * d_r + i]) * latents[j * width + d_c + i];
        s[j] = v * scale;
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double v : s) sum += std::exp(v - mx);
      lse[t * heads + h] = mx + std::log(sum);
      for (int64_t j = 0; j < n; ++j) {
        const double p = std::exp(s[j] - lse[t * heads + h]);
        for (int64_t i = 0; i < d_c; ++i)
          out[(t * heads + h) * d_c + i] += p * latents[j * width + i];
      }
    }
  }
}

TEST(CpuOps, LatentAttentionReadsPagesInTableOrder) {
  const int64_t heads = 3, d_c = 32, d_r = 8, width = d_c + d_r, keys = 70;
  const float scale = 0.2f;
  // Causal rows of a chunk, a row that sees one key, and a row that sees none.
  const std::vector<int32_t> num_keys = {66, 67, 68, 69, 70, 1, 0, 33};
  const int64_t tokens = static_cast<int64_t>(num_keys.size());
  unsigned seed = 41;
  for (int64_t block : {1, 3, 64}) {
    SCOPED_TRACE(testing::Message() << "block " << block);
    std::mt19937 rng(seed++);
    const auto latents = random_vector(rng, keys * width);
    const auto q_lat = random_vector(rng, tokens * heads * d_c);
    const auto q_rope = random_vector(rng, tokens * heads * d_r);
    PagedLatents paged(latents, keys, width, block, rng);

    std::vector<float> out(tokens * heads * d_c, kNaN), lse(tokens * heads, kNaN);
    cpu::latent_attention({q_lat.data(), q_rope.data(), paged.page_ptrs.data(), num_keys.data(),
                           tokens, heads, d_c, d_r, block, scale, out.data(), lse.data()});
    std::vector<double> want_out, want_lse;
    latent_attention_reference(q_lat, q_rope, latents, num_keys, heads, d_c, d_r, scale, want_out,
                               want_lse);
    for (int64_t t = 0; t < tokens; ++t) {
      SCOPED_TRACE(testing::Message() << "token " << t << " num_keys " << num_keys[t]);
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t th = t * heads + h;
        if (num_keys[t] == 0) {
          EXPECT_EQ(lse[th], -kInf);
          for (int64_t i = 0; i < d_c; ++i) EXPECT_EQ(out[th * d_c + i], 0.0f);
          continue;
        }
        EXPECT_NEAR(lse[th], want_lse[th], 1e-5 * std::max(1.0, std::fabs(want_lse[th])));
        EXPECT_LT(rel_error(&out[th * d_c], &want_out[th * d_c], d_c), 1e-5);
      }
    }
  }
}

TEST(CpuOps, DenseAttentionMatchesReference) {
  std::mt19937 rng(43);
  const int64_t heads = 2, d_qk = 24, d_v = 16, keys = 12;
  const std::vector<int32_t> num_keys = {9, 10, 11, 12, 0, 1};
  const int64_t tokens = static_cast<int64_t>(num_keys.size());
  const float scale = 0.3f;
  const auto q = random_vector(rng, tokens * heads * d_qk);
  const auto k = random_vector(rng, keys * heads * d_qk);
  const auto v = random_vector(rng, keys * heads * d_v);
  std::vector<float> out(tokens * heads * d_v, kNaN);
  cpu::dense_attention({q.data(), k.data(), v.data(), num_keys.data(), tokens, keys, heads, d_qk,
                        d_v, scale, out.data()});
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t n = num_keys[t];
      std::vector<double> s(n), want(d_v, 0.0);
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (int64_t i = 0; i < d_qk; ++i)
          acc += static_cast<double>(q[(t * heads + h) * d_qk + i]) * k[(j * heads + h) * d_qk + i];
        s[j] = acc * scale;
      }
      if (n > 0) {
        const double mx = *std::max_element(s.begin(), s.end());
        double sum = 0;
        for (double x : s) sum += std::exp(x - mx);
        for (int64_t j = 0; j < n; ++j) {
          const double p = std::exp(s[j] - mx) / sum;
          for (int64_t i = 0; i < d_v; ++i) want[i] += p * v[(j * heads + h) * d_v + i];
        }
        EXPECT_LT(rel_error(&out[(t * heads + h) * d_v], want.data(), d_v), 1e-5)
            << "token " << t << " head " << h;
      } else {
        for (int64_t i = 0; i < d_v; ++i) EXPECT_EQ(out[(t * heads + h) * d_v + i], 0.0f);
      }
    }
  }
}

// The identity absorption rests on: attending with q~ = W_UK^T q_n over latents c, then
// applying W_UV, equals attending with q over decompressed keys k = [W_UK c; k_r] and values
// v = W_UV c.
TEST(CpuOps, LatentAttentionEqualsDenseAttentionOverDecompressedKeys) {
  std::mt19937 rng(47);
  const int64_t heads = 4, d_c = 64, d_r = 16, d_n = 32, d_v = 24, keys = 37, block = 8;
  const int64_t width = d_c + d_r, d_qk = d_n + d_r;
  const std::vector<int32_t> num_keys = {30, 31, 32, 33, 34, 35, 36, 37};
  const int64_t tokens = static_cast<int64_t>(num_keys.size());
  const float scale = 1.0f / std::sqrt(static_cast<float>(d_qk));
  const auto latents = random_vector(rng, keys * width);
  const auto w_uk =
      random_vector(rng, heads * d_n * d_c, 1.0f / std::sqrt(float(d_c)));  // [H, d_n, d_c]
  const auto w_uv =
      random_vector(rng, heads * d_v * d_c, 1.0f / std::sqrt(float(d_c)));  // [H, d_v, d_c]
  const auto q_nope = random_vector(rng, tokens * heads * d_n);
  const auto q_rope = random_vector(rng, tokens * heads * d_r);

  // Decompressed form.
  std::vector<float> q(tokens * heads * d_qk), k(keys * heads * d_qk), v(keys * heads * d_v);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      std::copy_n(&q_nope[(t * heads + h) * d_n], d_n, &q[(t * heads + h) * d_qk]);
      std::copy_n(&q_rope[(t * heads + h) * d_r], d_r, &q[(t * heads + h) * d_qk + d_n]);
    }
  }
  for (int64_t j = 0; j < keys; ++j) {
    const float* c = &latents[j * width];
    for (int64_t h = 0; h < heads; ++h) {
      float* kj = &k[(j * heads + h) * d_qk];
      cpu::matmul_nt(c, 1, d_c, &w_uk[h * d_n * d_c], d_n, kj);
      std::copy_n(c + d_c, d_r, kj + d_n);
      cpu::matmul_nt(c, 1, d_c, &w_uv[h * d_v * d_c], d_v, &v[(j * heads + h) * d_v]);
    }
  }
  std::vector<float> dense_out(tokens * heads * d_v, kNaN);
  cpu::dense_attention({q.data(), k.data(), v.data(), num_keys.data(), tokens, keys, heads, d_qk,
                        d_v, scale, dense_out.data()});

  // Absorbed form: q~ = W_UK^T q_n per head, latent attention, then W_UV.
  std::vector<float> q_lat(tokens * heads * d_c, kNaN);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      cpu::matmul_nn(&q_nope[(t * heads + h) * d_n], 1, d_n, &w_uk[h * d_n * d_c], d_c,
                     &q_lat[(t * heads + h) * d_c]);
    }
  }
  PagedLatents paged(latents, keys, width, block, rng);
  std::vector<float> lat_out(tokens * heads * d_c, kNaN), lse(tokens * heads, kNaN);
  cpu::latent_attention({q_lat.data(), q_rope.data(), paged.page_ptrs.data(), num_keys.data(),
                         tokens, heads, d_c, d_r, block, scale, lat_out.data(), lse.data()});
  std::vector<float> absorbed_out(tokens * heads * d_v, kNaN);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      cpu::matmul_nt(&lat_out[(t * heads + h) * d_c], 1, d_c, &w_uv[h * d_v * d_c], d_v,
                     &absorbed_out[(t * heads + h) * d_v]);
    }
  }
  const std::vector<double> want(dense_out.begin(), dense_out.end());
  EXPECT_LT(rel_error(absorbed_out.data(), want.data(), tokens * heads * d_v), 1e-5);
  // The scores themselves agree: dense softmax weights reproduce the latent LSE's sum.
  for (int64_t h = 0; h < heads; ++h) {
    double sum = 0;
    for (int64_t j = 0; j < num_keys[0]; ++j) {
      double s = 0;
      for (int64_t i = 0; i < d_qk; ++i)
        s += static_cast<double>(q[h * d_qk + i]) * k[(j * heads + h) * d_qk + i];
      sum += std::exp(s * scale);
    }
    EXPECT_NEAR(lse[h], std::log(sum), 1e-4) << "head " << h;
  }
}

}  // namespace
}  // namespace mla
