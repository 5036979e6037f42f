// Reads the fp32 .npy files TensorDump writes (format 1.0, '<f4', C order), for tests that
// compare dumps.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "kernels/error.h"

namespace mla::test {

struct NpyF32 {
  std::vector<int64_t> shape;
  std::vector<float> values;
};

inline NpyF32 read_npy_f32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MLA_REQUIRE(in.good(), "cannot open {}", path);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  MLA_REQUIRE(bytes.size() >= 10 && bytes.compare(0, 6, "\x93NUMPY") == 0, "{}: not .npy", path);
  const size_t header_len = static_cast<uint8_t>(bytes[8]) | static_cast<uint8_t>(bytes[9]) << 8;
  const std::string header = bytes.substr(10, header_len);
  MLA_REQUIRE(header.find("'<f4'") != std::string::npos, "{}: not <f4", path);
  NpyF32 npy;
  const size_t open = header.find("'shape': (") + 10, close = header.find(')', open);
  const std::string dims = header.substr(open, close - open);
  for (size_t at = 0; at < dims.size();) {
    const size_t comma = dims.find(',', at);
    const std::string dim = dims.substr(at, comma == std::string::npos ? comma : comma - at);
    if (dim.find_first_not_of(' ') != std::string::npos) npy.shape.push_back(std::stoll(dim));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  const std::string data = bytes.substr(10 + header_len);
  npy.values.resize(data.size() / 4);
  std::memcpy(npy.values.data(), data.data(), npy.values.size() * 4);
  return npy;
}

}  // namespace mla::test
