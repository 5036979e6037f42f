// `mlaserve bench-kernels`: times CUDA kernels on this machine's GPU and states each result as
// a fraction of the device's own ceilings, measured in the same run: the device-to-device copy
// bandwidth and the cuBLAS bf16 GEMM rate. Timing: CUDA events around each launch, after
// warm-up, median of --iters runs, on random never-zero bf16 data.
//
// Benches so far: `mla_decode` (cuda::mla_decode, absorbed MLA decode attention over the paged
// latent cache), `small_gemm` (the decode step's weight products at a few rows: the small-row
// kernel against cuBLAS, on DeepSeek-V2-Lite's and V3's shapes) and `fp8_gemm` (V3's decode
// products with fp8 weights kept: activation quantisation plus cuda::fp8_gemm, against the
// bf16 small-row kernel on the same shape). A new bench is a function that
// appends BenchRecords (time, bytes it must move, FLOPs it must do); the table and the JSON output
// take them as they are.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdint>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/error.h"
#include "launch/commands.h"

#ifdef MLA_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_memory.h"
#include "kernels/cuda/fp8_gemm.h"
#include "kernels/cuda/fp8_gemm_lt.h"
#include "kernels/cuda/fp8_latent.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/mla_decode.h"
#include "kernels/cuda/skinny_gemm.h"
#include "kernels/dtype.h"
#endif

namespace mla::launch {
namespace {

struct BenchKernelsArgs {
  int32_t batch = 128;
  std::vector<int32_t> contexts = {4096, 8192};
  std::vector<int32_t> lengths;  // mla_decode: this one batch of sequence lengths instead
  std::vector<int32_t> heads = {16, 32, 64, 128};
  std::vector<int32_t> s_q = {1, 2};
  std::vector<std::string> caches = {"bf16"};  // mla_decode: the pool's rows
  // mla_decode on bf16 rows: auto (what mla_decode picks), split, paired (MlaDecodeKernel)
  std::vector<std::string> decode_kernels = {"auto"};
  std::vector<std::string> benches = {"mla_decode", "small_gemm"};
  std::vector<int32_t> gemm_rows = {1, 8};
  std::vector<int32_t> fp8_rows = {1, 2, 4, 8, 512};
  int32_t iters = 30;
  int32_t warmup = 5;
  uint64_t seed = 1;
  std::string json_path;
};

#ifdef MLA_HAVE_CUDA

// Device memory owned for the length of one bench.
class DeviceBytes {
 public:
  explicit DeviceBytes(size_t bytes) : bytes_(bytes) { MLA_CUDA_CHECK(cudaMalloc(&ptr_, bytes)); }
  ~DeviceBytes() { cudaFree(ptr_); }
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

// Median milliseconds of `iters` runs of `fn` on `stream`, each timed alone between two
// events, after `warmup` runs that are not timed.
double median_ms(cudaStream_t stream, int warmup, int iters, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  cudaEvent_t start, stop;
  MLA_CUDA_CHECK(cudaEventCreate(&start));
  MLA_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms(iters);
  for (int i = 0; i < iters; ++i) {
    MLA_CUDA_CHECK(cudaEventRecord(start, stream));
    fn();
    MLA_CUDA_CHECK(cudaEventRecord(stop, stream));
    MLA_CUDA_CHECK(cudaEventSynchronize(stop));
    MLA_CUDA_CHECK(cudaEventElapsedTime(&ms[i], start, stop));
  }
  MLA_CUDA_CHECK(cudaEventDestroy(start));
  MLA_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return iters % 2 ? ms[iters / 2] : 0.5 * (ms[iters / 2 - 1] + ms[iters / 2]);
}

// What the device can do at best, measured: results are given as fractions of these.
struct Ceilings {
  double copy_gbps = 0.0;         // cudaMemcpyAsync device to device, (read + written) / time
  double gemm_tflops = 0.0;       // cuBLAS bf16 GEMM, fp32 compute, 8192 x 8192 x 8192
  double gemm_tflops_4096 = 0.0;  // the same at 4096^3
};

double gemm_tflops(cublasHandle_t handle, cudaStream_t stream, int n, int warmup, int iters,
                   uint64_t seed) {
  const size_t bytes = size_t{2} * n * n;
  DeviceBytes a(bytes), b(bytes), c(bytes);
  cuda::fill_random_bf16(a.get(), bytes, seed);
  cuda::fill_random_bf16(b.get(), bytes, seed + 1);
  const float alpha = 1.0f, beta = 0.0f;
  const double ms = median_ms(stream, warmup, iters, [&] {
    MLA_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.get(),
                                  CUDA_R_16BF, n, b.get(), CUDA_R_16BF, n, &beta, c.get(),
                                  CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  });
  return 2.0 * n * n * n / (ms * 1e-3) / 1e12;
}

Ceilings measure_ceilings(cudaStream_t stream, int warmup, int iters, uint64_t seed) {
  Ceilings c;
  {
    const size_t bytes = size_t{1} << 30;
    DeviceBytes src(bytes), dst(bytes);
    cuda::fill_random_bf16(src.get(), bytes, seed);
    const double ms = median_ms(stream, warmup, iters, [&] {
      MLA_CUDA_CHECK(
          cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, stream));
    });
    c.copy_gbps = 2.0 * bytes / (ms * 1e-3) / 1e9;
  }
  cublasHandle_t handle;
  MLA_CUBLAS_CHECK(cublasCreate(&handle));
  MLA_CUBLAS_CHECK(cublasSetStream(handle, stream));
  c.gemm_tflops = gemm_tflops(handle, stream, 8192, warmup, iters, seed);
  c.gemm_tflops_4096 = gemm_tflops(handle, stream, 4096, warmup, iters, seed);
  MLA_CUBLAS_CHECK(cublasDestroy(handle));
  return c;
}

// One measured kernel configuration. bytes: the fewest the kernel must move through device
// memory (inputs read once, outputs written once); flops: the arithmetic it must do.
struct BenchRecord {
  std::string bench;
  nlohmann::ordered_json config;
  double time_us = 0.0, bytes = 0.0, flops = 0.0;
  nlohmann::ordered_json extra = nlohmann::ordered_json::object();  // further timings, by name

