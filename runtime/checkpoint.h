// Checkpoint: the weights of a Hugging Face model directory, looked up by tensor name.
//
// open() finds the safetensors files (sharded via model.safetensors.index.json, else
// model.safetensors, else every *.safetensors in the directory), maps them and validates their
// headers; tensor bytes are paged in only when loaded, so tensors that are never asked for
// (e.g. the MTP layer of DeepSeek-V3) cost nothing.
//
// load_f32() converts F32/BF16/F16 to fp32, and dequantises F8_E4M3 weights with their
// block scales: a 2-D fp8 tensor `W` comes with `W_scale_inv` (any float dtype) of shape
// [ceil(rows / block[0]), ceil(cols / block[1])], and W[i][j] = fp8(W[i][j]) *
// scale_inv[i / block[0]][j / block[1]]. load_f32_slice() does the same for one shard of a
// tensor (a tensor-parallel rank's rows, columns or experts), reading only that shard's bytes
// from the mapped file, so a rank never pages in or converts the other ranks' parts.
//
// Thread-safety: after open(), load_f32(), load_f32_slice() and load_raw() may be called from
// several threads at once. Configure progress (set_progress, expect_total_bytes) before loading
// starts.
#pragma once

#include <array>
#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/tensor.h"
#include "runtime/safetensors.h"

namespace mla {

class Checkpoint {
 public:
  // Opens the checkpoint in `model_dir`. `fp8_block` is config.json's
  // quantization_config.weight_block_size. Throws
  // - kNotFound naming the directory if it does not exist or holds no weights, or naming the
  //   shard if the index lists a missing one;
  // - kInvalidArgument if `model_dir` is not a directory, or naming the entry if the index
  //   names a file outside the model directory: an absolute path, a `..` component, or a
  //   symlink whose target is outside (the blobs of a Hugging Face hub cache snapshot,
  //   <repo>/snapshots/<revision> -> <repo>/blobs, count as inside);
  // - kDataLoss if the index is malformed (its bytes are not quoted), points a tensor at a
  //   shard without it, or two files hold the same tensor;
  // - anything SafetensorsFile::open throws for a bad file.
  static Checkpoint open(const std::string& model_dir, std::array<int, 2> fp8_block = {128, 128});

  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;
  ~Checkpoint();

  const std::string& dir() const { return dir_; }
  bool has(const std::string& name) const { return tensors_.contains(name); }
  // All tensor names, sorted.
  std::vector<std::string> names() const;
  // Throws kNotFound naming the tensor and the directory if absent.
  const TensorInfo& info(const std::string& name) const;

  // A new fp32 host tensor holding tensor `name`, which must have shape `expected_shape`.
  // Throws kNotFound if the tensor (or the scale of an fp8 tensor) is absent, and
  // kInvalidArgument if its shape, its scale's shape or its dtype does not fit.
  Tensor load_f32(const std::string& name, const Shape& expected_shape);
  // Rows [row_begin, row_end) of dimension 0 (any rank >= 1; for a 3-D tensor [E, a, b] this
  // selects experts) and, for 2-D tensors only, columns [col_begin, col_end) of dimension 1
  // (col_end = -1: through the last column). `full_shape` is the tensor's expected shape in the
  // file, checked as load_f32 does. Returns a new fp32 host tensor of shape
  // [row_end - row_begin, ...rest], with dimension 1 narrowed to col_end - col_begin for a 2-D
  // tensor. Only the selected elements are read and converted; an fp8 tensor uses only the
  // scale blocks that the selected elements fall in. Equal to the same part of load_f32().
  // Throws what load_f32 throws, and kInvalidArgument if a range is empty or reaches outside
  // the tensor (a shard without rows is always a caller's bug), if the tensor is a scalar, or
  // if columns are sliced in a tensor that is not 2-D.
  Tensor load_f32_slice(const std::string& name, const Shape& full_shape, int64_t row_begin,
                        int64_t row_end, int64_t col_begin = 0, int64_t col_end = -1);
  // Whether tensor `name` is stored as fp8 e4m3. Throws kNotFound if absent.
  bool is_fp8(const std::string& name) const;
  // An fp8 tensor's part as stored: its e4m3 bytes [rows, cols] and an fp32 scale per row and
  // fp8_block[1] columns, scale [rows, ceil(cols / fp8_block[1])] (each 128x128 block's scale
  // repeated over its rows), `group` = fp8_block[1]; rows and columns select as in
  // load_f32_slice. Throws what load_f32_slice throws, and kInvalidArgument if the tensor is
  // not 2-D fp8 or if the columns start inside a scale block.
  struct Fp8Slice {
    Tensor values;  // F8E4M3 [rows, cols]
    Tensor scale;   // F32 [rows, ceil(cols / group)]
    int64_t group = 0;
  };
  Fp8Slice load_fp8_slice(const std::string& name, const Shape& full_shape, int64_t row_begin,
                          int64_t row_end, int64_t col_begin = 0, int64_t col_end = -1);
  // Zero-copy, read-only view of tensor `name` in its stored dtype (e.g. I64 tables); keeps
  // the file mapped while it lives. Not counted by the progress display.
  Tensor load_raw(const std::string& name) const;

  // Reports load_f32 and load_f32_slice progress: on a terminal, one status line on stderr
  // redrawn with '\r'; otherwise one log line from finish_progress(). Each load counts the
  // stored bytes it read (a slice: its elements only; fp8 scales are not counted). Default: off.
  void set_progress(bool enabled);
  // The stored bytes the caller will load in total, the 100% mark of the status line.
  // Default: every float tensor in the checkpoint except the `*_scale_inv` companions, which
  // a caller that loads slices (a tensor-parallel rank) must lower to the bytes of its slices.
  void expect_total_bytes(size_t bytes);
  // Ends the status line (or logs the summary) and resets the counters for a next round.
  void finish_progress();

 private:
  struct Entry {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };
  struct Progress;
  struct Block;  // a rectangle of a tensor read as a matrix (see checkpoint.cpp)

  Checkpoint(std::string dir, std::array<int, 2> fp8_block);
  void add_file(const std::string& path);
  void add_index(const std::string& index_path);
  void add_tensor(const std::string& name, const SafetensorsFile* file);
  const Entry& entry(const std::string& name) const;
  const Entry& checked_entry(const std::string& name, const Shape& expected_shape) const;
  static void convert_block(const SafetensorsFile& file, const TensorInfo& info, const Block& block,
                            float* out);
  Tensor load_block(const Entry& e, Shape out_shape, const Block& block);
  std::vector<float> fp8_scales(const Entry& weight, const Block& scale_block) const;
  // The rows and columns load_f32_slice's arguments select (checked), and the result's shape.
  Block slice_block(const Entry& e, int64_t row_begin, int64_t row_end, int64_t col_begin,
                    int64_t col_end, Shape* out_shape) const;

  std::string dir_;
  std::array<int, 2> fp8_block_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry> tensors_;
  std::unique_ptr<Progress> progress_;
};

}  // namespace mla
