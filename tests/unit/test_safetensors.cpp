#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "kernels/tensor.h"
#include "runtime/safetensors.h"

namespace mla {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr DType kAllDTypes[] = {DType::kF32, DType::kBF16, DType::kF16, DType::kF8E4M3,
                                DType::kI64, DType::kI32,  DType::kU8};

// The mla::Error that `f` throws; a test failure if it throws none.
template <typename F>
Error error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "expected an mla::Error";
  return Error(ErrorCode::kInternal, "nothing thrown");
}

// ---------------------------------------------------------------------------------------------
// DType conversions

// e4m3fn from its definition: bias 7, subnormals below exponent 1, S.1111.111 is NaN.
float fp8_reference(int code) {
  const int sign = code >> 7, exp = (code >> 3) & 0xf, mant = code & 7;
  if (exp == 0xf && mant == 7) return NAN;
  const double magnitude =
      exp == 0 ? mant / 8.0 * std::pow(2.0, -6) : (1.0 + mant / 8.0) * std::pow(2.0, exp - 7);
  return static_cast<float>(sign ? -magnitude : magnitude);
}

TEST(DTypeConversion, Fp8E4M3DecodesEveryCode) {
  EXPECT_EQ(fp8e4m3_to_f32(0x00), 0.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0x40), 2.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0xb8), -1.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0xfe), -448.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(fp8e4m3_to_f32(0x07), 7 * std::ldexp(1.0f, -9));
  EXPECT_EQ(fp8e4m3_to_f32(0x08), std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::signbit(fp8e4m3_to_f32(0x80)));
  EXPECT_TRUE(std::isnan(fp8e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(fp8e4m3_to_f32(0xff)));
  for (int code = 0; code < 256; ++code) {
    const float want = fp8_reference(code), got = fp8e4m3_to_f32(static_cast<uint8_t>(code));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "code " << code;
    } else {
      EXPECT_EQ(got, want) << "code " << code;
    }
  }
}

TEST(DTypeConversion, Fp8E4M3RoundTripsAndRoundsToNearestEven) {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) continue;
    EXPECT_EQ(f32_to_fp8e4m3(fp8e4m3_to_f32(static_cast<uint8_t>(code))), code) << code;
  }
  EXPECT_EQ(f32_to_fp8e4m3(1.0625f), 0x38);  // halfway 1.0 | 1.125: to even
  EXPECT_EQ(f32_to_fp8e4m3(1.1875f), 0x3a);  // halfway 1.125 | 1.25: to even
  EXPECT_EQ(f32_to_fp8e4m3(1.07f), 0x39);
  EXPECT_EQ(f32_to_fp8e4m3(std::ldexp(1.0f, -10)), 0x00);      // half the smallest subnormal
  EXPECT_EQ(f32_to_fp8e4m3(3 * std::ldexp(1.0f, -10)), 0x02);  // 1.5 subnormal units
  EXPECT_EQ(f32_to_fp8e4m3(500.0f), 0x7e);                     // saturates
  EXPECT_EQ(f32_to_fp8e4m3(-1e9f), 0xfe);
  EXPECT_TRUE(std::isnan(fp8e4m3_to_f32(f32_to_fp8e4m3(NAN))));
}

TEST(DTypeConversion, Bf16RoundsToNearestEven) {
  const float one = 1.0f, ulp = std::ldexp(1.0f, -7);
  EXPECT_EQ(f32_to_bf16(one), 0x3f80);
  EXPECT_EQ(f32_to_bf16(one + ulp / 2), 0x3f80);                          // tie: to even
  EXPECT_EQ(f32_to_bf16(one + 3 * ulp / 2), 0x3f82);                      // tie: to even
  EXPECT_EQ(f32_to_bf16(one + ulp / 2 + std::ldexp(1.0f, -20)), 0x3f81);  // above the tie
  EXPECT_EQ(f32_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_bf16(INFINITY), 0x7f80);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  for (uint32_t code = 0; code < 0x10000; ++code) {
    const float f = bf16_to_f32(static_cast<uint16_t>(code));
    if (!std::isnan(f)) {
      EXPECT_EQ(f32_to_bf16(f), code) << code;
    }
  }
}