  double gbps() const { return bytes / (time_us * 1e-6) / 1e9; }
  double tflops() const { return flops / (time_us * 1e-6) / 1e12; }
};

// A decode batch to time: its sequences' key counts and how the results name it.
struct DecodeBatch {
  nlohmann::ordered_json config;
  std::vector<int32_t> lengths;
  std::mt19937 rng;  // places its pages (for a mean context, where drawing the lengths left it)
};

// Per mean context m, `batch` lengths uniform in [m / 2, 3 m / 2] (fixed seed); or the one
// batch --lengths names.
std::vector<DecodeBatch> decode_batches(const BenchKernelsArgs& args) {
  std::vector<DecodeBatch> out;
  if (!args.lengths.empty()) {
    out.push_back({{{"batch", args.lengths.size()},
                    {"lengths", fmt::format("{}", fmt::join(args.lengths, ","))}},
                   args.lengths,
                   std::mt19937(static_cast<uint32_t>(args.seed))});
    return out;
  }
  for (int32_t context : args.contexts) {
    std::mt19937 rng(static_cast<uint32_t>(args.seed + context));
    std::uniform_int_distribution<int32_t> length(std::max(1, context / 2), context * 3 / 2);
    std::vector<int32_t> lengths(args.batch);
    for (auto& len : lengths) len = length(rng);
    out.push_back({{{"batch", args.batch}, {"context", context}}, std::move(lengths), rng});
  }
  return out;
}

// cuda::mla_decode at each decode batch x (s_q, heads): pages scattered over a one-layer pool,
// for each cache element asked for (bf16 rows, fp8 rows: then also the time as a fraction of
// bf16's). Query i of s_q attends the causal step's first L - (s_q - 1 - i) keys.
void bench_mla_decode(const BenchKernelsArgs& args, int num_sms, cudaStream_t stream,
                      std::vector<BenchRecord>& records) {
  constexpr int64_t kWidth = cuda::kMlaDecodeLatentDim + cuda::kMlaDecodeRopeDim;
  constexpr int64_t kDc = cuda::kMlaDecodeLatentDim;
  constexpr int32_t kBlock = cuda::kMlaDecodeBlockSize;
  constexpr int64_t kFp8RowBytes =
      cuda::latent_row_bytes(cuda::LatentElement::kFp8, kDc, kWidth - kDc);
  const bool fp8 = std::find(args.caches.begin(), args.caches.end(), "fp8") != args.caches.end();
  const bool bf16 = std::find(args.caches.begin(), args.caches.end(), "bf16") != args.caches.end();
  std::vector<DecodeBatch> batches = decode_batches(args);
  const auto batch = static_cast<int32_t>(batches.front().lengths.size());  // every batch's
  const int32_t max_heads = *std::max_element(args.heads.begin(), args.heads.end());
  const int32_t max_s_q = *std::max_element(args.s_q.begin(), args.s_q.end());
  const int64_t max_rows = int64_t{batch} * max_s_q * max_heads;
  DeviceBytes q(max_rows * kWidth * 2), out(max_rows * kDc * 2), lse(max_rows * 4);
  cuda::fill_random_bf16(q.get(), q.bytes(), args.seed + 10);
  size_t workspace_bytes = 0;
  for (int32_t heads : args.heads) {
    for (int32_t s_q : args.s_q) {
      workspace_bytes =
          std::max(workspace_bytes, cuda::mla_decode_workspace_bytes(batch, s_q, heads, num_sms));
    }
  }
  DeviceBytes workspace(workspace_bytes);

  for (DecodeBatch& db : batches) {
    const std::vector<int32_t>& lengths = db.lengths;
    std::mt19937& rng = db.rng;
    int32_t max_pages = 0, total_pages = 0;
    int64_t total_keys = 0;
    for (const int32_t len : lengths) {
      total_keys += len;
      const int32_t pages = (len + kBlock - 1) / kBlock;
      max_pages = std::max(max_pages, pages);
      total_pages += pages;
    }
    std::vector<int32_t> ids(total_pages);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<int32_t> table(int64_t{batch} * max_pages, 0);
    for (int32_t b = 0, next = 0; b < batch; ++b) {
      for (int32_t k = 0; k < (lengths[b] + kBlock - 1) / kBlock; ++k) {
        table[int64_t{b} * max_pages + k] = ids[next++];
      }
    }
    const int64_t rows_in_pool = int64_t{total_pages} * kBlock;
    DeviceBytes pool(bf16 ? size_t{2} * rows_in_pool * kWidth : 1);
    DeviceBytes pool_fp8(fp8 ? rows_in_pool * kFp8RowBytes : 1);
    if (bf16) cuda::fill_random_bf16(pool.get(), pool.bytes(), args.seed + 20);
    if (fp8) {
      cuda::fill_random_fp8_latent(pool_fp8.get(), rows_in_pool, kDc, kWidth - kDc, args.seed + 20);
    }
    DeviceBytes d_table(table.size() * 4), d_keys(size_t{4} * batch * max_s_q);
    MLA_CUDA_CHECK(
        cudaMemcpy(d_table.get(), table.data(), table.size() * 4, cudaMemcpyHostToDevice));

    for (int32_t heads : args.heads) {
      for (int32_t s_q : args.s_q) {
        std::vector<int32_t> num_keys;
        double flops = 0.0;
        for (int32_t len : lengths) {
          for (int32_t i = 0; i < s_q; ++i) {
            num_keys.push_back(std::max(0, len - (s_q - 1 - i)));  // {L - 1, L} for s_q 2
            flops += 2.0 * heads * num_keys.back() * (kWidth + kDc);
          }
        }
        MLA_CUDA_CHECK(
            cudaMemcpy(d_keys.get(), num_keys.data(), num_keys.size() * 4, cudaMemcpyHostToDevice));
        double bf16_us = 0.0;
        // bf16 first (each kernel asked for; the first is fp8's ratio's base), then fp8.
        std::vector<std::pair<std::string, std::string>> runs;  // (cache, kernel)
        if (bf16) {
          for (const std::string& k : args.decode_kernels) runs.emplace_back("bf16", k);
        }
        if (fp8) runs.emplace_back("fp8", "auto");
        for (const auto& [cache, kernel] : runs) {
          const bool is_fp8 = cache == "fp8";
          cuda::MlaDecodeParams p{};
          p.kernel = kernel == "split"    ? cuda::MlaDecodeKernel::kSplitKeys
                     : kernel == "paired" ? cuda::MlaDecodeKernel::kPairedTiles
                                          : cuda::MlaDecodeKernel::kAuto;
          p.q = q.get<__nv_bfloat16>();
          p.pool = is_fp8 ? pool_fp8.get() : pool.get();
          p.element = is_fp8 ? cuda::LatentElement::kFp8 : cuda::LatentElement::kBf16;
          p.layer = 0;
          p.num_layers = 1;
          p.block_table = d_table.get<int32_t>();
          p.table_stride = max_pages;
          p.num_keys = d_keys.get<int32_t>();
          p.batch = batch;
          p.s_q = s_q;
          p.heads = heads;
          p.scale = 0.1352f;  // DeepSeek-V3's
          p.out = out.get<__nv_bfloat16>();
          p.lse = lse.get<float>();
          p.num_sms = num_sms;
          const double ms = median_ms(stream, args.warmup, args.iters,
                                      [&] { cuda::mla_decode(p, workspace.get(), stream); });
          // Every layer of a decode step after the first reuses the step's plan.
          p.reuse_plan = true;
          const double reused_ms = median_ms(stream, args.warmup, args.iters,
                                             [&] { cuda::mla_decode(p, workspace.get(), stream); });
          const int64_t rows = int64_t{batch} * s_q * heads;
          const double key_bytes = is_fp8 ? kFp8RowBytes : kWidth * 2;
          BenchRecord r;
          r.bench = "mla_decode";
          r.config = db.config;
          r.config["heads"] = heads;
          r.config["s_q"] = s_q;
          if (is_fp8) r.config["cache"] = "fp8";
          if (kernel != "auto") r.config["kernel"] = kernel;
          r.time_us = ms * 1e3;
          r.bytes = double(total_keys) * key_bytes + double(rows) * (kWidth * 2 + kDc * 2 + 4);
          r.flops = flops;
          r.extra["time_us_plan_reused"] = reused_ms * 1e3;
          if (!is_fp8 && bf16_us == 0.0) bf16_us = r.time_us;
          if (is_fp8 && bf16_us > 0) r.extra["of_bf16_time"] = r.time_us / bf16_us;
          spdlog::info("mla_decode {} heads {} s_q {} {} ({}): {:.1f} us", db.config.dump(), heads,
                       s_q, cache, kernel, r.time_us);
          records.push_back(std::move(r));
        }
      }
    }
  }
}

// The decode step's weight products with `rows` activation rows, through the small-row kernel
// and through cuBLAS (BlasOptions::small_gemm off). Each run reads a different copy of the
// weight from a pool several times the L2, as a step reading every layer's weights does.
void bench_small_gemm(const BenchKernelsArgs& args, cudaStream_t stream,
                      std::vector<BenchRecord>& records) {
  struct Shape {
    const char* model;
    const char* name;
    int64_t n, k;
    bool b_nk = true;
    int64_t batch = 1;
  };
  const Shape shapes[] = {
      {"v2-lite", "kv_a", 576, 2048},
      {"v2-lite", "q_proj", 16 * 192, 2048},
      {"v2-lite", "w_uk^T x16", 512, 128, false, 16},
      {"v2-lite", "w_uv x16", 128, 512, true, 16},
      {"v2-lite", "o_proj", 2048, 2048},
      {"v2-lite", "shared gate_up", 2 * 2816, 2048},
      {"v2-lite", "shared down", 2048, 2816},
      {"v2-lite", "lm_head", 102400, 2048},
      {"v3", "q_a", 1536, 7168},
      {"v3", "kv_a", 576, 7168},
      {"v3", "q_b", 128 * 192, 1536},
      {"v3", "o_proj", 7168, 128 * 128},
      {"v3", "shared down", 7168, 2048},
  };
  int64_t max_rows = 1, max_a = 0, max_b = 0, max_c = 0;
  for (int32_t rows : args.gemm_rows) max_rows = std::max<int64_t>(max_rows, rows);
  for (const Shape& sh : shapes) {
    max_a = std::max(max_a, sh.batch * sh.k);
    max_b = std::max(max_b, sh.batch * sh.n * sh.k);
    max_c = std::max(max_c, sh.batch * sh.n);
  }
  const size_t pool_bytes = std::max<size_t>(size_t{1} << 30, size_t{4} * max_b);
  DeviceBytes a(2 * max_rows * max_a), pool(pool_bytes), c(4 * max_rows * max_c);
  cuda::fill_random_bf16(a.get(), a.bytes(), args.seed + 30);
  cuda::fill_random_bf16(pool.get(), pool.bytes(), args.seed + 31);
  cuda::Blas blas(stream, {.small_gemm = false});
  for (const Shape& sh : shapes) {
    for (int32_t rows : args.gemm_rows) {
      const int64_t b_bytes = 2 * sh.batch * sh.n * sh.k;
      const int64_t copies = static_cast<int64_t>(pool_bytes) / b_bytes;
      cuda::GemmParams p{};
      p.a = a.get();
      p.c = c.get();
      p.m = rows, p.n = sh.n, p.k = sh.k;
      p.lda = sh.batch * sh.k;  // [rows, heads, k] as the model lays out per-head inputs
      p.ldb = sh.b_nk ? sh.k : sh.n;
      p.ldc = sh.batch * sh.n;
      p.b_nk = sh.b_nk;
      p.batch = sh.batch;
      p.stride_a = sh.k, p.stride_b = sh.n * sh.k, p.stride_c = sh.n;
      p.b_constant = true;
      int64_t next = 0;
      auto run = [&](bool small) {
        return median_ms(stream, args.warmup, args.iters, [&] {
          p.b = pool.get<char>() + (next++ % copies) * b_bytes;
          if (small) {
            cuda::skinny_gemm(p, stream);
          } else {
            cuda::gemm(blas, p);
          }
        });
      };
      const double small_ms = run(true), cublas_ms = run(false);
      BenchRecord r;
      r.bench = "small_gemm";
      r.config = {
          {"model", sh.model}, {"product", sh.name}, {"rows", rows}, {"n", sh.n}, {"k", sh.k}};
      r.time_us = small_ms * 1e3;
      r.bytes = double(b_bytes) + 2.0 * rows * sh.batch * sh.k + 4.0 * rows * sh.batch * sh.n;
      r.flops = 2.0 * rows * sh.batch * sh.n * sh.k;
      r.extra["cublas_us"] = cublas_ms * 1e3;
      r.extra["speedup"] = cublas_ms / small_ms;
      spdlog::info("small_gemm {} {} rows {}: {:.1f} us (cuBLAS {:.1f} us)", sh.model, sh.name,
                   rows, small_ms * 1e3, cublas_ms * 1e3);
      records.push_back(std::move(r));
    }
  }
}

// DeepSeek-V3's products with fp8 weights (e4m3 and a scale per row and 128 columns, as
// fp8_weights keep holds them) at `rows` activation rows: fp8_quantize_rows + fp8_gemm against
// the bf16 small-row kernel on the same shape (what fp8_weights widen runs); above 16 rows
// fp8_gemm_lt (cuBLASLt's block-scaled fp8) against cuBLAS bf16, as the model runs them. Each run
// reads a different copy of the weights, as in bench_small_gemm.
void bench_fp8_gemm(const BenchKernelsArgs& args, cudaStream_t stream,
                    std::vector<BenchRecord>& records) {
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const Shape shapes[] = {
      {"q_a", 1536, 7168},
      {"kv_a", 576, 7168},
      {"q_b tp8", 16 * 192, 1536},
      {"o_proj tp8", 7168, 2048},
      {"expert gate_up", 4096, 7168},
      {"expert down", 7168, 2048},
      {"q_b", 128 * 192, 1536},
      {"o_proj", 7168, 16384},
  };
  int64_t max_rows = 1, max_k = 0, max_n = 0, max_w = 0;
  for (int32_t rows : args.fp8_rows) max_rows = std::max<int64_t>(max_rows, rows);
  for (const Shape& sh : shapes) {
    max_k = std::max(max_k, sh.k);
    max_n = std::max(max_n, sh.n);
    max_w = std::max(max_w, sh.n * sh.k);
  }
  const size_t pool_bytes = std::max<size_t>(size_t{1} << 30, size_t{8} * max_w);
  DeviceBytes x(2 * max_rows * max_k), qx(max_rows * max_k), sx(4 * max_rows * max_k / 128),
      y(4 * max_rows * max_n), pool(pool_bytes), scales(pool_bytes / 32 + 256);
  cuda::fill_random_bf16(x.get(), x.bytes(), args.seed + 40);
  cuda::fill_random_bf16(pool.get(), pool.bytes(), args.seed + 41);
  MLA_CUDA_CHECK(cudaMemsetAsync(scales.get(), 0, scales.bytes(), stream));
  const cuda::Blas blas(stream);
  for (const Shape& sh : shapes) {
    for (int32_t rows : args.fp8_rows) {
      const int64_t w8 = sh.n * sh.k, w16 = 2 * sh.n * sh.k, s_bytes = 4 * sh.n * (sh.k / 128);
      const int64_t copies8 = static_cast<int64_t>(pool_bytes) / w8;
      const int64_t copies16 = static_cast<int64_t>(pool_bytes) / w16;
      int64_t next = 0;
      // Above a tile of fp8_gemm's rows the model runs cuBLASLt's block-scaled product (its
      // block scales: the same zeros), and the bf16 comparison is cuBLAS.
      const bool prefill = rows > cuda::kFp8GemmRowTile;
      const double fp8_ms = median_ms(stream, args.warmup, args.iters, [&] {
        const int64_t copy = next++ % copies8;
        cuda::fp8_quantize_rows({.x = x.get(),
                                 .x_dtype = DType::kBF16,
                                 .m = rows,
                                 .k = sh.k,
                                 .ldx = sh.k,
                                 .q = qx.get<uint8_t>(),
                                 .scale = sx.get<float>()},
                                stream);
        const cuda::Fp8GemmParams fp8{.qx = qx.get<uint8_t>(),
                                      .sx = sx.get<float>(),
                                      .m = rows,
                                      .k = sh.k,
                                      .w = pool.get<uint8_t>() + copy * w8,
                                      .w_scale = scales.get<float>() + copy * (s_bytes / 4),
                                      .n = sh.n,
                                      .y = y.get(),
                                      .y_dtype = DType::kF32,
                                      .ldy = sh.n};
        if (!prefill) {
          cuda::fp8_gemm(fp8, stream);
          return;
        }
        MLA_CHECK(cuda::fp8_gemm_lt(blas, fp8, scales.get<float>()),
                  "fp8_gemm_lt: no cuBLASLt algorithm for {} rows of {}", rows, sh.name);
      });
      cuda::GemmParams p{};
      p.a = x.get();
      p.c = y.get();
      p.m = rows, p.n = sh.n, p.k = sh.k;
      p.lda = sh.k, p.ldb = sh.k, p.ldc = sh.n;
      p.b_nk = true;
      p.b_constant = true;
      const double bf16_ms = median_ms(stream, args.warmup, args.iters, [&] {
        p.b = pool.get<char>() + (next++ % copies16) * w16;
        if (prefill) {
          cuda::gemm(blas, p);
        } else {
          cuda::skinny_gemm(p, stream);
        }
      });
      const char* bf16_name = prefill ? "bf16_cublas_us" : "bf16_small_gemm_us";
      BenchRecord r;
      r.bench = prefill ? "fp8_gemm_lt" : "fp8_gemm";
      r.config = {{"model", "v3"}, {"product", sh.name}, {"rows", rows}, {"n", sh.n}, {"k", sh.k}};
      r.time_us = fp8_ms * 1e3;
      r.bytes = double(w8 + s_bytes) + 2.0 * rows * sh.k + 4.0 * rows * sh.n;
      r.flops = 2.0 * rows * sh.n * sh.k;
      r.extra[bf16_name] = bf16_ms * 1e3;
      r.extra["speedup"] = bf16_ms / fp8_ms;
      spdlog::info("{} v3 {} rows {}: {:.1f} us (bf16 {:.1f} us)", r.bench, sh.name, rows,
                   fp8_ms * 1e3, bf16_ms * 1e3);
      records.push_back(std::move(r));
    }
  }
}

std::string config_string(const nlohmann::ordered_json& config) {
  std::string s;
  for (const auto& [key, value] : config.items()) {
    s += fmt::format("{}{}={}", s.empty() ? "" : " ", key, value.dump());
  }
  return s;
}

int run_bench_kernels(const BenchKernelsArgs& args) {
  MLA_REQUIRE(args.iters >= 1 && args.warmup >= 0, "--iters must be >= 1 and --warmup >= 0");
  MLA_REQUIRE(args.batch >= 1 && !args.contexts.empty() && !args.heads.empty() && !args.s_q.empty(),
              "--batch, --contexts, --heads and --sq must be non-empty and positive");
  for (const int32_t s_q : args.s_q) {
    MLA_REQUIRE(s_q >= 1 && s_q <= 4, "--sq: {} is not in [1, 4]", s_q);
  }
  for (const int32_t len : args.lengths) {
    MLA_REQUIRE(len >= 1 && len <= (1 << 24), "--lengths: {} is not in [1, 2^24]", len);
  }
  int device = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  MLA_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  cudaStream_t stream;
  MLA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  const Ceilings ceilings = measure_ceilings(stream, args.warmup, args.iters, args.seed);
  std::vector<BenchRecord> records;
  auto wanted = [&](const char* name) {
    return std::find(args.benches.begin(), args.benches.end(), name) != args.benches.end();
  };
  if (wanted("mla_decode")) bench_mla_decode(args, prop.multiProcessorCount, stream, records);
  if (wanted("small_gemm")) bench_small_gemm(args, stream, records);
  if (wanted("fp8_gemm")) bench_fp8_gemm(args, stream, records);
  for (BenchRecord& r : records) {
    if (r.bench == "small_gemm") {  // cuBLAS's share of the copy bandwidth, for comparison
      r.extra["cublas_of_copy_pct"] =
          100.0 * r.bytes / (r.extra["cublas_us"].get<double>() * 1e-6) / 1e9 / ceilings.copy_gbps;
    }
  }
  MLA_CUDA_CHECK(cudaStreamDestroy(stream));

  fmt::print("\ndevice: {} ({} SMs, L2 {} MB)\n", prop.name, prop.multiProcessorCount,
             prop.l2CacheSize >> 20);
  fmt::print(
      "ceilings: copy {:.0f} GB/s (read + written, 1 GiB D2D); cuBLAS bf16 GEMM {:.0f} "
      "TFLOP/s at 8192^3, {:.0f} at 4096^3\n\n",
      ceilings.copy_gbps, ceilings.gemm_tflops, ceilings.gemm_tflops_4096);
  fmt::print("| bench | config | time (us) | GB/s | of copy | TFLOP/s | of GEMM | more |\n");
  fmt::print("|---|---|---:|---:|---:|---:|---:|---|\n");
  for (const BenchRecord& r : records) {
    std::string more;
    for (const auto& [key, value] : r.extra.items()) {
      more += fmt::format("{}{} {:.1f}", more.empty() ? "" : ", ", key, value.get<double>());
    }
    fmt::print("| {} | {} | {:.1f} | {:.0f} | {:.2f} | {:.1f} | {:.2f} | {} |\n", r.bench,
               config_string(r.config), r.time_us, r.gbps(), r.gbps() / ceilings.copy_gbps,
               r.tflops(), r.tflops() / ceilings.gemm_tflops, more);
  }

  if (!args.json_path.empty()) {
    nlohmann::ordered_json j;
    j["device"] = {{"name", prop.name}, {"sms", prop.multiProcessorCount}};
    j["ceilings"] = {{"copy_gbps", ceilings.copy_gbps},
                     {"gemm_bf16_tflops_8192", ceilings.gemm_tflops},
                     {"gemm_bf16_tflops_4096", ceilings.gemm_tflops_4096}};
    j["iters"] = args.iters;
    for (const BenchRecord& r : records) {
      j["results"].push_back({{"bench", r.bench},
                              {"config", r.config},
                              {"time_us", r.time_us},
                              {"bytes", r.bytes},
                              {"flops", r.flops},
                              {"gbps", r.gbps()},
                              {"tflops", r.tflops()},
                              {"of_copy", r.gbps() / ceilings.copy_gbps},
                              {"of_gemm", r.tflops() / ceilings.gemm_tflops},
                              {"extra", r.extra}});
    }
    std::ofstream f(args.json_path);
    MLA_REQUIRE(f.good(), "cannot write {}", args.json_path);
    f << j.dump(2) << "\n";
  }
  return 0;
}

#else

int run_bench_kernels(const BenchKernelsArgs&) {
  MLA_THROW(kFailedPrecondition, "bench-kernels: this build has no CUDA backend");
}

#endif

}  // namespace

void add_bench_kernels_command(CLI::App& app, int& exit_code) {
  auto a = std::make_shared<BenchKernelsArgs>();
  auto* cmd = app.add_subcommand(
      "bench-kernels",
      "Time the CUDA kernels against this GPU's copy bandwidth and cuBLAS GEMM rate");
  cmd->add_option("--batch", a->batch, "Sequences per decode batch")->capture_default_str();
  cmd->add_option("--contexts", a->contexts,
                  "Mean context lengths (each sequence's is uniform in [mean/2, 3 mean/2])")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--heads", a->heads, "Query head counts")->delimiter(',')->capture_default_str();
  cmd->add_option("--lengths", a->lengths,
                  "mla_decode: time this one batch of sequence lengths instead (e.g. the "
                  "unbalanced 4641,45118,1730,1696)")
      ->delimiter(',');
  cmd->add_option("--sq", a->s_q, "Query tokens per sequence (1 to 4: a speculative step)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--cache", a->caches,
                  "mla_decode: the pool's rows, bf16 and/or fp8 (FlashMLA's 656-byte packed row)")
      ->delimiter(',')
      ->check(CLI::IsMember({"bf16", "fp8"}))
      ->capture_default_str();
  cmd->add_option("--decode-kernel", a->decode_kernels,
                  "mla_decode on bf16 rows: auto (what mla_decode picks for the shape), split "
                  "(each KV tile's keys split between the warpgroups) and/or paired (a tile per "
                  "warpgroup); results of split and paired carry config.kernel")
      ->delimiter(',')
      ->check(CLI::IsMember({"auto", "split", "paired"}))
      ->capture_default_str();
  cmd->add_option("--benches", a->benches, "Which benches: mla_decode, small_gemm, fp8_gemm")
      ->delimiter(',')
      ->check(CLI::IsMember({"mla_decode", "small_gemm", "fp8_gemm"}))
      ->capture_default_str();
  cmd->add_option("--gemm-rows", a->gemm_rows, "small_gemm: activation rows (1 .. 8)")
      ->delimiter(',')
      ->check(CLI::Range(1, 8))
      ->capture_default_str();
  cmd->add_option("--fp8-rows", a->fp8_rows,
                  "fp8_gemm: activation rows (above 16: cuBLASLt's block-scaled product)")
      ->delimiter(',')
      ->check(CLI::Range(1, 8192))
      ->capture_default_str();
  cmd->add_option("--iters", a->iters, "Timed runs per configuration (the median is reported)")
      ->capture_default_str();
  cmd->add_option("--warmup", a->warmup, "Untimed runs before each configuration")
      ->capture_default_str();
  cmd->add_option("--seed", a->seed, "Seed of the random data and lengths")->capture_default_str();
  cmd->add_option("--json", a->json_path, "Also write the results to this file as JSON");
  cmd->callback([a, &exit_code] { exit_code = run_bench_kernels(*a); });
}

}  // namespace mla::launch
