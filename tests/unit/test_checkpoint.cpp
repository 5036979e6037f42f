#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/error.h"
#include "runtime/checkpoint.h"
#include "runtime/safetensors.h"

namespace mla {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

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

// `values` rounded to bf16 (`dtype` kBF16) or f16 (kF16) and stored in that dtype.
Tensor narrowed(Shape shape, const std::vector<float>& values, DType dtype) {
  Tensor t = Tensor::empty(std::move(shape), dtype);
  for (size_t i = 0; i < values.size(); ++i) {
    t.data<uint16_t>()[i] = dtype == DType::kBF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
  }
  return t;
}

std::vector<float> as_vector(const Tensor& t) { return {t.f32(), t.f32() + t.numel()}; }

size_t resident_bytes() {
  size_t total_pages = 0, resident_pages = 0;
  std::ifstream("/proc/self/statm") >> total_pages >> resident_pages;
  return resident_pages * static_cast<size_t>(::sysconf(_SC_PAGESIZE));
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = (fs::path(::testing::TempDir()) /
            fmt::format("mla_{}_{}_{}", test->test_suite_name(), test->name(), ::getpid()))
               .string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  void write_index(const std::map<std::string, std::string>& weight_map) const {
    std::ofstream(path("model.safetensors.index.json"))
        << nlohmann::json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump();
  }

  std::string dir_;
};

TEST_F(CheckpointTest, LoadsF32Bf16F16AsF32) {
  const std::vector<float> values = {1.5f, -2.25f, 3.0e-3f, 65000.0f, -1.0e-6f, 0.1f};
  write_safetensors(path("model.safetensors"), {{"a.f32", Tensor::from_vector({2, 3}, values)},
                                                {"b.bf16", narrowed({6}, values, DType::kBF16)},
                                                {"c.f16", narrowed({3, 2}, values, DType::kF16)}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  EXPECT_EQ(ckpt.dir(), dir_);
  EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"a.f32", "b.bf16", "c.f16"}));
  EXPECT_TRUE(ckpt.has("b.bf16"));
  EXPECT_FALSE(ckpt.has("d"));
  EXPECT_EQ(ckpt.info("b.bf16").dtype, DType::kBF16);
  EXPECT_EQ(ckpt.info("c.f16").shape, (Shape{3, 2}));

  std::vector<float> want_bf16, want_f16;
  for (float v : values) {
    want_bf16.push_back(bf16_to_f32(f32_to_bf16(v)));
    want_f16.push_back(f16_to_f32(f32_to_f16(v)));
  }
  EXPECT_EQ(as_vector(ckpt.load_f32("a.f32", {2, 3})), values);
  EXPECT_EQ(as_vector(ckpt.load_f32("b.bf16", {6})), want_bf16);
  const Tensor f16 = ckpt.load_f32("c.f16", {3, 2});
  EXPECT_EQ(f16.dtype(), DType::kF32);
  EXPECT_EQ(as_vector(f16), want_f16);
  EXPECT_EQ(as_vector(f16)[0], 1.5f);  // exactly representable values stay exact
}

TEST_F(CheckpointTest, ShardedIndexWithTwoShards) {
  write_safetensors(path("model-00001-of-00002.safetensors"),
                    {{"embed", Tensor::from_vector({2}, {1, 2})},
                     {"stray", Tensor::zeros({1})}});  // not in the index: ignored
  write_safetensors(path("model-00002-of-00002.safetensors"),
                    {{"head", Tensor::from_vector({3}, {3, 4, 5})}});
  write_index({{"embed", "model-00001-of-00002.safetensors"},
               {"head", "model-00002-of-00002.safetensors"}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"embed", "head"}));
  EXPECT_EQ(as_vector(ckpt.load_f32("embed", {2})), (std::vector<float>{1, 2}));
  EXPECT_EQ(as_vector(ckpt.load_f32("head", {3})), (std::vector<float>{3, 4, 5}));
  EXPECT_EQ(ckpt.info("head").name, "head");
}

