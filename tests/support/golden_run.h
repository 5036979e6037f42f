// The golden prompts run through an Engine under the batching patterns the parity suites
// check (tests/unit/test_parity.cpp, tests/gpu/test_cuda_model.cpp,
// tests/mpi/test_tp_parity.cpp, tests/multigpu/test_tp_cuda.cpp). Header-only.
#pragma once

#include <algorithm>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include "runtime/deepseek_model.h"
#include "runtime/engine.h"
#include "tests/support/golden.h"

namespace mla::test {

// How the prompts meet the engine: one at a time; all at once; each joining while the
// earlier ones decode; all at once with prefill cut into 4-token chunks.
enum class Pattern { kUnbatched, kBatched, kJoinMidRun, kChunkedPrefill };

inline const char* pattern_name(Pattern p) {
  switch (p) {
    case Pattern::kUnbatched:
      return "unbatched";
    case Pattern::kBatched:
      return "batched";
    case Pattern::kJoinMidRun:
      return "join_mid_run";
    case Pattern::kChunkedPrefill:
      return "chunked_prefill";
  }
  return "?";
}

// Engine options for a pattern: pages of `block_size` tokens for every golden prompt at
// once (with room to spare), and 4-token steps for chunked prefill.
// A CUDA model's options for a golden run: absorption `mode`, CUDA graphs on or off, no
// progress lines; a test sets what else it varies.
inline ModelOptions cuda_model_options(AbsorbMode mode, bool graphs) {
  ModelOptions o;
  o.absorb = mode;
  o.show_progress = false;
  o.device = Device::kCuda;
  o.cuda.graphs = graphs;
  return o;
}

inline EngineOptions pattern_options(Pattern pattern, int32_t block_size = 64) {
  EngineOptions opts;
  opts.block_size = block_size;
  opts.num_pages = 64 / block_size * 8 + 16;
  opts.scheduler.max_batch_tokens = pattern == Pattern::kChunkedPrefill ? 4 : 256;
  return opts;
}

// Runs every golden prompt of `g` for g.steps tokens (eos ignored, as transformers' greedy
// run did, logits kept) on `engine` (a group's leader, or a single engine) in `pattern`;
// returns each prompt's step outputs, in prompt order. With kJoinMidRun, `join_steps` steps
// run after each prompt joins.
inline std::vector<std::vector<StepOutput>> run_golden(Engine& engine, const Golden& g,
                                                       Pattern pattern, int join_steps = 3) {
  std::map<RequestId, size_t> prompt_of;
  std::vector<std::vector<StepOutput>> out(g.prompts.size());
  auto add = [&](size_t i) {
    Request r;
    r.prompt = g.prompts[i];
    r.max_tokens = g.steps;
    r.ignore_eos = true;
    r.return_logits = true;
    prompt_of[engine.add_request(r)] = i;
  };
  auto step = [&] {
    for (auto& o : engine.step()) out[prompt_of.at(o.id)].push_back(std::move(o));
  };
  for (size_t i = 0; i < g.prompts.size(); ++i) {
    add(i);
    if (pattern == Pattern::kUnbatched) {
      while (engine.has_work()) step();
    } else if (pattern == Pattern::kJoinMidRun) {
      for (int s = 0; s < join_steps; ++s) step();
    }
  }
  while (engine.has_work()) step();
  return out;
}

// The golden prompts as two forward batches on `cache`: every prompt prefilled (no logits),
// then each prompt's first greedy token decoded (logits wanted). Reserves each prompt's pages
// in `tables` (resized to one per prompt; throws mla::Error if the cache lacks pages).
struct PrefillThenDecode {
  ForwardBatch prefill, decode;
};

inline PrefillThenDecode prefill_then_decode(const Golden& g, LatentCache& cache,
                                             std::vector<BlockTable>& tables) {
  tables.resize(g.prompts.size());
  PrefillThenDecode b;
  for (size_t p = 0; p < g.prompts.size(); ++p) {
    const auto n = static_cast<int32_t>(g.prompts[p].size());
    MLA_CHECK(cache.reserve(tables[p], n + 1), "no pages for golden prompt {}", p);
    b.prefill.tokens.insert(b.prefill.tokens.end(), g.prompts[p].begin(), g.prompts[p].end());
    b.prefill.seqs.push_back({&tables[p], 0, n, false});
    b.decode.tokens.push_back(g.greedy[p][0]);
    b.decode.seqs.push_back({&tables[p], n, 1, true});
  }
  return b;
}

// How close an approximate run (fp8 cache, fp8 weights) stays to transformers: each prompt's
// steps up to and including its first greedy token that differs (after it the two runs feed
// different tokens), the logits' relative error at the median and the worst step, and the
// greedy tokens that agree before each prompt's first difference.
struct Closeness {
  double median = 0, worst = 0;
  int steps = 0;  // steps compared
  int agree = 0;  // greedy tokens equal to transformers' before the first difference
  int total = 0;  // greedy tokens transformers produced
};

inline Closeness closeness(const std::vector<std::vector<StepOutput>>& outputs, const Golden& g,
                           int64_t vocab) {
  std::vector<double> errors;
  Closeness c;
  for (size_t p = 0; p < outputs.size(); ++p) {
    c.total += g.steps;
    for (int s = 0; s < g.steps && s < static_cast<int>(outputs[p].size()); ++s) {
      errors.push_back(
          rel_error(outputs[p][s].logits.data(), g.step_logits[p].f32() + s * vocab, vocab));
      if (outputs[p][s].token != g.greedy[p][s]) break;
      ++c.agree;
    }
  }
  std::sort(errors.begin(), errors.end());
  c.steps = static_cast<int>(errors.size());
  if (!errors.empty()) {
    c.median = errors[errors.size() / 2];
    c.worst = errors.back();
  }
  return c;
}

inline std::ostream& operator<<(std::ostream& os, const Closeness& c) {
  return os << "logits rel err median " << c.median << " worst " << c.worst << " over " << c.steps
            << " steps; greedy tokens " << c.agree << " of " << c.total
            << " before each prompt's first difference";
}

// Expects `outputs` to reproduce `g`: every greedy token, and every step's logits within
// `tolerance` (relative L2) but for at most `max_outliers` steps, which stay within
// `outlier_tolerance` (an fp8 model's rounding flips; tests/unit/test_fp8_weights.cpp says why).
inline void expect_reproduces(const std::vector<std::vector<StepOutput>>& outputs, const Golden& g,
                              int64_t vocab, double tolerance, int max_outliers = 0,
                              double outlier_tolerance = 0) {
  ASSERT_EQ(outputs.size(), g.prompts.size());
  int outliers = 0;
  for (size_t p = 0; p < outputs.size(); ++p) {
    ASSERT_EQ(static_cast<int>(outputs[p].size()), g.steps) << "prompt " << p;
    for (int s = 0; s < g.steps; ++s) {
      EXPECT_EQ(outputs[p][s].token, g.greedy[p][s]) << "prompt " << p << " step " << s;
      const double err =
          rel_error(outputs[p][s].logits.data(), g.step_logits[p].f32() + s * vocab, vocab);
      if (err < tolerance) continue;
      ++outliers;
      EXPECT_LT(err, std::max(tolerance, outlier_tolerance)) << "prompt " << p << " step " << s;
    }
  }
  EXPECT_LE(outliers, max_outliers) << "steps beyond " << tolerance;
}

// One CPU model's run of the golden prompts: golden model `name` loaded with `options`, the
// prompts of `g` run in `pattern` on an engine of its own. Expects every prompt to run g.steps
// steps and every page to be free again afterwards.
struct CpuGoldenRun {
  std::vector<std::vector<StepOutput>> outputs;
  int64_t vocab = 0;
  CacheStorage storage = CacheStorage::kHostF32;  // the engine's cache's
};

inline CpuGoldenRun run_cpu_golden(const std::string& name, const ModelOptions& options,
                                   const Golden& g, Pattern pattern = Pattern::kBatched) {
  auto m = DeepseekModel::load(model_dir(name), options);
  Engine engine(m, pattern_options(pattern));
  CpuGoldenRun run{run_golden(engine, g, pattern), m->config().vocab_size,
                   engine.cache().storage()};
  EXPECT_EQ(run.outputs.size(), g.prompts.size());
  for (const auto& steps : run.outputs) EXPECT_EQ(static_cast<int>(steps.size()), g.steps);
  EXPECT_EQ(engine.cache().pool().num_free(), engine.cache().pool().num_pages()) << "pages leaked";
  return run;
}

// A tensor-parallel group's engines: the leader runs `lead` and then releases the followers
// (however `lead` ends, so a failed check cannot leave them waiting); the followers follow
// the leader's steps until then.
template <typename F>
void lead_or_follow(Engine& engine, F&& lead) {
  if (!engine.is_leader()) {
    engine.follow();
    return;
  }
  struct Shutdown {
    Engine& e;
    ~Shutdown() { e.shutdown(); }
  } shutdown{engine};
  lead();
}

}  // namespace mla::test
