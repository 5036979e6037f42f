// CUDA sampling against mla::sample_token and mla::token_logprob on fresh random logits: every
// row picks exactly the CPU's token over a grid of temperature, top_k and top_p, at vocabulary
// sizes from 100 to DeepSeek-V3's 129280, with planted ties, signed zeros and -inf logits;
// also the all-greedy path and a replay of the launch captured in a CUDA graph.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/sampling.h"
#include "runtime/sampler.h"

namespace mla {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Batch {
  int64_t rows, vocab;
  std::vector<float> logits;
  std::vector<SamplingParams> params;
  std::vector<int64_t> positions;
};

Batch make_batch(std::mt19937_64& rng, int64_t rows, int64_t vocab) {
  Batch b{rows, vocab, std::vector<float>(rows * vocab), {}, {}};
  const float temperatures[] = {0.0f, 0.3f, 1.0f, 1.8f};
  const int32_t top_ks[] = {0, 1, 7, 50, static_cast<int32_t>(vocab)};
  const float top_ps[] = {1.0f, 0.95f, 0.5f, 0.05f};
  const float scales[] = {0.5f, 2.0f, 6.0f};  // flat to peaky distributions
  std::uniform_int_distribution<int64_t> index(0, vocab - 1), position(0, 1 << 20);
  for (int64_t r = 0; r < rows; ++r) {
    SamplingParams sp;
    sp.temperature = temperatures[r % 4];
    sp.top_k = std::min<int32_t>(top_ks[(r / 4) % 5], static_cast<int32_t>(vocab));
    sp.top_p = top_ps[(r / 20) % 4];
    sp.seed = rng();
    b.params.push_back(sp);
    b.positions.push_back(position(rng));

    float* row = b.logits.data() + r * vocab;
    std::normal_distribution<float> normal(0.0f, scales[(r / 7) % 3]);
    for (int64_t i = 0; i < vocab; ++i) row[i] = normal(rng);
    switch (r % 9) {
      case 1:  // planted copies of the maximum: the lowest id sorts first
        for (int k = 0; k < 4; ++k) row[index(rng)] = 30.0f;
        break;
      case 3:  // all equal: every candidate weighs exactly 1, ties all the way down
        for (int64_t i = 0; i < vocab; ++i) row[i] = 0.75f;
        break;
      case 5:  // signed zeros, which sort as equal, among small values
        for (int64_t i = 0; i < vocab; ++i) {
          if (i % 3 != 0) row[i] = (rng() & 1) ? 0.0f : -0.0f;
        }
        break;
      case 7:  // a masked-out part of the vocabulary (a row keeps a finite value)
        for (int64_t i = 0; i + 1 < vocab; i += 3) row[i] = -kInf;
        break;
      default:
        break;
    }
  }
  return b;
}

// A batch's device copy, its outputs and a workspace, freed on destruction.
struct DeviceBatch {
  float* logits;
  cuda::SampleRow* rows;
  int32_t* tokens;
  float* logprobs;
  void* workspace;
  size_t workspace_bytes;

  explicit DeviceBatch(const Batch& b) {
    std::vector<cuda::SampleRow> host_rows;
    for (int64_t r = 0; r < b.rows; ++r) {
      const SamplingParams& sp = b.params[r];
      host_rows.push_back({sp.temperature, sp.top_k, sp.top_p, sp.seed, b.positions[r]});
    }
    upload(&logits, b.logits);
    upload(&rows, host_rows);
    MLA_CUDA_CHECK(cudaMalloc(&tokens, b.rows * sizeof(int32_t)));
    MLA_CUDA_CHECK(cudaMalloc(&logprobs, b.rows * sizeof(float)));
    workspace_bytes = cuda::sampling_workspace_bytes(b.rows, b.vocab);
    MLA_CUDA_CHECK(cudaMalloc(&workspace, workspace_bytes));
    MLA_CUDA_CHECK(cudaMemset(workspace, 0xff, workspace_bytes));
    poison(b.rows);
  }
  ~DeviceBatch() {
    for (void* ptr : {static_cast<void*>(logits), static_cast<void*>(rows),
                      static_cast<void*>(tokens), static_cast<void*>(logprobs), workspace}) {
      cudaFree(ptr);
    }
  }

