// Runs one prompt through a model as one prefill chunk with a TensorDump attached: the named
// intermediates both backends write (tests/parity/README.md lists them).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "runtime/model.h"
#include "runtime/model_runner.h"
#include "runtime/tensor_dump.h"
#include "tests/support/npy.h"

namespace mla::test {

// The per-layer names of a dump; q_absorbed only where every sequence ran the latent form.
inline const std::vector<std::string>& dump_layer_names() {
  static const std::vector<std::string> names = {"attn_norm", "q_nope",   "q_rope",   "q_absorbed",
                                                 "latent",    "k_rope",   "attn_out", "ffn_norm",
                                                 "ffn_out",   "layer_out"};
  return names;
}

// Dumps `prompt` through `model` into a fresh `dir` (removed first) and returns dir.
inline std::string dump_prompt(const Model& model, const std::vector<int32_t>& prompt,
                               const std::string& dir) {
  std::filesystem::remove_all(dir);
  const auto n = static_cast<int32_t>(prompt.size());
  LatentCache cache(model.cache_geometry(4), (n + 3) / 4, model.shard(), model.cache_storage());
  BlockTable table;
  MLA_CHECK(cache.reserve(table, n), "no pages for the prompt");
  TensorDump dump(dir);
  const auto runner = model.make_runner(cache);
  runner->set_dump(&dump);
  runner->forward({prompt, {{&table, 0, n, true}}});
  return dir;
}

inline std::string dump_file(const std::string& dir, const std::string& name, int64_t layer) {
  return dir + "/" + TensorDump::file_name(name, layer);
}

}  // namespace mla::test
