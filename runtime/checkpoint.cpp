#include "runtime/checkpoint.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string_view>
#include <vector>

#include "kernels/error.h"
#include "runtime/paths.h"

namespace mla {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleFileName = "model.safetensors";
constexpr std::string_view kScaleSuffix = "_scale_inv";

bool is_float(DType t) {
  return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16 || t == DType::kF8E4M3;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Every tensor is read as the matrix [shape[0], product of the other dimensions] (a scalar as
// [1, 1]): a row is then one expert of a 3-D tensor, or one element of a 1-D one.
int64_t matrix_rows(const Shape& shape) { return shape.empty() ? 1 : shape[0]; }
int64_t matrix_cols(const Shape& shape) {
  int64_t cols = 1;
  for (size_t d = 1; d < shape.size(); ++d) cols *= shape[d];
  return cols;
}

// Whether canonical `path` lies inside canonical directory `root`.
bool is_within(const fs::path& path, const fs::path& root) {
  const auto [r, p] = std::mismatch(root.begin(), root.end(), path.begin(), path.end());
  return r == root.end();
}

// The directories the files of an index may resolve into (canonical): the model directory,
// and for a snapshot in the Hugging Face hub cache, <repo>/snapshots/<revision>, whose files
// are symlinks to <repo>/blobs/<hash>, that repository's blobs as well.
std::vector<fs::path> shard_roots(const fs::path& dir) {
  std::error_code ec;
  std::vector<fs::path> roots = {fs::canonical(dir, ec)};
  if (ec) MLA_THROW(kFailedPrecondition, "cannot resolve {}: {}", dir.string(), ec.message());
  const fs::path snapshots = roots[0].parent_path();
  if (snapshots.filename() == "snapshots" &&
      fs::is_directory(snapshots.parent_path() / "blobs", ec)) {
    roots.push_back(snapshots.parent_path() / "blobs");
  }
  return roots;
}

}  // namespace

// Rows [row_begin, row_end) and columns [col_begin, col_end) of a tensor read as its matrix.
struct Checkpoint::Block {
  int64_t row_begin, row_end, col_begin, col_end;

  int64_t rows() const { return row_end - row_begin; }
  int64_t cols() const { return col_end - col_begin; }
};

// Converts `block` of tensor `info` to fp32 into `out` ([block.rows(), block.cols()],
// row-major), touching only the block's bytes in the mapped file.
void Checkpoint::convert_block(const SafetensorsFile& file, const TensorInfo& info,
                               const Block& block, float* out) {
  if (!is_float(info.dtype)) {
    MLA_THROW(kInvalidArgument, "file {}: tensor {} is {}, not a float type", file.path(),
              info.name, dtype_name(info.dtype));
  }
  const char* base = static_cast<const char*>(file.tensor(info.name).raw());
  const size_t elem = dtype_size(info.dtype);
  const int64_t cols = matrix_cols(info.shape);
  if (block.cols() == cols) {  // whole rows are one contiguous run
    convert_to_f32(info.dtype, base + block.row_begin * cols * elem, block.rows() * cols, out);
    return;
  }
  for (int64_t i = block.row_begin; i < block.row_end; ++i) {
    convert_to_f32(info.dtype, base + (i * cols + block.col_begin) * elem, block.cols(), out);
    out += block.cols();
  }
}

// Counters behind the status line; shared by concurrent loads.
struct Checkpoint::Progress {
  std::mutex mu;
  bool enabled = false;
  bool tty = false;
  size_t total_bytes = 0;
  size_t loaded_bytes = 0;
  size_t loaded_tensors = 0;
  Clock::time_point start;
  Clock::time_point last_draw;

  void add(size_t nbytes) {
    std::lock_guard lock(mu);
    if (!enabled) return;
    const Clock::time_point now = Clock::now();
    if (loaded_tensors == 0) start = now;
    loaded_bytes += nbytes;
    ++loaded_tensors;
    // Redrawing for each of thousands of small tensors would flood a slow terminal.
    if (tty && now - last_draw >= std::chrono::milliseconds(100)) {
      draw();
      last_draw = now;
    }
  }

  void draw() const {
    const size_t total = std::max(total_bytes, loaded_bytes);
    const bool gb = total >= size_t{10'000'000'000};
    const double unit = gb ? 1e9 : 1e6;
    const int percent = total == 0 ? 100 : static_cast<int>(100.0 * loaded_bytes / total);
    fmt::print(stderr, "\rloading weights {:3d}% ({:.1f}/{:.1f} {}, {} tensors)", percent,
               loaded_bytes / unit, total / unit, gb ? "GB" : "MB", loaded_tensors);
  }

  void finish() {
    std::lock_guard lock(mu);
    if (!enabled || loaded_tensors == 0) return;
    if (tty) {
      draw();
      std::fputc('\n', stderr);
    } else {
      const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
      spdlog::info("loaded {} tensors, {:.1f} MB in {:.1f} s", loaded_tensors, loaded_bytes / 1e6,
                   seconds);
    }
    loaded_bytes = 0;
    loaded_tensors = 0;
    last_draw = {};
  }
};

Checkpoint::Checkpoint(std::string dir, std::array<int, 2> fp8_block)
    : dir_(std::move(dir)), fp8_block_(fp8_block), progress_(std::make_unique<Progress>()) {}

Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;
Checkpoint& Checkpoint::operator=(Checkpoint&&) noexcept = default;
Checkpoint::~Checkpoint() = default;

Checkpoint Checkpoint::open(const std::string& model_dir, std::array<int, 2> fp8_block) {
  MLA_REQUIRE(fp8_block[0] > 0 && fp8_block[1] > 0, "fp8 block size [{}, {}] must be positive",
              fp8_block[0], fp8_block[1]);
  const fs::path dir(model_dir);
  require_directory(model_dir, "model directory");
  std::error_code ec;
  Checkpoint ckpt(model_dir, fp8_block);
  if (fs::exists(dir / kIndexName, ec)) {
    ckpt.add_index((dir / kIndexName).string());
  } else if (fs::exists(dir / kSingleFileName, ec)) {
    ckpt.add_file((dir / kSingleFileName).string());
  } else {
    std::vector<std::string> paths;
    for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
      if (e.path().extension() == ".safetensors") paths.push_back(e.path().string());
    }
    if (paths.empty()) {
      MLA_THROW(kNotFound, "model directory {} has no {}, {} or other *.safetensors file",
                model_dir, kIndexName, kSingleFileName);
    }
    std::ranges::sort(paths);
    for (const std::string& path : paths) ckpt.add_file(path);
  }
  for (const auto& [name, e] : ckpt.tensors_) {
    if (is_float(e.info->dtype) && !name.ends_with(kScaleSuffix)) {
      ckpt.progress_->total_bytes += e.info->nbytes;
    }
  }
  return ckpt;
}

void Checkpoint::add_tensor(const std::string& name, const SafetensorsFile* file) {
  const auto [it, inserted] = tensors_.emplace(name, Entry{file, file->find(name)});
  if (!inserted) {
    MLA_THROW(kDataLoss, "checkpoint {}: tensor {} is in both {} and {}", dir_, name,
              it->second.file->path(), file->path());
  }
}

void Checkpoint::add_file(const std::string& path) {
  files_.push_back(SafetensorsFile::open(path));
  for (const std::string& name : files_.back()->names()) add_tensor(name, files_.back().get());
}

void Checkpoint::add_index(const std::string& index_path) {
  json index;
  try {
    std::ifstream in(index_path);
    index = json::parse(in);
  } catch (const json::parse_error& e) {
    // The parser's message quotes the bytes it stopped at, and the file may not be JSON at all.
    MLA_THROW(kDataLoss, "{} is not valid JSON (error at byte {})", index_path, e.byte);
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    MLA_THROW(kDataLoss, "{} has no \"weight_map\" object", index_path);
  }
  const std::vector<fs::path> roots = shard_roots(dir_);
  std::map<std::string, const SafetensorsFile*> shards;
  for (const auto& [name, shard_json] : index["weight_map"].items()) {
    if (!shard_json.is_string()) {
      MLA_THROW(kDataLoss, "{}: weight_map entry for {} is not a file name", index_path, name);
    }
    const std::string shard = shard_json.get<std::string>();
    const SafetensorsFile*& file = shards[shard];
    if (file == nullptr) {
      // An index names files, and the model directory is what the user vouched for: an entry
      // must not reach outside it, by its name or by a symlink.
      const fs::path relative(shard);
      if (shard.empty() || relative.is_absolute() ||
          std::ranges::any_of(relative, [](const fs::path& part) { return part == ".."; })) {
        MLA_THROW(kInvalidArgument,
                  "{}: weight_map entry \"{}\" (tensor {}) is not a file name inside the model "
                  "directory",
                  index_path, shard, name);
      }
      const fs::path shard_path = fs::path(dir_) / relative;
      std::error_code ec;
      if (!fs::exists(shard_path, ec)) {
        MLA_THROW(kNotFound, "shard {} listed in {} does not exist", shard_path.string(),
                  index_path);
      }
      const fs::path target = fs::canonical(shard_path, ec);
      if (ec)
        MLA_THROW(kFailedPrecondition, "cannot resolve {}: {}", shard_path.string(), ec.message());
      if (std::ranges::none_of(roots, [&](const fs::path& r) { return is_within(target, r); })) {
        MLA_THROW(kInvalidArgument,
                  "{}: weight_map entry \"{}\" (tensor {}) resolves through a symlink to {}, "
                  "outside the model directory",
                  index_path, shard, name, target.string());
      }
      files_.push_back(SafetensorsFile::open(shard_path.string()));
      file = files_.back().get();
    }
    if (file->find(name) == nullptr) {
      MLA_THROW(kDataLoss, "{} places tensor {} in {}, which does not hold it", index_path, name,
                file->path());
    }
    add_tensor(name, file);
  }
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& [name, e] : tensors_) out.push_back(name);
  return out;
}

const Checkpoint::Entry& Checkpoint::entry(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    MLA_THROW(kNotFound, "tensor {} not found in checkpoint {}", name, dir_);
  }
  return it->second;
}

