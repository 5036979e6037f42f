// CUDA routed experts against a CPU computation on the same bf16-rounded inputs
// (cpu::matmul_nt and cpu::silu_mul per expert on its gathered tokens), on fresh random data:
// one token, tails of every tile dimension, an expert without tokens, every token on one
// expert, ranks holding part of the experts, both tile sizes, the few-slot (decode) kernels on
// both paths, DeepSeek shapes, an output that starts non-zero, a poisoned workspace, the shared
// experts riding in the few-slot kernels (out then starts as NaN: it must not be read); also
// bitwise determinism and a CUDA-graph replay.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/moe_experts.h"
#include "kernels/dtype.h"
#include "tests/gpu/moe_test_util.h"

namespace mla {
namespace {

enum class Routing {
  kRandom,     // top_k distinct experts per token, uniformly over all experts
  kSkipOne,    // as kRandom, never expert first_expert + 1
  kOneExpert,  // top_k == 1 and every token on expert first_expert
};

struct Case {
  std::string name;
  int64_t tokens, top_k, experts, first_expert, local_experts, d, inter;
  Routing routing = Routing::kRandom;
  // MoeExpertsParams::gemv_max_slots: which kernels run (the weight-streaming ones up to it).
  int64_t gemv_max_slots = cuda::kMoeGemvMaxSlots;
  // MoeSharedExperts::inter: shared experts of this width in the same kernels (0: none).
  int64_t shared_inter = 0;
};

// bf16 values and their exact fp32 widening.
struct Bf16Tensor {
  std::vector<uint16_t> bits;
  std::vector<float> values;
};

Bf16Tensor random_bf16(std::mt19937& rng, size_t n, float stddev) {
  std::normal_distribution<float> normal(0.0f, stddev);
  Bf16Tensor t{std::vector<uint16_t>(n), std::vector<float>(n)};
  for (size_t i = 0; i < n; ++i) {
    t.bits[i] = f32_to_bf16(normal(rng));
    t.values[i] = bf16_to_f32(t.bits[i]);
  }
  return t;
}

struct Problem {
  Case c;
  Bf16Tensor x, gate_up, down;
  std::vector<int32_t> ids;
  // out0: what out holds before the routed part is added: the output's start, or with shared
  // experts their output (out then starts as NaN).
  std::vector<float> weights, out0;
  Bf16Tensor shared_gate_up, shared_down;
};

// A SwiGLU MLP of width `inter` on rows xs [m, d] into ys [m, d], the activations rounded to
// bf16 as the kernels store them.
void swiglu_reference(const float* gate_up, const float* down, int64_t inter, int64_t d,
                      const std::vector<float>& xs, int64_t m, std::vector<float>& ys) {
  std::vector<float> h(m * 2 * inter), act(m * inter);
  cpu::matmul_nt(xs.data(), m, d, gate_up, 2 * inter, h.data());
  cpu::silu_mul(h.data(), m, inter, act.data());
  for (auto& v : act) v = bf16_to_f32(f32_to_bf16(v));
  cpu::matmul_nt(act.data(), m, inter, down, d, ys.data());
}

Problem make_problem(const Case& c, std::mt19937& rng) {
  Problem p{c,
            random_bf16(rng, c.tokens * c.d, 1.0f),
            random_bf16(rng, c.local_experts * 2 * c.inter * c.d, 1.0f / std::sqrt(float(c.d))),
            random_bf16(rng, c.local_experts * c.d * c.inter, 1.0f / std::sqrt(float(c.inter))),
            std::vector<int32_t>(c.tokens * c.top_k),
            std::vector<float>(c.tokens * c.top_k),
            std::vector<float>(c.tokens * c.d),
            {},
            {}};
  std::uniform_real_distribution<float> weight(0.05f, 1.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<int32_t> experts(c.experts);
  std::iota(experts.begin(), experts.end(), 0);
  if (c.routing == Routing::kSkipOne) {
    experts.erase(experts.begin() + c.first_expert + 1);
  }
  for (int64_t t = 0; t < c.tokens; ++t) {
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int64_t k = 0; k < c.top_k; ++k) {
      p.ids[t * c.top_k + k] =
          c.routing == Routing::kOneExpert ? static_cast<int32_t>(c.first_expert) : experts[k];
      p.weights[t * c.top_k + k] = weight(rng);
    }
  }
  for (auto& v : p.out0) v = normal(rng);  // the shared experts' output, already there
  if (c.shared_inter > 0) {
    p.shared_gate_up = random_bf16(rng, 2 * c.shared_inter * c.d, 1.0f / std::sqrt(float(c.d)));
    p.shared_down = random_bf16(rng, c.d * c.shared_inter, 1.0f / std::sqrt(float(c.shared_inter)));
    swiglu_reference(p.shared_gate_up.values.data(), p.shared_down.values.data(), c.shared_inter,
                     c.d, p.x.values, c.tokens, p.out0);
  }
  return p;
}

// out0 plus the routed experts, with the activations rounded to bf16 as the kernel stores them.
std::vector<float> reference(const Problem& p) {
  const Case& c = p.c;
  return test::routed_reference(
      p.ids, p.weights, p.x.values, p.out0, c.tokens, c.top_k, c.d, c.first_expert, c.local_experts,
      [&](int64_t e, const std::vector<float>& xs, int64_t m, std::vector<float>& ys) {
        swiglu_reference(&p.gate_up.values[e * 2 * c.inter * c.d],
                         &p.down.values[e * c.d * c.inter], c.inter, c.d, xs, m, ys);
      });
}

// Device copies of a problem, and a poisoned workspace.
struct DeviceProblem {
  uint16_t *x, *gate_up, *down;
  int32_t* ids;
  float *weights, *out;
  void* workspace;
  size_t workspace_bytes;
  uint16_t *shared_gate_up = nullptr, *shared_down = nullptr, *shared_act = nullptr;
  std::vector<float> out_start;  // out0, or NaN with shared experts

