// `mlaserve bench-decode`: decode steps of a whole model at a chosen batch and context, alone
// or as a tensor-parallel group under mpirun, without prefilling the context first.
//
// Every rank loads its shard and builds a cache sized as the engine would (num_pages, or
// cache.memory_fraction of free device memory), fills the whole pool with random never-zero
// latents, and gives each of `batch` sequences `context` tokens of it. Then every rank runs
// the same decode steps (same random tokens: no step plans are needed), each step one new
// token per sequence appended at the end of its context, as the engine's decode steps do.
// Reported by the group's leader, per (context, batch):
//   - median step time over --steps steps after --warmup (CUDA graphs as configured), and
//     the decode tokens/s it gives;
//   - on GPUs, --steps more steps with profiling (CUDA events around the sections, inside the
//     graphs): median step time, and per step the latent attention time (its collectives
//     included) and the time in collectives, with their share of the profiled step.
// The scheduler and the per-step plan broadcast of the engine are not part of the timing.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/fp8_latent.h"
#include "kernels/error.h"
#include "launch/commands.h"
#include "launch/deploy_flags.h"
#include "launch/group_runtime.h"
#include "runtime/latent_cache.h"
#if MLA_HAVE_CUDA
#include "kernels/cuda/device_memory.h"
#include "runtime/cuda/cuda_runner.h"
#endif