  // NaN log-probabilities, -1 tokens.
  void poison(int64_t n) {
    MLA_CUDA_CHECK(cudaMemset(tokens, 0xff, n * sizeof(int32_t)));
    MLA_CUDA_CHECK(cudaMemset(logprobs, 0xff, n * sizeof(float)));
  }

  void sample(const Batch& b, bool all_greedy, cudaStream_t stream) const {
    cuda::SampleParams p{logits, rows, tokens, logprobs, b.rows, b.vocab};
    p.all_greedy = all_greedy;
    cuda::sample(p, workspace, workspace_bytes, stream);
  }

  void download(int64_t n, std::vector<int32_t>* host_tokens,
                std::vector<float>* host_logprobs) const {
    host_tokens->resize(n);
    host_logprobs->resize(n);
    MLA_CUDA_CHECK(
        cudaMemcpy(host_tokens->data(), tokens, n * sizeof(int32_t), cudaMemcpyDeviceToHost));
    MLA_CUDA_CHECK(
        cudaMemcpy(host_logprobs->data(), logprobs, n * sizeof(float), cudaMemcpyDeviceToHost));
  }

 private:
  template <class T>
  static void upload(T** ptr, const std::vector<T>& v) {
    MLA_CUDA_CHECK(cudaMalloc(ptr, v.size() * sizeof(T)));
    MLA_CUDA_CHECK(cudaMemcpy(*ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
};

// token_logprob sums in double; the GPU sums the same terms in another order, so the float
// results agree to a few fp32 ulps of values of order 1..20.
constexpr float kLogprobTolerance = 1e-5f;

void expect_matches_cpu(const Batch& b, const std::vector<int32_t>& tokens,
                        const std::vector<float>& logprobs, bool greedy) {
  for (int64_t r = 0; r < b.rows; ++r) {
    const float* row = b.logits.data() + r * b.vocab;
    SamplingParams sp = b.params[r];
    if (greedy) sp.temperature = 0;
    const int32_t want = sample_token(row, b.vocab, sp, b.positions[r]);
    ASSERT_EQ(tokens[r], want) << "vocab " << b.vocab << ", row " << r << ": temperature "
                               << sp.temperature << ", top_k " << sp.top_k << ", top_p "
                               << sp.top_p;
    EXPECT_NEAR(logprobs[r], token_logprob(row, b.vocab, want), kLogprobTolerance)
        << "vocab " << b.vocab << ", row " << r;
  }
}

TEST(CudaSampling, MatchesSampleTokenOverParameterGrid) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(97);
  for (int64_t vocab : {int64_t{100}, int64_t{32000}, int64_t{129280}}) {
    const Batch b = make_batch(rng, 216, vocab);
    DeviceBatch d(b);
    d.sample(b, false, nullptr);
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<int32_t> tokens;
    std::vector<float> logprobs;
    d.download(b.rows, &tokens, &logprobs);
    expect_matches_cpu(b, tokens, logprobs, false);
  }
}

TEST(CudaSampling, AllGreedyTakesTheArgmaxOfEveryRow) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(98);
  for (int64_t vocab : {int64_t{1}, int64_t{100}, int64_t{129280}}) {
    const Batch b = make_batch(rng, 37, vocab);  // temperatures not all 0: the flag decides
    DeviceBatch d(b);
    d.sample(b, true, nullptr);
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<int32_t> tokens;
    std::vector<float> logprobs;
    d.download(b.rows, &tokens, &logprobs);
    expect_matches_cpu(b, tokens, logprobs, true);
  }
}

TEST(CudaSampling, ReplaysFromACudaGraph) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(99);
  const Batch b = make_batch(rng, 64, 32000);
  DeviceBatch d(b);
  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreate(&stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  MLA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  d.sample(b, false, stream);
  MLA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MLA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 2; ++replay) {
    d.poison(b.rows);
    MLA_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<int32_t> tokens;
    std::vector<float> logprobs;
    d.download(b.rows, &tokens, &logprobs);
    expect_matches_cpu(b, tokens, logprobs, false);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace mla