  explicit DeviceProblem(const Problem& p) {
    const Case& c = p.c;
    out_start = c.shared_inter > 0 ? std::vector<float>(p.out0.size(), std::nanf("")) : p.out0;
    upload(&x, p.x.bits);
    upload(&gate_up, p.gate_up.bits);
    upload(&down, p.down.bits);
    upload(&ids, p.ids);
    upload(&weights, p.weights);
    upload(&out, out_start);
    if (c.shared_inter > 0) {
      upload(&shared_gate_up, p.shared_gate_up.bits);
      upload(&shared_down, p.shared_down.bits);
      upload(&shared_act, std::vector<uint16_t>(c.tokens * c.shared_inter, 0xffff));  // NaN
    }
    workspace_bytes =
        cuda::moe_experts_workspace_bytes(c.tokens, c.top_k, c.local_experts, c.d, c.inter);
    MLA_CUDA_CHECK(cudaMalloc(&workspace, workspace_bytes));
    MLA_CUDA_CHECK(cudaMemset(workspace, 0xff, workspace_bytes));  // NaN activations, -1 ids
  }
  ~DeviceProblem() {
    for (void* ptr : {static_cast<void*>(x), static_cast<void*>(gate_up), static_cast<void*>(down),
                      static_cast<void*>(ids), static_cast<void*>(weights), static_cast<void*>(out),
                      workspace, static_cast<void*>(shared_gate_up),
                      static_cast<void*>(shared_down), static_cast<void*>(shared_act)}) {
      cudaFree(ptr);
    }
  }

  cuda::MoeExpertsParams params(const Case& c) const {
    const cuda::MoeSharedExperts shared{
        .gate_up = reinterpret_cast<const __nv_bfloat16*>(shared_gate_up),
        .down = reinterpret_cast<const __nv_bfloat16*>(shared_down),
        .act = reinterpret_cast<__nv_bfloat16*>(shared_act),
        .inter = c.shared_inter};
    return {reinterpret_cast<const __nv_bfloat16*>(x),
            ids,
            weights,
            reinterpret_cast<const __nv_bfloat16*>(gate_up),
            reinterpret_cast<const __nv_bfloat16*>(down),
            out,
            c.tokens,
            c.top_k,
            c.d,
            c.inter,
            c.experts,
            c.first_expert,
            c.local_experts,
            c.gemv_max_slots,
            shared};
  }

  void run(const Case& c, cudaStream_t stream) const {
    cuda::moe_experts(params(c), workspace, workspace_bytes, stream);
  }

