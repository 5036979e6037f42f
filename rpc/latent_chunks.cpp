#include "rpc/latent_chunks.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>

#include "kernels/dtype.h"
#include "kernels/error.h"

namespace mla {

DType latent_dtype(const std::string& dtype) {
  if (dtype == "float32") return DType::kF32;
  if (dtype == "bfloat16") return DType::kBF16;
  if (dtype == "fp8_e4m3") return DType::kU8;
  MLA_THROW(kInvalidArgument, "latent dtype '{}': expected float32, bfloat16 or fp8_e4m3", dtype);
}

const char* latent_wire_dtype(CacheStorage storage) {
  switch (storage) {
    case CacheStorage::kDeviceBf16:
      return "bfloat16";
    case CacheStorage::kHostFp8:
    case CacheStorage::kDeviceFp8:
      return "fp8_e4m3";
    default:
      return "float32";
  }
}

namespace {

uint32_t crc32_of(const std::string& bytes) {
  uLong crc = crc32(0L, Z_NULL, 0);
  // zlib takes uInt lengths; chunks are at most kMaxChunkBytes.
  crc = crc32(crc, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(bytes.size()));
  return static_cast<uint32_t>(crc);
}

}  // namespace

size_t latent_token_bytes(int32_t num_layers, int32_t width, const std::string& dtype) {
  return static_cast<size_t>(num_layers) * static_cast<size_t>(width) *
         dtype_size(latent_dtype(dtype));
}

std::vector<mlaserve::v1::LatentChunk> encode_latent_chunks(const Tensor& latents, int32_t first,
                                                            const std::string& dtype,
                                                            size_t max_bytes) {
  MLA_REQUIRE(latents.ndim() == 3 && latents.dtype() == latent_dtype(dtype),
              "latents to send as {} must be {} [layers, tokens, width], got {} {}", dtype,
              dtype_name(latent_dtype(dtype)), dtype_name(latents.dtype()),
              shape_str(latents.shape()));
  const auto layers = static_cast<int32_t>(latents.dim(0));
  const auto n = static_cast<int32_t>(latents.dim(1));
  const auto width = static_cast<int32_t>(latents.dim(2));
  const size_t token_bytes = latent_token_bytes(layers, width, dtype);
  const size_t row_bytes = token_bytes / layers;  // one token's values in one layer
  const auto per_chunk = static_cast<int32_t>(std::max<size_t>(1, max_bytes / token_bytes));
  const auto* src = static_cast<const char*>(latents.raw());
  std::vector<mlaserve::v1::LatentChunk> chunks;
  for (int32_t t0 = 0; t0 < n; t0 += per_chunk) {
    const int32_t count = std::min(per_chunk, n - t0);
    mlaserve::v1::LatentChunk chunk;
    chunk.set_first_token(first + t0);
    chunk.set_num_tokens(count);
    std::string& data = *chunk.mutable_data();
    data.resize(token_bytes * count);
    for (int32_t l = 0; l < layers; ++l) {
      std::memcpy(data.data() + l * count * row_bytes,
                  src + (static_cast<size_t>(l) * n + t0) * row_bytes, count * row_bytes);
    }
    chunk.set_crc32(crc32_of(data));
    chunks.push_back(std::move(chunk));
  }
  return chunks;
}

Tensor decode_latent_chunk(const mlaserve::v1::LatentChunk& chunk, int32_t num_layers,
                           int32_t width, const std::string& dtype) {
  const int32_t n = chunk.num_tokens();
  MLA_REQUIRE(n >= 1 && chunk.first_token() >= 0,
              "latent chunk: tokens [{}, +{}) is not a run of tokens", chunk.first_token(), n);
  const size_t token_bytes = latent_token_bytes(num_layers, width, dtype);
  MLA_REQUIRE(
      chunk.data().size() == token_bytes * n,
      "latent chunk of {} tokens: {} bytes of data, expected {} ({} layers x {} values, {})", n,
      chunk.data().size(), token_bytes * n, num_layers, width, dtype);
  if (crc32_of(chunk.data()) != chunk.crc32()) {
    MLA_THROW(kDataLoss, "latent chunk of tokens [{}, {}): checksum mismatch", chunk.first_token(),
              chunk.first_token() + n);
  }
  Tensor out = Tensor::empty({num_layers, n, width}, latent_dtype(dtype));
  std::memcpy(out.raw(), chunk.data().data(), chunk.data().size());
  return out;
}

}  // namespace mla