const TensorInfo& Checkpoint::info(const std::string& name) const { return *entry(name).info; }

const Checkpoint::Entry& Checkpoint::checked_entry(const std::string& name,
                                                   const Shape& expected_shape) const {
  const Entry& e = entry(name);
  if (e.info->shape != expected_shape) {
    MLA_THROW(kInvalidArgument, "file {}: tensor {} has shape {}, expected {}", e.file->path(),
              name, shape_str(e.info->shape), shape_str(expected_shape));
  }
  return e;
}

Tensor Checkpoint::load_f32(const std::string& name, const Shape& expected_shape) {
  const Entry& e = checked_entry(name, expected_shape);
  const Shape& shape = e.info->shape;
  return load_block(e, shape, {0, matrix_rows(shape), 0, matrix_cols(shape)});
}

Tensor Checkpoint::load_f32_slice(const std::string& name, const Shape& full_shape,
                                  int64_t row_begin, int64_t row_end, int64_t col_begin,
                                  int64_t col_end) {
  const Entry& e = checked_entry(name, full_shape);
  Shape out_shape;
  const Block block = slice_block(e, row_begin, row_end, col_begin, col_end, &out_shape);
  return load_block(e, std::move(out_shape), block);
}

bool Checkpoint::is_fp8(const std::string& name) const {
  return entry(name).info->dtype == DType::kF8E4M3;
}

