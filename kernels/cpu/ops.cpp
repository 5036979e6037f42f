#include "kernels/cpu/ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/error.h"

namespace mla::cpu {

void gemm(bool trans_w, int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx,
          const float* w, int64_t ldw, float* y, int64_t ldy, float beta) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_w ? CblasTrans : CblasNoTrans, m, n, k, 1.0f, x,
              ldx, w, ldw, beta, y, ldy);
}

void gemm_batch_invariant(bool trans_w, int64_t m, int64_t n, int64_t k, const float* x,
                          int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
                          float beta) {
  constexpr int64_t R = kInvariantRows;
  const int64_t whole = m / R * R;
  for (int64_t r = 0; r < whole; r += R) {
    gemm(trans_w, R, n, k, x + r * ldx, ldx, w, ldw, y + r * ldy, ldy, beta);
  }
  const int64_t rest = m - whole;
  if (rest == 0 || n == 0) return;
  std::vector<float> x_pad(R * k, 0.0f), y_pad(R * n, 0.0f);
  for (int64_t i = 0; i < rest; ++i) {
    std::copy(x + (whole + i) * ldx, x + (whole + i) * ldx + k, &x_pad[i * k]);
    if (beta != 0.0f) std::copy(y + (whole + i) * ldy, y + (whole + i) * ldy + n, &y_pad[i * n]);
  }
  gemm(trans_w, R, n, k, x_pad.data(), k, w, ldw, y_pad.data(), n, beta);
  for (int64_t i = 0; i < rest; ++i) {
    std::copy(&y_pad[i * n], &y_pad[i * n] + n, y + (whole + i) * ldy);
  }
}

void matmul_nt(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
               float beta, bool batch_invariant) {
  if (batch_invariant) {
    gemm_batch_invariant(true, m, n, k, x, k, w, k, y, n, beta);
  } else {
    gemm(true, m, n, k, x, k, w, k, y, n, beta);
  }
}

void matmul_nn(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
               float beta) {
  gemm(false, m, n, k, x, k, w, n, y, n, beta);
}

void rms_norm(const float* x, int64_t rows, int64_t d, int64_t x_stride, const float* w, float eps,
              float* y, int64_t y_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    float* yr = y + r * y_stride;
    float sum = 0.0f;
    for (int64_t i = 0; i < d; ++i) sum += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

void silu_mul(const float* gate_up, int64_t rows, int64_t width, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * width;
    const float* u = g + width;
    float* o = out + r * width;
    for (int64_t i = 0; i < width; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void rope_table(int64_t pos, const float* inv_freq, int64_t d, float attention_factor,
                float* cos_sin) {
  const int64_t half = d / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float angle = static_cast<float>(pos) * inv_freq[j];
    cos_sin[j] = std::cos(angle) * attention_factor;
    cos_sin[half + j] = std::sin(angle) * attention_factor;
  }
}

void rope_rotate(float* x, int64_t d, const float* cos_sin, bool interleave) {
  const int64_t half = d / 2;
  const float* cs = cos_sin;
  const float* sn = cos_sin + half;
  MLA_CHECK(d <= kMaxRopeDim, "rope dim {} exceeds {}", d, kMaxRopeDim);
  float t[kMaxRopeDim];
  for (int64_t j = 0; j < half; ++j) {
    const float a = interleave ? x[2 * j] : x[j];
    const float b = interleave ? x[2 * j + 1] : x[j + half];
    t[j] = a * cs[j] - b * sn[j];
    t[j + half] = b * cs[j] + a * sn[j];
  }
  std::copy(t, t + d, x);
}

float softmax_inplace(float* x, int64_t n) {
  if (n == 0) return -std::numeric_limits<float>::infinity();
  const float mx = *std::max_element(x, x + n);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
  return mx + std::log(sum);
}

void add_inplace(float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

void latent_attention(const LatentAttentionParams& p) {
  const int64_t width = p.d_c + p.d_r;
  int64_t max_keys = 0;
  for (int64_t t = 0; t < p.tokens; ++t) max_keys = std::max<int64_t>(max_keys, p.num_keys[t]);
  std::vector<float> scores(max_keys);
  for (int64_t t = 0; t < p.tokens; ++t) {
    const int64_t n = p.num_keys[t];
    for (int64_t h = 0; h < p.heads; ++h) {
      const float* ql = p.q_lat + (t * p.heads + h) * p.d_c;
      const float* qr = p.q_rope + (t * p.heads + h) * p.d_r;
      float* out = p.out + (t * p.heads + h) * p.d_c;
      for (int64_t j = 0; j < n; ++j) {
        const float* key = p.page_ptrs[j / p.block_size] + (j % p.block_size) * width;
        float s = 0.0f;
        for (int64_t i = 0; i < p.d_c; ++i) s += ql[i] * key[i];
        for (int64_t i = 0; i < p.d_r; ++i) s += qr[i] * key[p.d_c + i];
        scores[j] = s * p.scale;
      }
      p.lse[t * p.heads + h] = softmax_inplace(scores.data(), n);
      std::fill(out, out + p.d_c, 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const float* c = p.page_ptrs[j / p.block_size] + (j % p.block_size) * width;
        const float w = scores[j];
        for (int64_t i = 0; i < p.d_c; ++i) out[i] += w * c[i];
      }
    }
  }
}

void dense_attention(const DenseAttentionParams& p) {
  std::vector<float> scores(p.keys);
  for (int64_t t = 0; t < p.tokens; ++t) {
    const int64_t n = p.num_keys[t];
    for (int64_t h = 0; h < p.heads; ++h) {
      const float* q = p.q + (t * p.heads + h) * p.d_qk;
      float* out = p.out + (t * p.heads + h) * p.d_v;
      for (int64_t j = 0; j < n; ++j) {
        const float* k = p.k + (j * p.heads + h) * p.d_qk;
        float s = 0.0f;
        for (int64_t i = 0; i < p.d_qk; ++i) s += q[i] * k[i];
        scores[j] = s * p.scale;
      }
      softmax_inplace(scores.data(), n);
      std::fill(out, out + p.d_v, 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const float* v = p.v + (j * p.heads + h) * p.d_v;
        for (int64_t i = 0; i < p.d_v; ++i) out[i] += scores[j] * v[i];
      }
    }
  }
}

void lse_merge(const LseMergeParams& p) {
  for (int64_t t = 0; t < p.rows; ++t) {
    float* o = p.out + t * p.d;
    std::fill_n(o, p.d, 0.0f);
    float mx = -INFINITY;
    for (int64_t r = 0; r < p.P; ++r) mx = std::max(mx, p.lse[r * p.rows + t]);
    if (p.out_lse != nullptr) p.out_lse[t] = mx;
    if (mx == -INFINITY) continue;
    float denom = 0.0f;
    for (int64_t r = 0; r < p.P; ++r) {
      const float weight = std::exp(p.lse[r * p.rows + t] - mx);
      if (weight == 0.0f) continue;
      denom += weight;
      const float* part = p.parts + (r * p.rows + t) * p.d;
      for (int64_t i = 0; i < p.d; ++i) o[i] += weight * part[i];
    }
    for (int64_t i = 0; i < p.d; ++i) o[i] /= denom;
    if (p.out_lse != nullptr) p.out_lse[t] = mx + std::log(denom);
  }
}

}  // namespace mla::cpu