  void reset_out() const {
    MLA_CUDA_CHECK(cudaMemcpy(out, out_start.data(), out_start.size() * sizeof(float),
                              cudaMemcpyHostToDevice));
  }

  std::vector<float> download_out(const Problem& p) const {
    std::vector<float> got(p.out0.size());
    MLA_CUDA_CHECK(cudaMemcpy(got.data(), out, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return got;
  }

 private:
  template <class T>
  static void upload(T** ptr, const std::vector<T>& v) {
    MLA_CUDA_CHECK(cudaMalloc(ptr, v.size() * sizeof(T)));
    MLA_CUDA_CHECK(cudaMemcpy(*ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
};

// Tolerance. Both sides multiply the same bf16 values in fp32; they differ by accumulation
// order (~1e-6 relative), and through that by an occasional activation rounding to the other
// neighbouring bf16 value (2^-8 relative on one of `inter` terms). Measured against the size
// of the routed part, the error stays below 1e-4 in RMS; 1e-3 leaves room, while a wrong row,
// expert or weight gives errors of order 1. Each element must also be within 1e-2 of the
// token's routed RMS, so a single wrong column cannot hide in the mean.
// With shared experts out0 is the CPU's shared part, which the GPU's rounds differently from
// (a token without a local slot is not left exactly as out0): the whole output is compared.
void expect_close(const Problem& p, const std::vector<float>& got, const std::vector<float>& want) {
  const std::vector<float> start =
      p.c.shared_inter > 0 ? std::vector<float>(p.out0.size(), 0.0f) : p.out0;
  test::expect_routed_close(p.c.name, p.c.tokens, p.c.d, start, got, want, 1e-2, 1e-3);
}

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {"one token", 1, 2, 8, 0, 8, 64, 32},
      // d and inter not multiples of any tile: partial k tiles and column blocks.
      {"tails", 7, 4, 16, 0, 16, 72, 40},
      {"an expert without tokens", 33, 3, 8, 0, 8, 128, 64, Routing::kSkipOne},
      {"every token on one expert", 40, 1, 4, 0, 4, 64, 32, Routing::kOneExpert},
      {"part of the experts", 19, 4, 32, 8, 8, 64, 32},
      {"large tiles", 300, 4, 16, 0, 16, 160, 96},
      {"large tiles, part of the experts", 257, 6, 8, 4, 4, 64, 64, Routing::kSkipOne},
      {"large tiles, one expert", 200, 1, 4, 2, 2, 96, 48, Routing::kOneExpert},
      // DeepSeek-V2-Lite (d 2048, inter 1408, 64 experts, top 6) on a rank with 8 of them.
      {"V2-Lite shapes", 16, 6, 64, 8, 8, 2048, 1408},
      // DeepSeek-V2's and V3's expert shapes (d 5120, inter 1536; d 7168, inter 2048), two
      // local experts each, few experts in all so that most tokens reach them.
      {"V2 shapes", 6, 6, 8, 2, 2, 5120, 1536},
      {"V3 shapes", 5, 2, 4, 1, 2, 7168, 2048},
      // Few slots (<= kMoeGemvMaxSlots): the weight-streaming kernels. "one token" and
      // "V3 shapes" above are such cases too.
      {"few slots, V2-Lite rows", 1, 6, 8, 0, 8, 2048, 1408},
      {"few slots, part of the experts", 2, 6, 16, 4, 8, 64, 32},
      {"few slots, tails", 3, 4, 8, 0, 8, 72, 40},
      {"few slots, 16 of them", 4, 4, 8, 0, 8, 64, 32},
      // The shared experts in the few-slot kernels: V2-Lite's (two of width 1408, wider than a
      // routed expert), V3's (one of 2048) on a rank with part of the routed experts, narrower
      // than a routed expert, and beside 16 slots.
      {"few slots + shared, V2-Lite", 1, 6, 8, 0, 8, 2048, 1408, Routing::kRandom,
       cuda::kMoeGemvMaxSlots, 2816},
      {"few slots + shared, V3, part of the experts", 2, 8, 32, 8, 8, 7168, 2048, Routing::kRandom,
       cuda::kMoeGemvMaxSlots, 2048},
      {"few slots + shared, narrower", 3, 2, 8, 0, 8, 72, 40, Routing::kRandom,
       cuda::kMoeGemvMaxSlots, 16},
      {"few slots + shared, 16 slots", 4, 4, 8, 0, 8, 64, 32, Routing::kRandom,
       cuda::kMoeGemvMaxSlots, 64},
  };
  return all;
}

TEST(CudaMoeExperts, MatchesCpuExperts) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(5150);
  for (const Case& c : cases()) {
    const Problem p = make_problem(c, rng);
    DeviceProblem d(p);
    d.run(c, nullptr);
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    expect_close(p, d.download_out(p), reference(p));
  }
}

// The few-slot cases through both kernel sets: the weight-streaming kernels and the tiled GEMMs.
TEST(CudaMoeExperts, FewSlotsMatchOnBothPaths) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(5153);
  int64_t few = 0;
  for (Case c : cases()) {
    if (c.tokens * c.top_k > cuda::kMoeGemvMaxSlots) continue;
    ++few;
    const Problem p = make_problem(c, rng);
    for (int64_t max_slots : {cuda::kMoeGemvMaxSlots, int64_t{0}}) {
      if (max_slots == 0 && c.shared_inter > 0) {  // the tiled GEMMs do not take shared experts
        c.gemv_max_slots = 0;
        DeviceProblem d(p);
        EXPECT_THROW(d.run(c, nullptr), Error) << c.name;
        continue;
      }
      // A workspace of 0xff bytes (NaN activations, slot positions -1) and one of zeros (slot
      // positions 0): either way every slot's position must be written.
      for (int fill : {0xff, 0x00}) {
        c.gemv_max_slots = max_slots;
        DeviceProblem d(p);
        MLA_CUDA_CHECK(cudaMemset(d.workspace, fill, d.workspace_bytes));
        MLA_CUDA_CHECK(cudaDeviceSynchronize());
        d.run(c, nullptr);
        MLA_CUDA_CHECK(cudaDeviceSynchronize());
        SCOPED_TRACE(std::string(max_slots > 0 ? "weight-streaming kernels" : "tiled GEMMs") +
                     (fill ? ", workspace 0xff" : ", workspace 0"));
        expect_close(p, d.download_out(p), reference(p));
      }
    }
  }
  EXPECT_GE(few, 5);
}

TEST(CudaMoeExperts, IsDeterministicAndReplaysFromACudaGraph) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(5151);
  // One of each tile size, and few slots (the weight-streaming kernels), with shared experts.
  for (const Case& c : {cases()[2], cases()[6], cases()[12], cases()[16]}) {
    const Problem p = make_problem(c, rng);
    DeviceProblem d(p);
    d.run(c, nullptr);
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> first = d.download_out(p);

    cudaStream_t stream;
    MLA_CUDA_CHECK(cudaStreamCreate(&stream));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    MLA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    d.run(c, stream);
    MLA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    MLA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 2; ++replay) {
      d.reset_out();
      MLA_CUDA_CHECK(cudaMemset(d.workspace, 0xff, d.workspace_bytes));
      MLA_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
      const std::vector<float> again = d.download_out(p);
      ASSERT_EQ(0, std::memcmp(again.data(), first.data(), first.size() * sizeof(float)))
          << c.name << ": replay " << replay << " differs from the first run";
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
  }
}

TEST(CudaMoeExperts, RejectsBadShapes) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Case c = cases()[0];
  std::mt19937 rng(5152);
  const Problem p = make_problem(c, rng);
  DeviceProblem d(p);
  cuda::MoeExpertsParams bad = d.params(c);
  bad.d = 60;  // not a multiple of 8
  EXPECT_THROW(cuda::moe_experts(bad, d.workspace, d.workspace_bytes, nullptr), Error);
  bad = d.params(c);
  bad.first_expert = 1;  // experts [1, 9) of 8
  EXPECT_THROW(cuda::moe_experts(bad, d.workspace, d.workspace_bytes, nullptr), Error);
  EXPECT_THROW(cuda::moe_experts(d.params(c), d.workspace, d.workspace_bytes - 1, nullptr), Error);
  bad = d.params(c);
  bad.shared = {.gate_up = bad.gate_up, .down = bad.down, .act = nullptr, .inter = 12};
  EXPECT_THROW(cuda::moe_experts(bad, d.workspace, d.workspace_bytes, nullptr), Error);  // 12 % 8
}

}  // namespace
}  // namespace mla
