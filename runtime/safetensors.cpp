#include "runtime/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>

#include "kernels/error.h"

namespace mla {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores the header length little endian");

constexpr size_t kMaxHeaderBytes = size_t{100} << 20;
constexpr const char* kMetadataKey = "__metadata__";

using nlohmann::json;

// Closes a file descriptor on scope exit.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;
  // Closes now and reports failure, which for a written file can mean lost data.
  bool close() {
    const int fd = fd_;
    fd_ = -1;
    return ::close(fd) == 0;
  }

 private:
  int fd_;
};

// Reads an array of non-negative int64 values such as `shape`; nullopt if `v` is anything else.
std::optional<std::vector<int64_t>> non_negative_ints(const json& v) {
  if (!v.is_array()) return std::nullopt;
  std::vector<int64_t> out;
  for (const json& x : v) {
    if (!x.is_number_unsigned() || x.get<uint64_t>() > INT64_MAX) return std::nullopt;
    out.push_back(x.get<int64_t>());
  }
  return out;
}

TensorInfo parse_entry(const std::string& path, const std::string& name, const json& entry,
                       size_t data_begin, size_t data_size) {
  if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
      !entry.contains("data_offsets")) {
    MLA_THROW(kDataLoss, "file {}: tensor {}: entry needs dtype, shape and data_offsets: {}", path,
              name, entry.dump());
  }
  const json& dtype_json = entry["dtype"];
  const std::optional<DType> dtype =
      dtype_json.is_string() ? dtype_from_name(dtype_json.get<std::string>()) : std::nullopt;
  if (!dtype) {
    MLA_THROW(kInvalidArgument, "file {}: tensor {}: unknown dtype {}", path, name,
              dtype_json.dump());
  }

  const auto shape = non_negative_ints(entry["shape"]);
  if (!shape) {
    MLA_THROW(kDataLoss, "file {}: tensor {}: shape {} is not a list of non-negative integers",
              path, name, entry["shape"].dump());
  }
  // Saturating, so that a hostile shape cannot wrap around to a plausible size.
  uint64_t nbytes = dtype_size(*dtype);
  for (uint64_t d : *shape) nbytes = d != 0 && nbytes > UINT64_MAX / d ? UINT64_MAX : nbytes * d;

  const auto offsets = non_negative_ints(entry["data_offsets"]);
  if (!offsets || offsets->size() != 2) {
    MLA_THROW(kDataLoss, "file {}: tensor {}: data_offsets {} is not [begin, end]", path, name,
              entry["data_offsets"].dump());
  }
  const uint64_t begin = (*offsets)[0], end = (*offsets)[1];
  if (begin > end) {
    MLA_THROW(kDataLoss, "file {}: tensor {}: data_offsets [{}, {}] are reversed", path, name,
              begin, end);
  }
  if (end > data_size) {
    MLA_THROW(kDataLoss,
              "file {}: tensor {}: data_offsets [{}, {}] run past the {}-byte data region "
              "(truncated file?)",
              path, name, begin, end, data_size);
  }
  if (end - begin != nbytes) {
    MLA_THROW(kDataLoss,
              "file {}: tensor {}: data_offsets [{}, {}] hold {} bytes, but {} {} needs {}", path,
              name, begin, end, end - begin, dtype_name(*dtype), shape_str(*shape), nbytes);
  }
  return TensorInfo{name, *dtype, *shape, data_begin + begin, end - begin};
}

}  // namespace

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) MLA_THROW(kNotFound, "file {} does not exist", path);
    MLA_THROW(kFailedPrecondition, "cannot open {}: {}", path, std::strerror(errno));
  }
  FdCloser closer(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    MLA_THROW(kFailedPrecondition, "cannot stat {}: {}", path, std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) MLA_THROW(kInvalidArgument, "{} is not a regular file", path);
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    MLA_THROW(kDataLoss, "file {} has {} bytes, too short for a safetensors header", path, size);
  }
  void* base = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (base == MAP_FAILED) {
    MLA_THROW(kFailedPrecondition, "cannot mmap {}: {}", path, std::strerror(errno));
  }
  // The file object owns the mapping from here on, so a failed validation unmaps it.
  std::shared_ptr<SafetensorsFile> file(
      new SafetensorsFile(path, static_cast<const char*>(base), size));
  file->parse_header();
  return file;
}