TEST(DTypeConversion, F16RoundsToNearestEven) {
  const float one = 1.0f, ulp = std::ldexp(1.0f, -10);
  EXPECT_EQ(f32_to_f16(one), 0x3c00);
  EXPECT_EQ(f32_to_f16(one + ulp / 2), 0x3c00);      // tie: to even
  EXPECT_EQ(f32_to_f16(one + 3 * ulp / 2), 0x3c02);  // tie: to even
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);           // largest finite
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);           // rounds up to infinity
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);      // tie: to even
  EXPECT_EQ(f32_to_f16(3 * std::ldexp(1.0f, -25)), 0x0002);  // tie: to even
  EXPECT_EQ(f32_to_f16(-0.5f), 0xb800);
  for (uint32_t code = 0; code < 0x10000; ++code) {
    const float f = f16_to_f32(static_cast<uint16_t>(code));
    if (!std::isnan(f)) {
      EXPECT_EQ(f32_to_f16(f), code) << code;
    }
  }
}

TEST(DTypeConversion, NamesRoundTrip) {
  for (DType t : kAllDTypes) EXPECT_EQ(dtype_from_name(dtype_name(t)), t);
  EXPECT_EQ(dtype_name(DType::kF8E4M3), "F8_E4M3");
  EXPECT_EQ(dtype_from_name("F9"), std::nullopt);
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           fmt::format("mla_{}_{}_{}", test->test_suite_name(), test->name(), ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // A file of the given header length field, header text and data bytes, without checks.
  static void write_raw(const std::string& file, uint64_t header_len, const std::string& header,
                        const std::string& data = "") {
    std::ofstream out(file, std::ios::binary);
    out.write(reinterpret_cast<const char*>(&header_len), 8);
    out << header << data;
  }
  static void write_raw(const std::string& file, const std::string& header,
                        const std::string& data = "") {
    write_raw(file, header.size(), header, data);
  }

  fs::path dir_;
};

// A tensor of `dtype` whose bytes are a pattern that depends on `seed`.
Tensor patterned(Shape shape, DType dtype, int seed) {
  Tensor t = Tensor::empty(std::move(shape), dtype);
  auto* bytes = t.data<uint8_t>();
  for (size_t i = 0; i < t.nbytes(); ++i) bytes[i] = static_cast<uint8_t>(i * 37 + seed * 11);
  return t;
}

uint64_t header_len_of(const std::string& file) {
  uint64_t len = 0;
  std::ifstream(file, std::ios::binary).read(reinterpret_cast<char*>(&len), 8);
  return len;
}

TEST_F(SafetensorsTest, RoundTripsEveryDType) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  int seed = 0;
  for (DType t : kAllDTypes) {
    tensors.emplace_back(fmt::format("w.{}", dtype_name(t)), patterned({3, 5}, t, ++seed));
  }
  tensors.emplace_back("scalar", patterned({}, DType::kF32, ++seed));
  tensors.emplace_back("empty", patterned({0, 4}, DType::kBF16, ++seed));
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "x"}};
  const std::string file = path("all.safetensors");
  write_safetensors(file, tensors, metadata);

  EXPECT_FALSE(fs::exists(file + ".tmp"));
  EXPECT_EQ(header_len_of(file) % 8, 0u);
  const auto st = SafetensorsFile::open(file);
  EXPECT_EQ(st->path(), file);
  EXPECT_EQ(st->metadata(), metadata);
  EXPECT_EQ(st->names().size(), tensors.size());
  EXPECT_TRUE(std::ranges::is_sorted(st->names()));
  size_t offset = 8 + header_len_of(file);
  for (const auto& [name, want] : tensors) {
    SCOPED_TRACE(name);
    const TensorInfo* info = st->find(name);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->name, name);
    EXPECT_EQ(info->dtype, want.dtype());
    EXPECT_EQ(info->shape, want.shape());
    EXPECT_EQ(info->offset, offset);  // stored in the order given
    EXPECT_EQ(info->nbytes, want.nbytes());
    offset += want.nbytes();
    const Tensor got = st->tensor(name);
    EXPECT_EQ(got.dtype(), want.dtype());
    EXPECT_EQ(got.shape(), want.shape());
    EXPECT_EQ(std::memcmp(got.raw(), want.raw(), want.nbytes()), 0);
  }
  EXPECT_EQ(offset, fs::file_size(file));
}

