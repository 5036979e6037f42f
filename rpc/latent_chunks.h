// Latent chunks: how a request's cache latents travel between workers in a live migration
// (Worker.Export, mlaserve.proto's LatentChunk). A chunk holds the latents of a run of tokens
// for every layer, [num_layers, num_tokens, width], in the cache's own element type (float32
// on the CPU backend, bfloat16 on GPUs, the packed fp8 row's bytes with cache.dtype fp8: what
// the source stores, so nothing is rounded), with a CRC-32 of its bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/tensor.h"
#include "mlaserve/v1/mlaserve.pb.h"
#include "runtime/latent_cache.h"

namespace mla {

// Default and largest ExportRequest.max_chunk_bytes.
inline constexpr int32_t kDefaultChunkBytes = 1 << 20;
inline constexpr int32_t kMaxChunkBytes = 4 << 20;

// The wire size of one token's latents (all layers) in `dtype` ("float32", "bfloat16" or
// "fp8_e4m3", whose width counts bytes); throws kInvalidArgument for another dtype.
size_t latent_token_bytes(int32_t num_layers, int32_t width, const std::string& dtype);
// The element type a wire dtype names (kF32, kBF16, or kU8 for fp8_e4m3's packed rows); throws
// kInvalidArgument for another.
DType latent_dtype(const std::string& dtype);
// The wire dtype of a cache's rows (ModelInfo.dtype): float32, bfloat16 or fp8_e4m3.
const char* latent_wire_dtype(CacheStorage storage);

// Splits host latents [num_layers, n, width] of tokens [first, first + n) (as
// LatentCache::export_range returns them, in the element type `dtype` names; anything else is
// kInvalidArgument) into chunks of at most `max_bytes` of data (at least one token each). No
// chunk for n = 0. The bytes are copied as they are: nothing is converted.
std::vector<mlaserve::v1::LatentChunk> encode_latent_chunks(const Tensor& latents, int32_t first,
                                                            const std::string& dtype,
                                                            size_t max_bytes);

// The chunk's latents as host [num_layers, num_tokens, width] in the element type `dtype`
// names. Throws kDataLoss when the checksum does not match and kInvalidArgument when the data
// is not num_tokens tokens of that geometry.
Tensor decode_latent_chunk(const mlaserve::v1::LatentChunk& chunk, int32_t num_layers,
                           int32_t width, const std::string& dtype);

}  // namespace mla