namespace mla::launch {
namespace {

struct BenchDecodeArgs {
  DeployFlags deploy;
  std::string contexts = "1024,8192,32768";
  std::string batches = "1,16,64,256";
  int32_t steps = 20;
  int32_t warmup = 3;
  uint64_t seed = 1;
};

void fill_pool(const LatentCache& cache, uint64_t seed) {
  const Tensor& pool = cache.pool_storage();
  const CacheGeometry& g = cache.geometry();
  const int64_t rows = int64_t{cache.pool().num_pages()} * g.num_layers * g.block_size;
  switch (cache.storage()) {
    case CacheStorage::kDeviceBf16:
#if MLA_HAVE_CUDA
      cuda::fill_random_bf16(pool.raw(), pool.nbytes(), seed);
#endif
      return;
    case CacheStorage::kDeviceFp8:
#if MLA_HAVE_CUDA
      cuda::fill_random_fp8_latent(pool.raw(), rows, g.kv_lora_rank, g.rope_dim, seed);
#endif
      return;
    case CacheStorage::kHostFp8: {
      std::vector<float> values(g.width());
      std::mt19937_64 rng(seed);
      std::normal_distribution<float> normal;
      const cpu::Fp8LatentRow f{.d_c = g.kv_lora_rank, .d_r = g.rope_dim};
      for (int64_t r = 0; r < rows; ++r) {
        for (float& v : values) v = normal(rng);
        cpu::quantize_latent_fp8(f, values.data(), 1, g.width(),
                                 static_cast<uint8_t*>(pool.raw()) + r * f.bytes());
      }
      return;
    }
    default: {
      std::mt19937_64 rng(seed);
      std::normal_distribution<float> normal;
      float* p = pool.f32();
      for (int64_t i = 0; i < pool.numel(); ++i) p[i] = normal(rng);
    }
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// True on every rank when `ok` is true on every rank of the group.
bool all_ranks(const GroupRuntime& rt, bool ok) {
  if (rt.comm == nullptr) return ok;
  float fails = ok ? 0.0f : 1.0f;
  rt.comm->all_reduce_sum(&fails, 1);
  return fails == 0.0f;
}

struct Timing {
  double step_ms = 0;        // median step
  double attention_ms = -1;  // per profiled step; < 0 when not profiled
  double collective_ms = -1;
  double profiled_step_ms = 0;  // median profiled step
};

class DecodeBench {
 public:
  DecodeBench(const BenchDecodeArgs& a, GroupRuntime& rt, LatentCache& cache)
      : a_(a),
        rt_(rt),
        cache_(cache),
        model_(*rt.model),
        runner_(model_.make_runner(cache, rt.data)),
        rng_(a.seed) {
#if MLA_HAVE_CUDA
    cuda_ = dynamic_cast<CudaRunner*>(runner_.get());
#endif
  }

  // Tokens each sequence reaches: the context, then the steps appended to it.
  int32_t tokens_per_sequence(int32_t context) const {
    return context + a_.warmup + a_.steps + (cuda_ != nullptr ? a_.steps : 0);
  }

  // Runs one (context, batch) point; nullopt when the cache cannot hold it.
  std::optional<Timing> run(int32_t context, int32_t batch) {
    const int32_t profiled = cuda_ != nullptr ? a_.steps : 0;
    const int32_t total = tokens_per_sequence(context);
    MLA_REQUIRE(total <= model_.config().max_position_embeddings,
                "context {} plus {} steps exceeds the model's {} positions", context,
                total - context, model_.config().max_position_embeddings);
    std::vector<BlockTable> tables(batch);
    bool fits = true;
    for (auto& t : tables) fits = fits && cache_.reserve(t, total);
    struct Release {
      LatentCache& cache;
      std::vector<BlockTable>& tables;
      ~Release() {
        for (auto& t : tables) cache.release(t);
      }
    } release{cache_, tables};
    if (!all_ranks(rt_, fits)) return std::nullopt;

    Timing out;
    std::vector<double> ms;
    for (int32_t k = 0; k < a_.warmup + a_.steps; ++k) {
      const double t = step(tables, context - 1 + k);
      if (k >= a_.warmup) ms.push_back(t);
    }
    out.step_ms = median(ms);
#if MLA_HAVE_CUDA
    if (cuda_ != nullptr) {
      ms.clear();
      cuda_->reset_profile();
      cuda_->set_profiling(true);
      for (int32_t k = 0; k < profiled; ++k) {
        ms.push_back(step(tables, context - 1 + a_.warmup + a_.steps + k));
      }
      cuda_->set_profiling(false);
      const StepProfile p = cuda_->profile();
      out.profiled_step_ms = median(ms);
      out.attention_ms = p.attention_ms / static_cast<double>(p.steps);
      out.collective_ms = p.collective_ms / static_cast<double>(p.steps);
    }
#endif
    return out;
  }

 private:
  // One decode step: every sequence appends the token at `pos`. Returns milliseconds.
  double step(const std::vector<BlockTable>& tables, int32_t pos) {
    ForwardBatch fb;
    std::vector<SampleRequest> reqs;
    const auto top = static_cast<int32_t>(std::min<int64_t>(model_.config().vocab_size, 30000));
    std::uniform_int_distribution<int32_t> token(1, top - 1);
    for (const BlockTable& t : tables) {
      fb.tokens.push_back(token(rng_));
      fb.seqs.push_back({&t, pos, 1, true});
      SampleRequest r;
      r.position = pos + 1;
      reqs.push_back(r);
    }
    const auto t0 = std::chrono::steady_clock::now();
    runner_->forward_sample(fb, reqs);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }

  const BenchDecodeArgs& a_;
  GroupRuntime& rt_;
  LatentCache& cache_;
  const Model& model_;
  std::unique_ptr<ModelRunner> runner_;
  std::mt19937_64 rng_;  // the same on every rank: the same tokens everywhere
#if MLA_HAVE_CUDA
  CudaRunner* cuda_ = nullptr;
#else
  void* cuda_ = nullptr;
#endif
};

int run_bench_decode(const BenchDecodeArgs& a) {
  const DeployConfig d = a.deploy.resolve();
  MLA_REQUIRE(a.steps >= 1 && a.warmup >= 0, "--steps must be >= 1 and --warmup >= 0");
  const std::vector<int32_t> contexts = parse_ids(a.contexts, "--context");
  const std::vector<int32_t> batches = parse_ids(a.batches, "--batch");
  for (int32_t c : contexts) MLA_REQUIRE(c >= 1, "--context values must be >= 1, got {}", c);
  for (int32_t b : batches) MLA_REQUIRE(b >= 1, "--batch values must be >= 1, got {}", b);

  auto rt = GroupRuntime::start(d, /*with_engine=*/false);
  const Model& model = *rt->model;
  const EngineOptions engine = d.engine_options();
  const int32_t pages = engine.cache_pages(model);
  LatentCache cache(model.cache_geometry(engine.block_size), pages, model.shard(),
                    model.cache_storage());
  fill_pool(cache, a.seed + static_cast<uint64_t>(rt->groups.world_rank));
  const ShardPlan& sp = model.shard();
  const bool sharded = !cache.holds_every_page();
  const int64_t block = engine.block_size;
  // Sharded, page j of a sequence is on rank j mod P: the group holds P times one rank's pool.
  const int64_t held = int64_t{pages} * block * (sharded ? sp.tp_size() : 1);
  const bool leader = rt->groups.tp_rank == 0 && rt->groups.group_index == 0;
  const std::string setup =
      sp.tp_size() == 1
          ? std::string("tp 1")
          : fmt::format("tp {} {}", sp.tp_size(), sharded ? "sequence-sharded" : "replicated");
  if (leader) {
    std::cout << fmt::format(
                     "{}: {} pages of {} tokens per rank; the group holds {} tokens of context "
                     "in total\n",
                     setup, pages, block, held)
              << fmt::format("{:>8} {:>6} {:>10} {:>12} {:>12} {:>12} {:>14} {:>8}\n", "context",
                             "batch", "step ms", "tokens/s", "prof. ms", "attention ms",
                             "collective ms", "coll %")
              << std::flush;
  }
  DecodeBench bench(a, *rt, cache);
  for (int32_t context : contexts) {
    for (int32_t batch : batches) {
      const auto t = bench.run(context, batch);
      if (!leader) continue;
      if (!t) {
        const int64_t pages_each = (bench.tokens_per_sequence(context) + block - 1) / block;
        std::cout << fmt::format(
            "{:>8} {:>6}  does not fit: {} sequences of {} pages ({} tokens) > {} held\n", context,
            batch, batch, pages_each, batch * pages_each * block, held);
        continue;
      }
      std::cout << fmt::format("{:>8} {:>6} {:>10.3f} {:>12.1f}", context, batch, t->step_ms,
                               batch / t->step_ms * 1e3);
      if (t->attention_ms >= 0) {
        std::cout << fmt::format(" {:>12.3f} {:>12.3f} {:>14.3f} {:>7.1f}%", t->profiled_step_ms,
                                 t->attention_ms, t->collective_ms,
                                 100 * t->collective_ms / t->profiled_step_ms);
      }
      std::cout << std::endl;
    }
  }
  return 0;
}

}  // namespace

void add_bench_decode_command(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<BenchDecodeArgs>();
  auto* cmd = app.add_subcommand(
      "bench-decode",
      "Time whole-model decode steps at given batch sizes and context lengths (the context is "
      "random latents, not prefilled); under mpirun, a tensor-parallel group");
  args->deploy.add_to(*cmd);
  cmd->add_option("--context", args->contexts, "Context lengths, comma separated")
      ->capture_default_str();
  cmd->add_option("--batch", args->batches, "Batch sizes, comma separated")->capture_default_str();
  cmd->add_option("--steps", args->steps, "Timed steps per point (and as many profiled)")
      ->capture_default_str();
  cmd->add_option("--warmup", args->warmup, "Untimed steps first")->capture_default_str();
  cmd->add_option("--seed", args->seed, "Seed of the tokens and the cache contents")
      ->capture_default_str();
  cmd->callback([args, &exit_code] { exit_code = run_bench_decode(*args); });
}

}  // namespace mla::launch
