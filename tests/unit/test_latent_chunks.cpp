// Latent chunks (rpc/latent_chunks.h): what a live migration puts on the wire round-trips
// exactly in the cache's own dtype, splits at the byte limit, and refuses damaged data.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "rpc/latent_chunks.h"

namespace mla {
namespace {

constexpr int32_t kLayers = 3;
constexpr int32_t kWidth = 48;

// Latents [layers, n, width] of random values, fp32 or (`bf16`, what a device cache exports)
// bf16.
Tensor random_latents(int32_t n, bool bf16, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  Tensor t = Tensor::empty({kLayers, n, kWidth}, bf16 ? DType::kBF16 : DType::kF32);
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (bf16) {
      t.data<uint16_t>()[i] = f32_to_bf16(dist(rng));
    } else {
      t.data<float>()[i] = dist(rng);
    }
  }
  return t;
}

// The chunks' latents put back together, checking they cover [first, first + n) in order and
// come back in the wire dtype's element type.
Tensor reassemble(const std::vector<mlaserve::v1::LatentChunk>& chunks, int32_t first, int32_t n,
                  const std::string& dtype) {
  Tensor out = Tensor::empty({kLayers, n, kWidth}, latent_dtype(dtype));
  const size_t row = kWidth * dtype_size(out.dtype());
  int32_t next = first;
  for (const auto& chunk : chunks) {
    EXPECT_EQ(chunk.first_token(), next);
    const Tensor part = decode_latent_chunk(chunk, kLayers, kWidth, dtype);
    EXPECT_EQ(part.dtype(), out.dtype());
    for (int32_t l = 0; l < kLayers; ++l) {
      std::memcpy(
          static_cast<char*>(out.raw()) + (static_cast<size_t>(l) * n + next - first) * row,
          static_cast<const char*>(part.raw()) + static_cast<size_t>(l) * chunk.num_tokens() * row,
          chunk.num_tokens() * row);
    }
    next += chunk.num_tokens();
  }
  EXPECT_EQ(next, first + n);
  return out;
}

TEST(LatentChunks, Float32RoundTripsExactlyAcrossChunks) {
  const Tensor latents = random_latents(37, false, 1);
  const size_t token_bytes = latent_token_bytes(kLayers, kWidth, "float32");
  const auto chunks = encode_latent_chunks(latents, 100, "float32", 5 * token_bytes + 3);
  ASSERT_EQ(chunks.size(), 8u);  // 7 chunks of 5 tokens, 1 of 2
  for (const auto& c : chunks) EXPECT_LE(c.data().size(), 5 * token_bytes);
  const Tensor back = reassemble(chunks, 100, 37, "float32");
  EXPECT_EQ(std::memcmp(back.raw(), latents.raw(), latents.nbytes()), 0);
}

TEST(LatentChunks, Bfloat16CarriesADeviceCachesValuesExactlyInHalfTheBytes) {
  const Tensor latents = random_latents(20, true, 2);
  const auto chunks = encode_latent_chunks(latents, 0, "bfloat16", kDefaultChunkBytes);
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].data().size(), 20u * kLayers * kWidth * 2);
  const Tensor back = reassemble(chunks, 0, 20, "bfloat16");
  EXPECT_EQ(std::memcmp(back.raw(), latents.raw(), latents.nbytes()), 0);
}

// An fp8 cache's packed rows travel as bytes: the width counts bytes (kU8 elements).
TEST(LatentChunks, Fp8RowsTravelAsTheirBytes) {
  EXPECT_EQ(latent_dtype("fp8_e4m3"), DType::kU8);
  EXPECT_EQ(latent_token_bytes(kLayers, 656, "fp8_e4m3"), size_t{kLayers} * 656);
  EXPECT_STREQ(latent_wire_dtype(CacheStorage::kHostFp8), "fp8_e4m3");
  EXPECT_STREQ(latent_wire_dtype(CacheStorage::kHostF32), "float32");
  EXPECT_STREQ(latent_wire_dtype(CacheStorage::kDeviceBf16), "bfloat16");
  Tensor rows = Tensor::empty({kLayers, 9, kWidth}, DType::kU8);
  for (int64_t i = 0; i < rows.numel(); ++i) rows.data<uint8_t>()[i] = static_cast<uint8_t>(i * 7);
  const auto chunks = encode_latent_chunks(rows, 5, "fp8_e4m3", 4 * kLayers * kWidth);
  ASSERT_EQ(chunks.size(), 3u);  // 4 + 4 + 1 tokens
  const Tensor back = reassemble(chunks, 5, 9, "fp8_e4m3");
  EXPECT_EQ(std::memcmp(back.raw(), rows.raw(), rows.nbytes()), 0);
  EXPECT_THROW(latent_dtype("fp16"), Error);
}

TEST(LatentChunks, LatentsNotInTheWireDtypeAreRefused) {
  // Nothing is converted on the way: the sender's rows must already be in the wire's type.
  EXPECT_THROW(encode_latent_chunks(random_latents(2, false, 5), 0, "bfloat16", 1 << 20), Error);
  EXPECT_THROW(encode_latent_chunks(random_latents(2, true, 5), 0, "float32", 1 << 20), Error);
}

TEST(LatentChunks, AChunkSmallerThanOneTokenStillCarriesOneTokenEach) {
  const auto chunks = encode_latent_chunks(random_latents(3, false, 3), 7, "float32", 1);
  ASSERT_EQ(chunks.size(), 3u);
  EXPECT_EQ(chunks[2].first_token(), 9);
  EXPECT_TRUE(encode_latent_chunks(Tensor::empty({kLayers, 0, kWidth}), 0, "float32", 64).empty());
}

TEST(LatentChunks, DamagedOrMisshapenDataIsRefused) {
  auto chunks = encode_latent_chunks(random_latents(4, false, 4), 0, "float32", 1 << 20);
  ASSERT_EQ(chunks.size(), 1u);
  auto flipped = chunks[0];
  (*flipped.mutable_data())[17] ^= 0x40;
  try {
    decode_latent_chunk(flipped, kLayers, kWidth, "float32");
    FAIL() << "a flipped bit passed the checksum";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss) << e.what();
  }
  // The same bytes read as another geometry, or a chunk that claims another token count.
  EXPECT_THROW(decode_latent_chunk(chunks[0], kLayers + 1, kWidth, "float32"), Error);
  auto short_count = chunks[0];
  short_count.set_num_tokens(3);
  EXPECT_THROW(decode_latent_chunk(short_count, kLayers, kWidth, "float32"), Error);
  EXPECT_THROW(decode_latent_chunk(chunks[0], kLayers, kWidth, "float16"), Error);
}

}  // namespace
}  // namespace mla