Checkpoint::Fp8Slice Checkpoint::load_fp8_slice(const std::string& name, const Shape& full_shape,
                                                int64_t row_begin, int64_t row_end,
                                                int64_t col_begin, int64_t col_end) {
  const Entry& e = checked_entry(name, full_shape);
  if (e.info->dtype != DType::kF8E4M3 || e.info->shape.size() != 2) {
    MLA_THROW(kInvalidArgument, "file {}: tensor {} is {} {}, not a 2-D fp8 tensor", e.file->path(),
              name, dtype_name(e.info->dtype), shape_str(e.info->shape));
  }
  Shape out_shape;
  const Block block = slice_block(e, row_begin, row_end, col_begin, col_end, &out_shape);
  const int64_t block_rows = fp8_block_[0], block_cols = fp8_block_[1];
  if (block.col_begin % block_cols != 0) {
    MLA_THROW(kInvalidArgument,
              "file {}: columns of fp8 tensor {} sliced from {}, inside a block of {} columns",
              e.file->path(), name, block.col_begin, block_cols);
  }
  const Block scale_block{block.row_begin / block_rows, ceil_div(block.row_end, block_rows),
                          block.col_begin / block_cols, ceil_div(block.col_end, block_cols)};
  const std::vector<float> scale = fp8_scales(e, scale_block);

  Fp8Slice out{Tensor::empty(out_shape, DType::kF8E4M3),
               Tensor::empty({block.rows(), scale_block.cols()}), block_cols};
  const Tensor stored = e.file->tensor(name);
  const int64_t stride = e.info->shape[1];
  for (int64_t i = 0; i < block.rows(); ++i) {
    std::memcpy(out.values.data<uint8_t>() + i * block.cols(),
                stored.data<uint8_t>() + (block.row_begin + i) * stride + block.col_begin,
                block.cols());
    const int64_t scale_row = (block.row_begin + i) / block_rows - scale_block.row_begin;
    std::memcpy(out.scale.f32() + i * scale_block.cols(), &scale[scale_row * scale_block.cols()],
                scale_block.cols() * sizeof(float));
  }
  progress_->add(static_cast<size_t>(block.rows() * block.cols()));
  return out;
}