TEST_F(CheckpointTest, IndexWithMissingShardIsNotFound) {
  write_safetensors(path("model-00001-of-00002.safetensors"), {{"embed", Tensor::zeros({2})}});
  write_index({{"embed", "model-00001-of-00002.safetensors"},
               {"head", "model-00002-of-00002.safetensors"}});
  const Error e = error_of([&] { Checkpoint::open(dir_); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  EXPECT_THAT(e.what(), HasSubstr("model-00002-of-00002.safetensors"));
}

TEST_F(CheckpointTest, IndexPointingAtWrongShardIsDataLoss) {
  write_safetensors(path("model-00001-of-00001.safetensors"), {{"embed", Tensor::zeros({2})}});
  write_index({{"embed", "model-00001-of-00001.safetensors"},
               {"head", "model-00001-of-00001.safetensors"}});
  const Error e = error_of([&] { Checkpoint::open(dir_); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr("head"));
  EXPECT_THAT(e.what(), HasSubstr("model-00001-of-00001.safetensors"));
}

TEST_F(CheckpointTest, MalformedIndexIsDataLoss) {
  std::ofstream(path("model.safetensors.index.json")) << R"({"weight_map": [1]})";
  const Error e = error_of([&] { Checkpoint::open(dir_); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr("model.safetensors.index.json"));
}

// The index names files; none of them may lie outside the model directory, whether named by
// an absolute path, through `..`, or through a symlink. The model here is dir_/model and the
// file it must not reach is dir_/outside.safetensors.
TEST_F(CheckpointTest, IndexEntriesOutsideTheModelDirectoryAreRefused) {
  const fs::path model = fs::path(dir_) / "model";
  fs::create_directories(model / "sub");
  write_safetensors(path("outside.safetensors"), {{"embed", Tensor::zeros({2})}});
  fs::create_symlink("../outside.safetensors", model / "link.safetensors");
  fs::create_directory_symlink(dir_, model / "up");
  const std::string outside = path("outside.safetensors");
  for (const std::string& entry :
       {outside, std::string("../outside.safetensors"),
        std::string("sub/../../outside.safetensors"), std::string("link.safetensors"),
        std::string("up/outside.safetensors"), std::string("")}) {
    SCOPED_TRACE(entry);
    std::ofstream(model / "model.safetensors.index.json")
        << nlohmann::json{{"weight_map", {{"embed", entry}}}}.dump();
    const Error e = error_of([&] { Checkpoint::open(model.string()); });
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr("weight_map entry \"" + entry + "\" (tensor embed)"));
    EXPECT_THAT(e.what(), HasSubstr("model directory"));
  }
}

// Symlinks that stay inside are fine, and so is the Hugging Face hub cache, whose snapshot
// files are symlinks to the repository's blobs.
TEST_F(CheckpointTest, IndexSymlinksInsideTheModelOrItsHubCacheBlobsAreFollowed) {
  const fs::path repo = fs::path(dir_) / "models--org--tiny";
  const fs::path snapshot = repo / "snapshots" / "0123abc";
  fs::create_directories(snapshot);
  fs::create_directories(repo / "blobs");
  write_safetensors((repo / "blobs" / "9f86d08").string(),
                    {{"embed", Tensor::from_vector({2}, {1, 2})}});
  write_safetensors((snapshot / "real..name.safetensors").string(),
                    {{"head", Tensor::from_vector({1}, {3})}});
  fs::create_symlink("../../blobs/9f86d08", snapshot / "model-00001-of-00002.safetensors");
  fs::create_symlink("real..name.safetensors", snapshot / "model-00002-of-00002.safetensors");
  std::ofstream(snapshot / "model.safetensors.index.json") << nlohmann::json{
      {"weight_map",
       {{"embed", "model-00001-of-00002.safetensors"},
        {"head", "./model-00002-of-00002.safetensors"}}}}.dump();
  Checkpoint ckpt = Checkpoint::open(snapshot.string());
  EXPECT_EQ(as_vector(ckpt.load_f32("embed", {2})), (std::vector<float>{1, 2}));
  EXPECT_EQ(as_vector(ckpt.load_f32("head", {1})), (std::vector<float>{3}));

  // Another directory's blobs are outside, even beside a snapshots directory.
  const fs::path plain = fs::path(dir_) / "plain";
  fs::create_directories(plain);
  fs::create_symlink(repo / "blobs" / "9f86d08", plain / "model.safetensors");
  std::ofstream(plain / "model.safetensors.index.json")
      << nlohmann::json{{"weight_map", {{"embed", "model.safetensors"}}}}.dump();
  const Error e = error_of([&] { Checkpoint::open(plain.string()); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr("\"model.safetensors\" (tensor embed)"));
}

// A "safetensors" file or an index that is some other file: the message says which file and
// where it fails, and quotes none of it.
TEST_F(CheckpointTest, FilesThatAreNotSafetensorsAreNotQuoted) {
  const std::string secret = "\"HF_TOKEN=hf_5ecret_value\n";
  const std::string file = path("model.safetensors");

  std::ofstream(file) << secret;
  uint64_t first8 = 0;
  std::memcpy(&first8, secret.data(), 8);
  Error e = error_of([&] { Checkpoint::open(dir_); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr(file + " is not a safetensors file"));
  EXPECT_THAT(e.what(), Not(HasSubstr(std::to_string(first8))));  // the bytes, as a number

  // A plausible length field followed by text.
  const uint64_t len = secret.size();
  {
    std::ofstream out(file, std::ios::binary);
    out.write(reinterpret_cast<const char*>(&len), 8);
    out << secret;
  }
  e = error_of([&] { Checkpoint::open(dir_); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr(file + " is not a safetensors file"));
  EXPECT_THAT(e.what(), Not(HasSubstr("5ecret")));
  EXPECT_THAT(e.what(), Not(HasSubstr("HF_TOKEN")));

  std::ofstream(path("model.safetensors.index.json")) << secret;
  e = error_of([&] { Checkpoint::open(dir_); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr(path("model.safetensors.index.json") + " is not valid JSON"));
  EXPECT_THAT(e.what(), Not(HasSubstr("5ecret")));
  EXPECT_THAT(e.what(), Not(HasSubstr("HF_TOKEN")));
}

TEST_F(CheckpointTest, ModelDirectoryThatIsAFileNamesThePath) {
  write_safetensors(path("model.safetensors"), {{"x", Tensor::zeros({1})}});
  const Error e = error_of([&] { Checkpoint::open(path("model.safetensors")); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(),
              HasSubstr("model directory " + path("model.safetensors") + " is not a directory"));
}

TEST_F(CheckpointTest, WithoutIndexUsesEverySafetensorsFile) {
  write_safetensors(path("b.safetensors"), {{"y", Tensor::from_vector({1}, {2})}});
  write_safetensors(path("a.safetensors"), {{"x", Tensor::from_vector({1}, {1})}});
  std::ofstream(path("config.json")) << "{}";
  Checkpoint ckpt = Checkpoint::open(dir_);
  EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(ckpt.load_f32("y", {1}).f32()[0], 2.0f);
}

TEST_F(CheckpointTest, TensorInTwoFilesIsDataLoss) {
  write_safetensors(path("a.safetensors"), {{"x", Tensor::zeros({1})}});
  write_safetensors(path("b.safetensors"), {{"x", Tensor::zeros({1})}});
  const Error e = error_of([&] { Checkpoint::open(dir_); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr("a.safetensors"));
  EXPECT_THAT(e.what(), HasSubstr("b.safetensors"));
}

TEST_F(CheckpointTest, DirectoryWithoutWeightsIsNotFound) {
  std::ofstream(path("config.json")) << "{}";
  const Error empty = error_of([&] { Checkpoint::open(dir_); });
  EXPECT_EQ(empty.code(), ErrorCode::kNotFound);
  EXPECT_THAT(empty.what(), HasSubstr(dir_));

  const std::string missing = path("no_such_model");
  const Error absent = error_of([&] { Checkpoint::open(missing); });
  EXPECT_EQ(absent.code(), ErrorCode::kNotFound);
  EXPECT_THAT(absent.what(), HasSubstr(missing));
}

TEST_F(CheckpointTest, CorruptFileNamesTheFile) {
  std::ofstream(path("model.safetensors")) << "garbage";
  const Error e = error_of([&] { Checkpoint::open(dir_); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_THAT(e.what(), HasSubstr(path("model.safetensors")));
}

TEST_F(CheckpointTest, MissingTensorIsNotFound) {
  write_safetensors(path("model.safetensors"), {{"w", Tensor::zeros({2})}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  for (const auto& load :
       std::vector<std::function<void()>>{[&] { ckpt.load_f32("model.layers.0.nope", {2}); },
                                          [&] { ckpt.load_raw("model.layers.0.nope"); },
                                          [&] { ckpt.info("model.layers.0.nope"); }}) {
    const Error e = error_of(load);
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
    EXPECT_THAT(e.what(), HasSubstr("model.layers.0.nope"));
    EXPECT_THAT(e.what(), HasSubstr(dir_));
  }
}

TEST_F(CheckpointTest, WrongShapeIsInvalidArgument) {
  write_safetensors(path("model.safetensors"), {{"w", Tensor::zeros({2, 2})}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  const Error e = error_of([&] { ckpt.load_f32("w", {4}); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr(fmt::format("file {}: tensor w has shape [2, 2], expected [4]",
                                              path("model.safetensors"))));
}

TEST_F(CheckpointTest, LoadRawReturnsStoredIntegers) {
  Tensor ids = Tensor::empty({3}, DType::kI64);
  for (int i = 0; i < 3; ++i) ids.data<int64_t>()[i] = int64_t{1} << (40 + i);
  write_safetensors(path("model.safetensors"), {{"ids", ids}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  const Tensor raw = ckpt.load_raw("ids");
  EXPECT_EQ(raw.dtype(), DType::kI64);
  EXPECT_EQ(raw.shape(), (Shape{3}));
  EXPECT_EQ(raw.data<int64_t>()[2], int64_t{1} << 42);
  const Error e = error_of([&] { ckpt.load_f32("ids", {3}); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr("ids"));
}

// Random fp8 codes (no NaN) for a [rows, cols] weight.
Tensor random_fp8(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> code(0, 0x7e);
  Tensor w = Tensor::empty({rows, cols}, DType::kF8E4M3);
  for (int64_t i = 0; i < w.numel(); ++i) {
    w.data<uint8_t>()[i] = static_cast<uint8_t>(code(gen) | (gen() & 0x80));
  }
  return w;
}

std::vector<float> random_scales(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(1e-4f, 2e-2f);
  std::vector<float> s(n);
  for (float& x : s) x = dist(gen);
  return s;
}

// W[i][j] = fp8(W[i][j]) * scale[i / block_rows][j / block_cols], element by element.
std::vector<float> dequantized(const Tensor& w, const std::vector<float>& scale, int block_rows,
                               int block_cols) {
  const int64_t rows = w.dim(0), cols = w.dim(1);
  const int64_t scale_cols = (cols + block_cols - 1) / block_cols;
  std::vector<float> out(rows * cols);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      out[i * cols + j] = fp8e4m3_to_f32(w.data<uint8_t>()[i * cols + j]) *
                          scale[(i / block_rows) * scale_cols + j / block_cols];
    }
  }
  return out;
}

TEST_F(CheckpointTest, DequantizesFp8WithBlockScales) {
  const std::string name = "model.layers.0.mlp.down_proj.weight";
  const Tensor w = random_fp8(200, 300, 1);
  const std::vector<float> scale = random_scales(2 * 3, 2);
  write_safetensors(path("model.safetensors"),
                    {{name, w}, {name + "_scale_inv", Tensor::from_vector({2, 3}, scale)}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  const Tensor got = ckpt.load_f32(name, {200, 300});
  EXPECT_EQ(got.dtype(), DType::kF32);
  EXPECT_EQ(as_vector(got), dequantized(w, scale, 128, 128));
}

TEST_F(CheckpointTest, DequantizesFp8WithBf16ScalesAndCustomBlock) {
  const Tensor w = random_fp8(200, 300, 3);
  std::vector<float> scale = random_scales(4 * 3, 4);
  for (float& s : scale) s = bf16_to_f32(f32_to_bf16(s));
  write_safetensors(path("model.safetensors"),
                    {{"w", w}, {"w_scale_inv", narrowed({4, 3}, scale, DType::kBF16)}});
  Checkpoint ckpt = Checkpoint::open(dir_, {64, 100});
  EXPECT_EQ(as_vector(ckpt.load_f32("w", {200, 300})), dequantized(w, scale, 64, 100));
}

TEST_F(CheckpointTest, Fp8WithoutScaleIsNotFound) {
  write_safetensors(path("model.safetensors"), {{"layer.w", random_fp8(4, 4, 5)}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  const Error e = error_of([&] { ckpt.load_f32("layer.w", {4, 4}); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  EXPECT_THAT(e.what(), HasSubstr("layer.w_scale_inv"));
  EXPECT_THAT(e.what(), HasSubstr(path("model.safetensors")));
}

TEST_F(CheckpointTest, Fp8ScaleOfWrongShapeIsInvalidArgument) {
  write_safetensors(path("model.safetensors"),
                    {{"layer.w", random_fp8(200, 300, 6)},
                     {"layer.w_scale_inv", Tensor::from_vector({2, 2}, {1, 1, 1, 1})}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  const Error e = error_of([&] { ckpt.load_f32("layer.w", {200, 300}); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.what(), HasSubstr("layer.w_scale_inv has shape [2, 2], expected [2, 3]"));
}

TEST_F(CheckpointTest, UnloadedTensorsCostNothing) {
  // A 4 GiB sparse tensor next to a small one: opening the checkpoint and loading the small
  // tensor must not read the big one.
  const uint64_t big = uint64_t{4} << 30;
  std::string header =
      nlohmann::json{
          {"big", {{"dtype", "U8"}, {"shape", {big}}, {"data_offsets", {0, big}}}},
          {"small", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {big, big + 8}}}}}
          .dump();
  header.append((8 - header.size() % 8) % 8, ' ');
  const uint64_t header_len = header.size();
  const float small[2] = {4.0f, -5.0f};
  {
    std::ofstream out(path("model.safetensors"), std::ios::binary);
    out.write(reinterpret_cast<const char*>(&header_len), 8);
    out << header;
    out.seekp(static_cast<std::streamoff>(8 + header_len + big));
    out.write(reinterpret_cast<const char*>(small), sizeof(small));
  }
  const size_t before = resident_bytes();
  Checkpoint ckpt = Checkpoint::open(dir_);
  EXPECT_EQ(as_vector(ckpt.load_f32("small", {2})), (std::vector<float>{4.0f, -5.0f}));
  EXPECT_EQ(ckpt.info("big").nbytes, big);
  EXPECT_LT(resident_bytes() - before, size_t{64} << 20);
}

TEST_F(CheckpointTest, ProgressLogsASummaryWhenNotATerminal) {
  write_safetensors(path("model.safetensors"),
                    {{"a", Tensor::zeros({1000})}, {"b", Tensor::zeros({10})}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  ::testing::internal::CaptureStdout();
  ::testing::internal::CaptureStderr();  // stderr is now a file, not a terminal
  ckpt.set_progress(true);
  ckpt.load_f32("a", {1000});
  ckpt.load_f32("b", {10});
  ckpt.finish_progress();
  ckpt.finish_progress();  // nothing loaded since: no second line
  const std::string out =
      ::testing::internal::GetCapturedStdout() + ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(out, HasSubstr("loaded 2 tensors, 0.0 MB in"));
  EXPECT_EQ(out.find("loaded", out.find("loaded") + 1), std::string::npos);
}

// Random values in [-2, 2), rounded to `dtype` (kF32, kBF16 or kF16) and stored in it.
Tensor random_float(Shape shape, DType dtype, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<float> values(shape_numel(shape));
  for (float& v : values) v = dist(gen);
  if (dtype == DType::kF32) return Tensor::from_vector(std::move(shape), values);
  return narrowed(std::move(shape), values, dtype);
}

// Rows [row_begin, row_end) x columns [col_begin, col_end) of the 2-D fp32 tensor `t`.
std::vector<float> part(const Tensor& t, int64_t row_begin, int64_t row_end, int64_t col_begin,
                        int64_t col_end) {
  std::vector<float> out;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* row = t.f32() + i * t.dim(1);
    out.insert(out.end(), row + col_begin, row + col_end);
  }
  return out;
}

// The slices a tensor-parallel rank takes of a [200, 300] weight; with 128x128 scale blocks
// each straddles block boundaries in the dimension it cuts.
struct SliceCase {
  int64_t row_begin, row_end, col_begin, col_end;  // col_end -1: through the last column
};
const SliceCase kSliceCases[] = {
    {64, 190, 0, -1},    // rows: column-parallel shard
    {0, 200, 100, 250},  // columns: row-parallel shard
    {64, 190, 100, 250}, {0, 200, 0, 300}, {199, 200, 299, 300}, {0, 1, 100, -1},
};

// Each of kSliceCases of the [200, 300] tensor `name` equals that part of load_f32.
void expect_slices_match_full_load(Checkpoint& ckpt, const std::string& name) {
  const Tensor full = ckpt.load_f32(name, {200, 300});
  for (const SliceCase& c : kSliceCases) {
    SCOPED_TRACE(fmt::format("{} rows [{}, {}) columns [{}, {})", name, c.row_begin, c.row_end,
                             c.col_begin, c.col_end));
    const Tensor got =
        ckpt.load_f32_slice(name, {200, 300}, c.row_begin, c.row_end, c.col_begin, c.col_end);
    const int64_t col_end = c.col_end == -1 ? 300 : c.col_end;
    EXPECT_EQ(got.dtype(), DType::kF32);
    EXPECT_EQ(got.shape(), (Shape{c.row_end - c.row_begin, col_end - c.col_begin}));
    EXPECT_EQ(as_vector(got), part(full, c.row_begin, c.row_end, c.col_begin, col_end));
  }
}

TEST_F(CheckpointTest, SlicesF32Bf16F16ByRowsAndColumns) {
  write_safetensors(path("model.safetensors"),
                    {{"w.f32", random_float({200, 300}, DType::kF32, 11)},
                     {"w.bf16", random_float({200, 300}, DType::kBF16, 12)},
                     {"w.f16", random_float({200, 300}, DType::kF16, 13)}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  for (const std::string name : {"w.f32", "w.bf16", "w.f16"}) {
    expect_slices_match_full_load(ckpt, name);
  }
}

TEST_F(CheckpointTest, SlicesFp8AcrossScaleBlocks) {
  const Tensor w = random_fp8(200, 300, 14);
  const std::vector<float> scale = random_scales(2 * 3, 15);
  write_safetensors(path("model.safetensors"),
                    {{"w", w}, {"w_scale_inv", Tensor::from_vector({2, 3}, scale)}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  expect_slices_match_full_load(ckpt, "w");
  // Against the element-by-element reference too, not only against load_f32.
  const std::vector<float> want = dequantized(w, scale, 128, 128);
  const Tensor want_tensor = Tensor::from_vector({200, 300}, want);
  EXPECT_EQ(as_vector(ckpt.load_f32_slice("w", {200, 300}, 64, 190, 100, 250)),
            part(want_tensor, 64, 190, 100, 250));
}

TEST_F(CheckpointTest, SlicesFp8WithBf16ScalesAndCustomBlock) {
  const Tensor w = random_fp8(200, 300, 16);
  std::vector<float> scale = random_scales(4 * 3, 17);
  for (float& s : scale) s = bf16_to_f32(f32_to_bf16(s));
  write_safetensors(path("model.safetensors"),
                    {{"w", w}, {"w_scale_inv", narrowed({4, 3}, scale, DType::kBF16)}});
  Checkpoint ckpt = Checkpoint::open(dir_, {64, 100});
  expect_slices_match_full_load(ckpt, "w");
  const Tensor want = Tensor::from_vector({200, 300}, dequantized(w, scale, 64, 100));
  EXPECT_EQ(as_vector(ckpt.load_f32_slice("w", {200, 300}, 63, 129, 99, 201)),
            part(want, 63, 129, 99, 201));
}

TEST_F(CheckpointTest, SlicesExpertsOf3DAndElementsOf1DTensors) {
  write_safetensors(path("model.safetensors"),
                    {{"experts", random_float({8, 6, 10}, DType::kBF16, 18)},
                     {"bias", random_float({10}, DType::kF16, 19)}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  const Tensor experts = ckpt.load_f32("experts", {8, 6, 10});
  const Tensor mine = ckpt.load_f32_slice("experts", {8, 6, 10}, 2, 5);
  EXPECT_EQ(mine.shape(), (Shape{3, 6, 10}));
  EXPECT_EQ(as_vector(mine), as_vector(experts.slice_rows(2, 5).clone()));
  EXPECT_EQ(as_vector(ckpt.load_f32_slice("experts", {8, 6, 10}, 0, 8)), as_vector(experts));

  const Tensor bias = ckpt.load_f32("bias", {10});
  const Tensor tail = ckpt.load_f32_slice("bias", {10}, 7, 10);
  EXPECT_EQ(tail.shape(), (Shape{3}));
  EXPECT_EQ(as_vector(tail), (std::vector<float>{bias.f32() + 7, bias.f32() + 10}));
}

// Empty ranges are rejected, not returned as 0-row tensors: a rank that computes an empty
// shard has a wrong plan, and should hear so at load time rather than at its first matmul.
TEST_F(CheckpointTest, SliceOutOfRangeOrEmptyIsInvalidArgument) {
  write_safetensors(path("model.safetensors"), {{"w", Tensor::zeros({200, 300})},
                                                {"experts", Tensor::zeros({4, 2, 3})},
                                                {"bias", Tensor::zeros({5})},
                                                {"scalar", Tensor::zeros({})}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  struct Bad {
    std::string name;
    Shape shape;
    int64_t row_begin, row_end, col_begin, col_end;
    std::string message;
  };
  const std::vector<Bad> bad = {
      {"w", {200, 300}, -1, 10, 0, -1, "rows [-1, 10) of tensor w [200, 300]"},
      {"w", {200, 300}, 190, 201, 0, -1, "outside its 200 rows"},
      {"w", {200, 300}, 64, 64, 0, -1, "rows [64, 64) of tensor w [200, 300] are empty"},
      {"w", {200, 300}, 100, 50, 0, -1, "rows [100, 50)"},
      {"w", {200, 300}, 0, 200, -1, 10, "columns [-1, 10)"},
      {"w", {200, 300}, 0, 200, 250, 301, "outside its 300 columns"},
      {"w", {200, 300}, 0, 200, 100, 100, "columns [100, 100) of tensor w [200, 300] are empty"},
      {"w", {200, 300}, 0, 200, 300, -1, "columns [300, -1)"},
      {"w", {200, 300}, 0, 200, 0, -2, "columns [0, -2)"},
      {"experts", {4, 2, 3}, 0, 4, 0, 2, "only 2-D tensors have columns to slice"},
      {"bias", {5}, 0, 5, 1, -1, "only 2-D tensors have columns to slice"},
      {"experts", {4, 2, 3}, 0, 5, 0, -1, "outside its 4 rows"},
      {"scalar", {}, 0, 1, 0, -1, "scalar"},
      {"w", {300, 200}, 0, 10, 0, -1, "tensor w has shape [200, 300], expected [300, 200]"},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.message);
    const Error e = error_of([&] {
      ckpt.load_f32_slice(b.name, b.shape, b.row_begin, b.row_end, b.col_begin, b.col_end);
    });
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr(b.message));
    EXPECT_THAT(e.what(), HasSubstr(path("model.safetensors")));
  }
  EXPECT_EQ(error_of([&] { ckpt.load_f32_slice("nope", {1}, 0, 1); }).code(), ErrorCode::kNotFound);
}

TEST_F(CheckpointTest, SliceOfFp8WithoutScaleIsNotFound) {
  write_safetensors(path("model.safetensors"), {{"layer.w", random_fp8(4, 4, 20)}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  const Error e = error_of([&] { ckpt.load_f32_slice("layer.w", {4, 4}, 0, 2); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  EXPECT_THAT(e.what(), HasSubstr("layer.w_scale_inv"));
}

// Writes `path` holding one BF16 tensor "big" of `shape` whose bytes are a hole in the file:
// gigabytes that cost neither disk nor memory until read.
void write_sparse_bf16(const std::string& path, const Shape& shape) {
  const uint64_t nbytes = static_cast<uint64_t>(shape_numel(shape)) * 2;
  std::string header =
      nlohmann::json{{"big", {{"dtype", "BF16"}, {"shape", shape}, {"data_offsets", {0, nbytes}}}}}
          .dump();
  header.append((8 - header.size() % 8) % 8, ' ');
  const uint64_t header_len = header.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&header_len), 8);
  out << header;
  out.seekp(static_cast<std::streamoff>(8 + header_len + nbytes - 1));
  out.put('\0');
}

// A memory figure of this process from /proc/self/status (e.g. "RssAnon:"), in bytes.
int64_t proc_status_bytes(std::string_view field) {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.starts_with(field)) return std::stoll(line.substr(field.size())) * 1024;
  }
  ADD_FAILURE() << "no " << field << " in /proc/self/status";
  return 0;
}

// Restarts the peak resident size (VmHWM) from the current one.
void reset_peak_resident() {
  std::ofstream("/proc/self/clear_refs") << "5";
  ASSERT_LT(proc_status_bytes("VmHWM:") - proc_status_bytes("VmRSS:"), int64_t{1} << 20)
      << "cannot reset VmHWM through /proc/self/clear_refs";
}

TEST_F(CheckpointTest, SliceReadsOnlyTheSlice) {
  // A 256 MiB weight: loading it whole would page in 256 MiB and allocate 512 MiB of fp32.
  write_sparse_bf16(path("model.safetensors"), {512, 262144});
  Checkpoint ckpt = Checkpoint::open(dir_);

  // Two 512 KiB rows: whatever the kernel reads ahead, far from the whole tensor.
  const int64_t before = static_cast<int64_t>(resident_bytes());
  const Tensor rows = ckpt.load_f32_slice("big", {512, 262144}, 256, 258);
  EXPECT_EQ(rows.shape(), (Shape{2, 262144}));
  EXPECT_LT(static_cast<int64_t>(resident_bytes()) - before, int64_t{64} << 20);

  // 100 columns of every row. The kernel pages a mapped file in by readahead windows (8 MiB on
  // some disks: many rows), so the file pages mapped here are no fair measure. The heap is:
  // converting the whole tensor first needs 512 MiB of fp32, seen in the peak even if freed.
  const int64_t anon_before = proc_status_bytes("RssAnon:");
  reset_peak_resident();
  const Tensor cols = ckpt.load_f32_slice("big", {512, 262144}, 0, 512, 131000, 131100);
  EXPECT_EQ(cols.shape(), (Shape{512, 100}));
  EXPECT_LT(proc_status_bytes("VmHWM:") - proc_status_bytes("VmRSS:"), int64_t{64} << 20);
  EXPECT_LT(proc_status_bytes("RssAnon:") - anon_before, int64_t{64} << 20);
  EXPECT_EQ(cols.f32()[0], 0.0f);
}

TEST_F(CheckpointTest, ProgressCountsOnlyTheSlicedBytes) {
  write_safetensors(path("model.safetensors"), {{"w", Tensor::zeros({1000, 1000})},  // 4 MB
                                                {"q", random_fp8(1000, 1000, 21)},   // 1 MB
                                                {"q_scale_inv", Tensor::zeros({8, 8})}});
  Checkpoint ckpt = Checkpoint::open(dir_);
  ::testing::internal::CaptureStdout();
  ::testing::internal::CaptureStderr();
  ckpt.set_progress(true);
  ckpt.load_f32_slice("w", {1000, 1000}, 0, 250);           // a quarter: 1.0 MB
  ckpt.load_f32_slice("w", {1000, 1000}, 0, 1000, 0, 500);  // half: 2.0 MB
  ckpt.load_f32_slice("q", {1000, 1000}, 500, 1000);        // half of 1 MB; scales not counted
  ckpt.finish_progress();
  const std::string out =
      ::testing::internal::GetCapturedStdout() + ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(out, HasSubstr("loaded 3 tensors, 3.5 MB in"));
}

}  // namespace
}  // namespace mla
