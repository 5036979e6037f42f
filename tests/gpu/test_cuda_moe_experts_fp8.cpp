// CUDA routed experts with fp8 weights (kernels/cuda/moe_experts_fp8.h) against the CPU's fp8
// products per expert on its gathered tokens (cpu::gemm_fp8_blockscaled, which quantises its
// input per row and 128 columns as the kernels do, and cpu::silu_mul with the activations
// rounded to bf16 between the products, as the kernels store them), on fresh random data: one
// token, an expert without tokens, every token on one expert, ranks holding part of the
// experts, many slots, DeepSeek-V3's expert shape, an output that starts non-zero, a poisoned
// workspace; also bitwise determinism, batch invariance and a CUDA-graph replay.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/fp8_gemm.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/moe_experts_fp8.h"
#include "kernels/dtype.h"
#include "tests/gpu/bf16_test_util.h"
#include "tests/gpu/moe_test_util.h"

namespace mla {
namespace {

using test::DeviceArray;

struct Case {
  std::string name;
  int64_t tokens, top_k, experts, first_expert, local_experts, d, inter;
  bool skip_one = false;    // expert first_expert + 1 gets no token
  bool one_expert = false;  // top_k 1, every token on first_expert
};

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {"one token", 1, 2, 8, 0, 8, 128, 128},
      // Tiles as tall as the batch allows (an expert has at most `tokens` rows): 2, 4 and 8.
      {"two tokens", 2, 4, 8, 0, 8, 128, 128},
      {"four tokens, part of the experts", 4, 6, 16, 4, 8, 256, 128},
      {"an expert without tokens", 33, 3, 8, 0, 8, 256, 128, true},
      {"every token on one expert", 40, 1, 4, 0, 4, 128, 256, false, true},
      {"part of the experts", 19, 4, 32, 8, 8, 256, 128},
      {"many slots", 300, 4, 16, 0, 16, 256, 128},
      // DeepSeek-V3's expert (d 7168, inter 2048), two local experts of four.
      {"V3 shapes", 5, 2, 4, 1, 2, 7168, 2048},
  };
  return all;
}

// Weights as an fp8 checkpoint holds them: e4m3 with a scale per row and 128 columns.
struct Fp8Weights {
  std::vector<uint8_t> values;
  std::vector<float> scales;
};

Fp8Weights random_fp8(std::mt19937& rng, int64_t rows, int64_t cols, float stddev) {
  const std::vector<float> w = test::random_normal(rows * cols, rng, stddev);
  Fp8Weights f{std::vector<uint8_t>(rows * cols), std::vector<float>(rows * (cols / 128))};
  cpu::quantize_rows_fp8(w.data(), rows, cols, cols, 128, f.values.data(), f.scales.data());
  return f;
}

struct Problem {
  Case c;
  std::vector<uint16_t> x_bits;
  std::vector<float> x;  // the bf16 values widened
  Fp8Weights gate_up, down;
  std::vector<int32_t> ids;
  std::vector<float> weights, out0;
};

Problem make_problem(const Case& c, std::mt19937& rng) {
  Problem p;
  p.c = c;
  p.x = test::random_normal(c.tokens * c.d, rng);
  p.x_bits.resize(p.x.size());
  for (size_t i = 0; i < p.x.size(); ++i) {
    p.x_bits[i] = f32_to_bf16(p.x[i]);
    p.x[i] = bf16_to_f32(p.x_bits[i]);
  }
  p.gate_up = random_fp8(rng, c.local_experts * 2 * c.inter, c.d, 1.0f / std::sqrt(float(c.d)));
  p.down = random_fp8(rng, c.local_experts * c.d, c.inter, 1.0f / std::sqrt(float(c.inter)));
  p.ids.resize(c.tokens * c.top_k);
  p.weights.resize(c.tokens * c.top_k);
  std::vector<int32_t> experts(c.experts);
  std::iota(experts.begin(), experts.end(), 0);
  if (c.skip_one) experts.erase(experts.begin() + c.first_expert + 1);
  std::uniform_real_distribution<float> weight(0.05f, 1.0f);
  for (int64_t t = 0; t < c.tokens; ++t) {
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int64_t k = 0; k < c.top_k; ++k) {
      p.ids[t * c.top_k + k] = c.one_expert ? static_cast<int32_t>(c.first_expert) : experts[k];
      p.weights[t * c.top_k + k] = weight(rng);
    }
  }
  p.out0 = test::random_normal(c.tokens * c.d, rng);  // the shared experts' output
  return p;
}

std::vector<float> reference(const Problem& p) {
  const Case& c = p.c;
  const int64_t g_d = c.d / 128, g_i = c.inter / 128;
  return test::routed_reference(
      p.ids, p.weights, p.x, p.out0, c.tokens, c.top_k, c.d, c.first_expert, c.local_experts,
      [&](int64_t e, const std::vector<float>& xs, int64_t m, std::vector<float>& ys) {
        std::vector<float> gate_up(m * 2 * c.inter), act(m * c.inter);
        cpu::gemm_fp8_blockscaled({.x = xs.data(),
                                   .m = m,
                                   .k = c.d,
                                   .ldx = c.d,
                                   .w = &p.gate_up.values[e * 2 * c.inter * c.d],
                                   .w_scale = &p.gate_up.scales[e * 2 * c.inter * g_d],
                                   .n = 2 * c.inter,
                                   .y = gate_up.data(),
                                   .ldy = 2 * c.inter});
        cpu::silu_mul(gate_up.data(), m, c.inter, act.data());
        for (auto& v : act) v = bf16_to_f32(f32_to_bf16(v));
        cpu::gemm_fp8_blockscaled({.x = act.data(),
                                   .m = m,
                                   .k = c.inter,
                                   .ldx = c.inter,
                                   .w = &p.down.values[e * c.d * c.inter],
                                   .w_scale = &p.down.scales[e * c.d * g_i],
                                   .n = c.d,
                                   .y = ys.data(),
                                   .ldy = c.d});
      });
}