Checkpoint::Block Checkpoint::slice_block(const Entry& e, int64_t row_begin, int64_t row_end,
                                          int64_t col_begin, int64_t col_end,
                                          Shape* out_shape) const {
  const Shape& shape = e.info->shape;
  const std::string& name = e.info->name;
  if (shape.empty()) {
    MLA_THROW(kInvalidArgument, "file {}: tensor {} is a scalar and has no rows to slice",
              e.file->path(), name);
  }
  if (!(0 <= row_begin && row_begin < row_end && row_end <= shape[0])) {
    MLA_THROW(kInvalidArgument,
              "file {}: rows [{}, {}) of tensor {} {} are empty or outside its {} rows",
              e.file->path(), row_begin, row_end, name, shape_str(shape), shape[0]);
  }
  const bool all_cols = col_begin == 0 && col_end == -1;
  if (shape.size() != 2 && !all_cols) {
    MLA_THROW(kInvalidArgument,
              "file {}: columns [{}, {}) of tensor {} {}: only 2-D tensors have columns to slice",
              e.file->path(), col_begin, col_end, name, shape_str(shape));
  }
  Block block{row_begin, row_end, 0, matrix_cols(shape)};
  *out_shape = shape;
  (*out_shape)[0] = block.rows();
  if (!all_cols) {
    const int64_t end = col_end == -1 ? shape[1] : col_end;
    if (!(0 <= col_begin && col_begin < end && end <= shape[1])) {
      MLA_THROW(kInvalidArgument,
                "file {}: columns [{}, {}) of tensor {} {} are empty or outside its {} columns",
                e.file->path(), col_begin, col_end, name, shape_str(shape), shape[1]);
    }
    block.col_begin = col_begin;
    block.col_end = end;
    (*out_shape)[1] = block.cols();
  }
  return block;
}

Tensor Checkpoint::load_block(const Entry& e, Shape out_shape, const Block& block) {
  const bool fp8 = e.info->dtype == DType::kF8E4M3;
  // Scale block b covers weight rows [b * block_rows, (b + 1) * block_rows), likewise columns.
  const int64_t block_rows = fp8_block_[0], block_cols = fp8_block_[1];
  const Block scale_block{block.row_begin / block_rows, ceil_div(block.row_end, block_rows),
                          block.col_begin / block_cols, ceil_div(block.col_end, block_cols)};
  const std::vector<float> scale = fp8 ? fp8_scales(e, scale_block) : std::vector<float>{};

  Tensor out = Tensor::empty(std::move(out_shape));
  convert_block(*e.file, *e.info, block, out.f32());
  if (fp8) {
    for (int64_t i = 0; i < block.rows(); ++i) {
      float* row = out.f32() + i * block.cols();
      const float* row_scale =
          scale.data() +
          ((block.row_begin + i) / block_rows - scale_block.row_begin) * scale_block.cols();
      for (int64_t b = scale_block.col_begin; b < scale_block.col_end; ++b) {
        const int64_t begin = std::max(block.col_begin, b * block_cols) - block.col_begin;
        const int64_t end = std::min(block.col_end, (b + 1) * block_cols) - block.col_begin;
        for (int64_t j = begin; j < end; ++j) row[j] *= row_scale[b - scale_block.col_begin];
      }
    }
  }
  progress_->add(static_cast<size_t>(block.rows() * block.cols()) * dtype_size(e.info->dtype));
  return out;
}

std::vector<float> Checkpoint::fp8_scales(const Entry& weight, const Block& scale_block) const {
  const TensorInfo& w = *weight.info;
  if (w.shape.size() != 2) {
    MLA_THROW(kInvalidArgument, "file {}: fp8 tensor {} has shape {}; only 2-D fp8 is supported",
              weight.file->path(), w.name, shape_str(w.shape));
  }
  const std::string scale_name = w.name + std::string(kScaleSuffix);
  const auto it = tensors_.find(scale_name);
  if (it == tensors_.end()) {
    MLA_THROW(kNotFound, "file {}: fp8 tensor {} has no scale tensor {} in checkpoint {}",
              weight.file->path(), w.name, scale_name, dir_);
  }
  const int64_t block_rows = fp8_block_[0], block_cols = fp8_block_[1];
  const Shape scale_shape = {ceil_div(w.shape[0], block_rows), ceil_div(w.shape[1], block_cols)};
  const Entry& s = it->second;
  if (s.info->shape != scale_shape) {
    MLA_THROW(kInvalidArgument,
              "file {}: tensor {} has shape {}, expected {} for fp8 tensor {} {} in blocks of "
              "[{}, {}]",
              s.file->path(), scale_name, shape_str(s.info->shape), shape_str(scale_shape), w.name,
              shape_str(w.shape), block_rows, block_cols);
  }
  std::vector<float> scale(scale_block.rows() * scale_block.cols());
  convert_block(*s.file, *s.info, scale_block, scale.data());
  return scale;
}

Tensor Checkpoint::load_raw(const std::string& name) const {
  return entry(name).file->tensor(name);
}

void Checkpoint::set_progress(bool enabled) {
  std::lock_guard lock(progress_->mu);
  progress_->enabled = enabled;
  progress_->tty = enabled && ::isatty(2);
}

void Checkpoint::expect_total_bytes(size_t bytes) {
  std::lock_guard lock(progress_->mu);
  progress_->total_bytes = bytes;
}

void Checkpoint::finish_progress() { progress_->finish(); }

}  // namespace mla
