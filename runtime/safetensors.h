// Reading and writing safetensors files.
//
// Format: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
// {dtype, shape, data_offsets: [begin, end]} (offsets relative to the data region that follows
// the header) plus an optional "__metadata__" string map, then the raw row-major tensor bytes.
//
// SafetensorsFile memory-maps the file read-only, so opening costs one header parse and
// tensors are paged in only when touched: a checkpoint whose shards hold tensors we never
// use (e.g. MTP layers) costs address space, not memory or I/O.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/tensor.h"

namespace mla {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  size_t offset = 0;  // from the start of the file
  size_t nbytes = 0;
};

// An open, validated, memory-mapped safetensors file. Immutable after open(), hence safe to
// read from any number of threads.
class SafetensorsFile : public std::enable_shared_from_this<SafetensorsFile> {
 public:
  // Maps `path` and validates the header and every tensor entry against the file size.
  // Throws mla::Error naming the path (and the tensor, where one is at fault):
  // kNotFound if the file does not exist, kDataLoss if it is truncated or corrupt,
  // kInvalidArgument for an unknown dtype or a path that is not a regular file, and
  // kFailedPrecondition if it cannot be opened or mapped (e.g. permissions). Until the header
  // parses as a JSON object, messages say where the file fails and quote none of its bytes:
  // a "safetensors" file that is really some other file is not echoed into logs.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Tensor names, sorted.
  const std::vector<std::string>& names() const { return names_; }
  // nullptr if the file has no tensor `name`.
  const TensorInfo* find(const std::string& name) const;
  // Zero-copy view of tensor `name` in its stored dtype; it keeps this file mapped for as long
  // as it lives. The bytes are read-only (writing through the view faults) and aligned only as
  // the file lays them out. Throws kNotFound if there is no such tensor.
  Tensor tensor(const std::string& name) const;
  // The "__metadata__" map; values that are not strings are kept as their JSON text.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile(std::string path, const char* base, size_t size);
  void parse_header();

  std::string path_;
  const char* base_;  // the whole file, mapped read-only
  size_t size_;
  std::map<std::string, TensorInfo> tensors_;
  std::vector<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

// Writes host `tensors` (any dtype) to `path` in the given order, with `metadata` as the
// "__metadata__" map. The header is padded with spaces to a multiple of 8 bytes. Writes
// `path`.tmp, syncs it and renames it over `path`, so a crash never leaves a partial file.
// Throws kInvalidArgument for duplicate or reserved names, undefined or device tensors, and
// kFailedPrecondition if the file cannot be written.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace mla