struct DeviceProblem {
  DeviceArray<uint16_t> x;
  DeviceArray<uint8_t> gate_up, down;
  DeviceArray<float> gate_up_scale, down_scale, weights, out;
  DeviceArray<int32_t> ids;
  DeviceArray<uint8_t> workspace;  // poisoned: NaN activations, slot positions -1

  explicit DeviceProblem(const Problem& p)
      : x(p.x_bits),
        gate_up(p.gate_up.values),
        down(p.down.values),
        gate_up_scale(p.gate_up.scales),
        down_scale(p.down.scales),
        weights(p.weights),
        out(p.out0),
        ids(p.ids),
        workspace(static_cast<int64_t>(cuda::moe_experts_fp8_workspace_bytes(
            p.c.tokens, p.c.top_k, p.c.local_experts, p.c.d, p.c.inter))) {}

  cuda::MoeExpertsFp8Params params(const Case& c) const {
    return {.x = reinterpret_cast<const __nv_bfloat16*>(x.get()),
            .ids = ids.get(),
            .weights = weights.get(),
            .gate_up = gate_up.get(),
            .gate_up_scale = gate_up_scale.get(),
            .down = down.get(),
            .down_scale = down_scale.get(),
            .out = out.get(),
            .tokens = c.tokens,
            .top_k = c.top_k,
            .d = c.d,
            .inter = c.inter,
            .experts = c.experts,
            .first_expert = c.first_expert,
            .local_experts = c.local_experts};
  }

  size_t workspace_bytes() const { return static_cast<size_t>(workspace.bytes()); }

  void run(const Case& c, cudaStream_t stream) const {
    cuda::moe_experts_fp8(params(c), workspace.get(), workspace_bytes(), stream);
  }
};

// Tolerance. Both sides quantise the same inputs bit for bit and sum the same fp8 products in
// another order (~1e-6 relative); through that an activation may round to the neighbouring
// bf16 value and then quantise to the neighbouring e4m3 value (1/16 relative on one of `inter`
// terms of each output). Against the routed part's size that stays far below 1e-2 in RMS, and
// each element within 5e-2 of its token's routed RMS; a wrong row, expert or scale gives errors
// of order 1.
void expect_close(const Problem& p, const std::vector<float>& got, const std::vector<float>& want) {
  test::expect_routed_close(p.c.name, p.c.tokens, p.c.d, p.out0, got, want, 5e-2, 1e-2);
}

TEST(CudaMoeExpertsFp8, MatchesCpuFp8Experts) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(6160);
  for (const Case& c : cases()) {
    const Problem p = make_problem(c, rng);
    DeviceProblem d(p);
    d.run(c, nullptr);
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    expect_close(p, d.out.download(), reference(p));
  }
}

// Each token's result depends on nothing else in the batch: the first 1, 3 and 7 tokens of a
// 300-token batch (tiles of 1, 4, 8 and 16 rows) give the same bits run alone, from a CUDA graph.
TEST(CudaMoeExpertsFp8, IsBatchInvariantAndReplaysFromACudaGraph) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(6161);
  const Case big = cases()[6];
  const Problem p = make_problem(big, rng);
  DeviceProblem d(p);
  d.run(big, nullptr);
  MLA_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> all = d.out.download();

  for (const int64_t tokens : {1, 3, 7}) {
    Case few = big;
    few.tokens = tokens;
    Problem q = p;
    q.c = few;
    q.x_bits.resize(few.tokens * few.d);
    q.ids.resize(few.tokens * few.top_k);
    q.weights.resize(few.tokens * few.top_k);
    q.out0.resize(few.tokens * few.d);
    DeviceProblem alone(q);
    test::run_in_graph([&](cudaStream_t stream) { alone.run(few, stream); });
    const std::vector<float> got = alone.out.download();
    ASSERT_EQ(0, std::memcmp(got.data(), all.data(), got.size() * sizeof(float)))
        << tokens << " tokens alone, replayed from a graph, differ from the same tokens among 300";
  }
}

TEST(CudaMoeExpertsFp8, RejectsBadShapes) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Case c = cases()[0];
  std::mt19937 rng(6162);
  const Problem p = make_problem(c, rng);
  DeviceProblem d(p);
  cuda::MoeExpertsFp8Params bad = d.params(c);
  bad.d = 64;  // not a multiple of 128
  EXPECT_THROW(cuda::moe_experts_fp8(bad, d.workspace.get(), d.workspace_bytes(), nullptr), Error);
  bad = d.params(c);
  bad.down_scale = nullptr;
  EXPECT_THROW(cuda::moe_experts_fp8(bad, d.workspace.get(), d.workspace_bytes(), nullptr), Error);
  EXPECT_THROW(
      cuda::moe_experts_fp8(d.params(c), d.workspace.get(), d.workspace_bytes() - 1, nullptr),
      Error);
}

}  // namespace
}  // namespace mla
