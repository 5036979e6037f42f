#include "runtime/tensor_dump.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <filesystem>
#include <fstream>
#include <limits>
#include <system_error>
#include <utility>

#include "kernels/error.h"

namespace mla {
namespace {

namespace fs = std::filesystem;

// '<f4' is the host's float only on little-endian hosts.
static_assert(std::endian::native == std::endian::little, "TensorDump writes host floats as <f4");

void require_name(std::string_view name) {
  const bool ok = !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
  });
  MLA_REQUIRE(ok, "tensor dump name '{}' is not of [a-z0-9_]+", name);
}

void require_layer(int64_t layer) {
  MLA_REQUIRE(layer >= -1, "tensor dump layer {} is below -1 (-1: a model-level tensor)", layer);
}

// The .npy 1.0 preamble: magic, version, header length, then the header dict padded with
// spaces and a final newline so the data starts on a 64-byte boundary, as numpy writes it.
std::string npy_header(const std::vector<int64_t>& shape) {
  std::string dims;  // Python tuples: "2, 3", "5," and ""
  for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) dims += ',';
  std::string dict =
      fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}", dims);
  constexpr size_t kPreamble = 10;  // magic (6), version (2), header length (2)
  const size_t padded = (kPreamble + dict.size() + 1 + 63) / 64 * 64 - kPreamble;
  MLA_REQUIRE(padded <= std::numeric_limits<uint16_t>::max(),
              "tensor dump shape of {} dims does not fit a .npy 1.0 header", shape.size());
  dict.resize(padded - 1, ' ');
  dict += '\n';
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(padded & 0xff);
  out += static_cast<char>(padded >> 8);
  return out + dict;
}

}  // namespace

TensorDump::TensorDump(std::string dir, TensorDumpFilter filter)
    : dir_(std::move(dir)), filter_(std::move(filter)) {
  for (const std::string& name : filter_.names) require_name(name);
  for (int64_t layer : filter_.layers) {
    MLA_REQUIRE(layer >= 0, "tensor dump filter layer {} is negative", layer);
  }
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec || !fs::is_directory(dir_)) {
    MLA_THROW(kInvalidArgument, "cannot create tensor dump directory {}: {}", dir_,
              ec ? ec.message() : "a file is in the way");
  }
  int64_t stale = 0;
  for (const fs::directory_entry& e : fs::directory_iterator(dir_, ec)) {
    stale += e.path().extension() == ".npy";
  }
  if (ec)
    MLA_THROW(kInvalidArgument, "cannot list tensor dump directory {}: {}", dir_, ec.message());
  if (stale > 0) {
    MLA_THROW(kFailedPrecondition,
              "tensor dump directory {} already holds {} .npy files; remove them or pick an empty "
              "directory",
              dir_, stale);
  }
}

bool TensorDump::kept(std::string_view name, int64_t layer) const {
  require_name(name);
  require_layer(layer);
  if (!filter_.names.empty() && !filter_.names.contains(std::string(name))) return false;
  return layer < 0 || filter_.layers.empty() || filter_.layers.contains(layer);
}

bool TensorDump::wants(std::string_view name, int64_t layer) const {
  return kept(name, layer) && !written_.contains(file_name(name, layer));
}

void TensorDump::add(std::string_view name, int64_t layer, const float* data,
                     const std::vector<int64_t>& shape) {
  if (!kept(name, layer)) return;
  std::string file = file_name(name, layer);
  if (written_.contains(file)) {
    MLA_THROW(kFailedPrecondition, "tensor dump {}/{} is written already", dir_, file);
  }
  int64_t count = 1;
  for (int64_t d : shape) {
    MLA_REQUIRE(d >= 0, "tensor dump {}: dimension {} is negative", file, d);
    MLA_REQUIRE(d == 0 || count <= std::numeric_limits<int64_t>::max() / 4 / d,
                "tensor dump {}: shape too large", file);
    count *= d;
  }
  MLA_REQUIRE(data != nullptr || count == 0, "tensor dump {}: no data", file);

  const std::string path = (fs::path(dir_) / file).string();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const std::string header = npy_header(shape);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  if (count > 0) {
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * 4));
  }
  out.close();
  if (!out) MLA_THROW(kFailedPrecondition, "cannot write tensor dump file {}", path);
  written_.insert(file);
  files_.push_back(std::move(file));
}

std::string TensorDump::file_name(std::string_view name, int64_t layer) {
  return layer < 0 ? fmt::format("{}.npy", name) : fmt::format("L{:02}.{}.npy", layer, name);
}

}  // namespace mla
