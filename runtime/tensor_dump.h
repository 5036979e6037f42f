// TensorDump: a sink for a model's named intermediate tensors (fp32, on the host), written to
// a directory as NumPy .npy files, so two backends, or a backend and transformers
// (tests/parity/hf_intermediates.py), can be compared layer by layer with
// tests/parity/compare_intermediates.py.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace mla {

// Which tensors a dump keeps. An empty set keeps everything; `layers` selects per-layer
// tensors only, so model-level ones (layer -1: final_norm, logits) are chosen by name alone.
struct TensorDumpFilter {
  std::set<std::string> names;
  std::set<int64_t> layers;
};

// Writes each kept tensor once, as `L{layer:02}.{name}.npy` (e.g. L03.q_nope.npy) or, for
// layer -1, `{name}.npy`: .npy format 1.0, '<f4', C order. The first add() of a (name, layer)
// wins, so a backend that dumps every forward pass keeps the first one (the prompt's) and
// wants() turns false for the rest. Thread-compatible: one thread at a time.
class TensorDump {
 public:
  // Creates `dir` (and its parents) if needed. Throws kInvalidArgument naming the path if it
  // cannot be created or is not a directory, kFailedPrecondition if it already holds .npy
  // files (a stale dump would be compared as if it were this one), and kInvalidArgument for a
  // filter name outside [a-z0-9_]+ or a filter layer below 0.
  explicit TensorDump(std::string dir, TensorDumpFilter filter = {});

  // Whether add(name, layer, ...) would write: the filter keeps it and it is not written yet.
  // Lets a backend skip the device-to-host copy. Throws as add() for a bad name or layer.
  bool wants(std::string_view name, int64_t layer) const;

  // Writes the row-major tensor of `shape` (product of the dims values at `data`) when
  // wants(name, layer); otherwise does nothing if the filter drops it, and throws
  // kFailedPrecondition if it was written already. Throws kInvalidArgument for a name outside
  // [a-z0-9_]+, a layer below -1 or a negative dimension, kFailedPrecondition naming the file
  // if writing fails.
  void add(std::string_view name, int64_t layer, const float* data,
           const std::vector<int64_t>& shape);

  const std::string& dir() const { return dir_; }
  // The file a tensor is written to, within dir(): `L{layer:02}.{name}.npy`, or `{name}.npy`
  // for layer -1.
  static std::string file_name(std::string_view name, int64_t layer);
  // File names (without the directory) in the order written.
  const std::vector<std::string>& files() const { return files_; }

 private:
  bool kept(std::string_view name, int64_t layer) const;

  std::string dir_;
  TensorDumpFilter filter_;
  std::vector<std::string> files_;
  std::set<std::string> written_;  // files_, for lookup
};

}  // namespace mla
