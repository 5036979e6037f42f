// Shared pieces of the bf16 kernel tests: poisoned device arrays, host-side bf16 rounding, the
// one bf16 comparison the tests state their tolerance against, a graph replay of a launch and a
// parallel loop for the CPU references.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda/cuda_check.h"

namespace mla::test {

// A device array of n elements, every byte 0xFF when made: NaN for fp32 and bf16, -1 for
// int32. Optionally filled from host data.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(int64_t n) : n_(n) {
    MLA_CUDA_CHECK(cudaMalloc(&ptr_, bytes() > 0 ? bytes() : 1));
    poison();
  }
  explicit DeviceArray(const std::vector<T>& host)
      : DeviceArray(static_cast<int64_t>(host.size())) {
    MLA_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return ptr_; }
  int64_t bytes() const { return n_ * static_cast<int64_t>(sizeof(T)); }
  // Every byte 0xFF again (before a second run that must rewrite the outputs). Waits for it:
  // cudaMemset does not order against non-blocking streams.
  void poison() {
    MLA_CUDA_CHECK(cudaMemset(ptr_, 0xFF, bytes()));
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
  }
  // Copies host.size() elements (at most n) to the start of the array.
  void upload(const std::vector<T>& host) {
    MLA_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  // Waits for the device, then copies the whole array back.
  std::vector<T> download() const {
    MLA_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> host(n_);
    MLA_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* ptr_ = nullptr;
  int64_t n_;
};

inline std::vector<float> random_normal(size_t n, std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Plain RoPE frequencies (base 10000) for a rotary dimension d.
inline std::vector<float> rope_inv_freq(int64_t d) {
  std::vector<float> inv_freq(d / 2);
  for (int64_t j = 0; j < d / 2; ++j) {
    inv_freq[j] = 1.0f / std::pow(10000.0f, static_cast<float>(2 * j) / static_cast<float>(d));
  }
  return inv_freq;
}

// Round to nearest even, as the kernels and the weight upload do.
inline std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& v) {
  std::vector<__nv_bfloat16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = __float2bfloat16(v[i]);
  return out;
}

inline std::vector<float> to_float(const std::vector<__nv_bfloat16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = __bfloat162float(v[i]);
  return out;
}

// The values a bf16 input holds: what the CPU reference must see.
inline std::vector<float> bf16_rounded(const std::vector<float>& v) { return to_float(to_bf16(v)); }

// A bf16 output is the kernel's fp32 value rounded once; bf16 keeps 8 significant bits, so the
// rounding alone moves a value by up to 2^-8 of itself. The kernel's fp32 value differs from
// the CPU's by reassociation and by expf/sincosf/rsqrtf against libm (~1e-6 relative, or
// ~1e-6 absolute after cancellation), which kBf16Abs covers with room to spare while staying
// far below one bf16 step of the unit-scale data the tests use.
inline constexpr float kBf16Rel = 1.0f / 256.0f;
inline constexpr float kBf16Abs = 1e-4f;
inline bool bf16_close(float got, float want) {
  return std::abs(got - want) <= kBf16Rel * std::abs(want) + kBf16Abs;
}

// Every output of a bf16 kernel compared with bf16_close; returns the number of mismatches
// (NaN counts as one) and reports the first few as test failures.
inline int64_t count_bf16_mismatches(const std::vector<float>& got, const std::vector<float>& want,
                                     const std::string& what) {
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!bf16_close(got[i], want[i]) && bad++ < 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want " << want[i];
    }
  }
  return bad;
}

inline bool is_bf16_poison(__nv_bfloat16 v) {
  uint16_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits == 0xFFFF;
}

// Runs launch() once, captured from `stream` into a CUDA graph and replayed there: what it
// enqueues must be capturable (no sync, no allocation, no device values read on the host).
template <class Launch>
void run_in_graph_on(cudaStream_t stream, Launch launch) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  MLA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  launch();
  MLA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MLA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  MLA_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  MLA_CUDA_CHECK(cudaStreamSynchronize(stream));
  MLA_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MLA_CUDA_CHECK(cudaGraphDestroy(graph));
}

// The same on a stream of its own, passed to launch(stream).
template <class Launch>
void run_in_graph(Launch launch) {
  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  run_in_graph_on(stream, [&] { launch(stream); });
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));
}

// Runs fn(i) for i in [0, n) on all hardware threads (the scalar references are the slow part
// of the big kernel tests).
template <class Fn>
void parallel_for(int64_t n, Fn fn) {
  std::atomic<int64_t> next{0};
  std::vector<std::thread> threads(std::max(1u, std::thread::hardware_concurrency()));
  for (auto& t : threads) {
    t = std::thread([&] {
      for (int64_t i = next++; i < n; i = next++) fn(i);
    });
  }
  for (auto& t : threads) t.join();
}

}  // namespace mla::test