TEST_F(SafetensorsTest, TensorKeepsTheMappingAlive) {
  const std::string file = path("a.safetensors");
  write_safetensors(file, {{"w", Tensor::from_vector({3}, {1.5f, -2.0f, 3.25f})}});
  Tensor t = SafetensorsFile::open(file)->tensor("w");  // the file object is released here
  EXPECT_EQ(t.f32()[0], 1.5f);
  EXPECT_EQ(t.f32()[2], 3.25f);
}

TEST_F(SafetensorsTest, ConcurrentReadsAgree) {
  const std::string file = path("a.safetensors");
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (int i = 0; i < 16; ++i) {
    tensors.emplace_back(fmt::format("t{}", i), patterned({64, 64}, DType::kF32, i));
  }
  write_safetensors(file, tensors);
  const auto st = SafetensorsFile::open(file);
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int rep = 0; rep < 20; ++rep) {
        for (const auto& [name, want] : tensors) {
          mismatches[k] += std::memcmp(st->tensor(name).raw(), want.raw(), want.nbytes()) != 0;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

TEST_F(SafetensorsTest, OverwriteReplacesTheFile) {
  const std::string file = path("a.safetensors");
  write_safetensors(file, {{"old", Tensor::zeros({1000})}});
  write_safetensors(file, {{"new", Tensor::from_vector({1}, {7.0f})}});
  const auto st = SafetensorsFile::open(file);
  EXPECT_EQ(st->names(), std::vector<std::string>{"new"});
  EXPECT_EQ(st->tensor("new").f32()[0], 7.0f);
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  const std::string file = path("nope.safetensors");
  const Error e = error_of([&] { SafetensorsFile::open(file); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  EXPECT_THAT(e.what(), HasSubstr(file));
}

TEST_F(SafetensorsTest, DirectoryIsRejected) {
  const Error e = error_of([&] { SafetensorsFile::open(dir_.string()); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr(dir_.string()));
}

TEST_F(SafetensorsTest, FileShorterThanLengthFieldIsDataLoss) {
  const std::string file = path("short.safetensors");
  std::ofstream(file) << "abc";
  const Error e = error_of([&] { SafetensorsFile::open(file); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr(file));
}

TEST_F(SafetensorsTest, TruncatedDataRegionIsDataLoss) {
  const std::string file = path("cut.safetensors");
  write_safetensors(file, {{"first", Tensor::zeros({8})}, {"second", Tensor::zeros({8})}});
  fs::resize_file(file, fs::file_size(file) - 4);
  const Error e = error_of([&] { SafetensorsFile::open(file); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr(file));
  EXPECT_THAT(e.what(), HasSubstr("second"));
}

TEST_F(SafetensorsTest, TruncatedHeaderIsDataLoss) {
  const std::string file = path("cut.safetensors");
  write_safetensors(file, {{"w", Tensor::zeros({8})}});
  fs::resize_file(file, 8 + header_len_of(file) / 2);
  const Error e = error_of([&] { SafetensorsFile::open(file); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr(file));
}

TEST_F(SafetensorsTest, HeaderLengthBeyondFileIsDataLoss) {
  const std::string file = path("bad.safetensors");
  write_raw(file, 1000, "{}");
  const Error e = error_of([&] { SafetensorsFile::open(file); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr(file));
}

TEST_F(SafetensorsTest, HugeHeaderLengthIsDataLoss) {
  const std::string file = path("bad.safetensors");
  write_raw(file, uint64_t{1} << 40, "{}");
  const Error e = error_of([&] { SafetensorsFile::open(file); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr(file));
}

TEST_F(SafetensorsTest, NonJsonHeaderIsDataLoss) {
  const std::string file = path("bad.safetensors");
  write_raw(file, "{\"w\": not json");
  const Error e = error_of([&] { SafetensorsFile::open(file); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr(file));
}

TEST_F(SafetensorsTest, NonObjectHeaderIsDataLoss) {
  const std::string file = path("bad.safetensors");
  write_raw(file, "[1, 2, 3]");
  const Error e = error_of([&] { SafetensorsFile::open(file); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr(file));
}

TEST_F(SafetensorsTest, UnknownDTypeIsInvalidArgument) {
  const std::string file = path("bad.safetensors");
  write_raw(file, R"({"layer.w": {"dtype": "F9", "shape": [2], "data_offsets": [0, 8]}})",
            std::string(8, '\0'));
  const Error e = error_of([&] { SafetensorsFile::open(file); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr(file));
  EXPECT_THAT(e.what(), HasSubstr("layer.w"));
  EXPECT_THAT(e.what(), HasSubstr("F9"));
}

TEST_F(SafetensorsTest, MalformedEntriesAreDataLoss) {
  const std::string data(16, '\0');
  const std::vector<std::string> headers = {
      R"({"layer.w": {"dtype": "F32", "shape": [4]}})",                            // no offsets
      R"({"layer.w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 16]}})",  // negative
      R"({"layer.w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 24]}})",   // past end
      R"({"layer.w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}})",   // reversed
      R"({"layer.w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}})",       // one offset
      R"({"layer.w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})",   // 12 != 16
      R"({"layer.w": {"dtype": "F32", "shape": [4611686018427387904, 4611686018427387904],
                      "data_offsets": [0, 0]}})",  // overflowing numel
      R"({"layer.w": [1, 2]})",
  };
  const std::string file = path("bad.safetensors");
  for (const std::string& header : headers) {
    SCOPED_TRACE(header);
    write_raw(file, header, data);
    const Error e = error_of([&] { SafetensorsFile::open(file); });
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    EXPECT_THAT(e.what(), HasSubstr(file));
    EXPECT_THAT(e.what(), HasSubstr("layer.w"));
  }
}