SafetensorsFile::SafetensorsFile(std::string path, const char* base, size_t size)
    : path_(std::move(path)), base_(base), size_(size) {}

SafetensorsFile::~SafetensorsFile() { ::munmap(const_cast<char*>(base_), size_); }

void SafetensorsFile::parse_header() {
  uint64_t header_len;
  std::memcpy(&header_len, base_, 8);
  // Messages about a file not yet known to be safetensors say where it fails, never what its
  // bytes are: it may be any file (a config, a key) given the wrong name. The length field
  // of a text file is its first 8 characters, so not even that is printed.
  if (header_len > kMaxHeaderBytes) {
    MLA_THROW(kDataLoss,
              "file {} is not a safetensors file: its header length field is above the {}-byte "
              "limit (another format, or corrupt?)",
              path_, kMaxHeaderBytes);
  }
  if (header_len > size_ - 8) {
    MLA_THROW(kDataLoss, "file {}: header length {} exceeds the {} bytes after it (truncated?)",
              path_, header_len, size_ - 8);
  }
  json header;
  try {
    header = json::parse(base_ + 8, base_ + 8 + header_len);
  } catch (const json::parse_error& e) {
    MLA_THROW(kDataLoss,
              "file {} is not a safetensors file: its header is not valid JSON (error at byte {} "
              "of {})",
              path_, e.byte, header_len);
  }
  if (!header.is_object()) {
    MLA_THROW(kDataLoss, "file {}: header is a JSON {}, not an object", path_, header.type_name());
  }

  const size_t data_begin = 8 + header_len;
  const size_t data_size = size_ - data_begin;
  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object()) {
        MLA_THROW(kDataLoss, "file {}: {} is not an object", path_, kMetadataKey);
      }
      for (const auto& [key, value] : entry.items()) {
        metadata_[key] = value.is_string() ? value.get<std::string>() : value.dump();
      }
      continue;
    }
    tensors_.emplace(name, parse_entry(path_, name, entry, data_begin, data_size));
    names_.push_back(name);
  }
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorInfo* info = find(name);
  if (info == nullptr) MLA_THROW(kNotFound, "file {} has no tensor {}", path_, name);
  return Tensor::borrow(std::const_pointer_cast<SafetensorsFile>(shared_from_this()),
                        const_cast<char*>(base_ + info->offset), info->shape, info->dtype);
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    MLA_REQUIRE(name != kMetadataKey, "{}: tensor name {} is reserved", path, name);
    MLA_REQUIRE(!header.contains(name), "{}: duplicate tensor name {}", path, name);
    MLA_REQUIRE(t.defined() && t.device() == Device::kCpu,
                "{}: tensor {} must be a defined host tensor", path, name);
    header[name] = {{"dtype", std::string(dtype_name(t.dtype()))},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {  // names that are not valid UTF-8
    MLA_THROW(kInvalidArgument, "{}: cannot encode header: {}", path, e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t header_len = text.size();

  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) MLA_THROW(kFailedPrecondition, "cannot create {}: {}", tmp, std::strerror(errno));
  FdCloser closer(fd);
  const auto write_all = [fd](const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return false;
      p += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  };
  bool ok = write_all(&header_len, 8) && write_all(text.data(), text.size());
  for (const auto& [name, t] : tensors) ok = ok && write_all(t.raw(), t.nbytes());
  ok = ok && ::fsync(fd) == 0;
  ok = closer.close() && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    MLA_THROW(kFailedPrecondition, "cannot write {}: {}", path, std::strerror(err));
  }
}

}  // namespace mla