TEST_F(SafetensorsTest, MissingTensorIsNotFound) {
  const std::string file = path("a.safetensors");
  write_safetensors(file, {{"w", Tensor::zeros({2})}});
  const auto st = SafetensorsFile::open(file);
  EXPECT_EQ(st->find("layer.nope"), nullptr);
  const Error e = error_of([&] { st->tensor("layer.nope"); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  EXPECT_THAT(e.what(), HasSubstr(file));
  EXPECT_THAT(e.what(), HasSubstr("layer.nope"));
}

TEST_F(SafetensorsTest, WriteRejectsBadInput) {
  const std::string file = path("a.safetensors");
  const Error dup = error_of([&] {
    write_safetensors(file, {{"w", Tensor::zeros({1})}, {"w", Tensor::zeros({1})}});
  });
  EXPECT_EQ(dup.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(dup.what(), HasSubstr("w"));
  const Error undefined = error_of([&] { write_safetensors(file, {{"u", Tensor()}}); });
  EXPECT_EQ(undefined.code(), ErrorCode::kInvalidArgument);
  const Error reserved = error_of([&] {
    write_safetensors(file, {{"__metadata__", Tensor::zeros({1})}});
  });
  EXPECT_EQ(reserved.code(), ErrorCode::kInvalidArgument);
  EXPECT_FALSE(fs::exists(file));

  const std::string unwritable = path("no/such/dir/a.safetensors");
  const Error e = error_of([&] { write_safetensors(unwritable, {{"w", Tensor::zeros({1})}}); });
  EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
  EXPECT_THAT(e.what(), HasSubstr(unwritable));
}

}  // namespace
}  // namespace mla
