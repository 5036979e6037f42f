// TensorDump: the .npy bytes it writes (read back by parsing the format, not through the
// writer), file names, the filter, the write-once rule, and its refusals.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/tensor_dump.h"

namespace mla {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

struct Npy {
  std::string header;  // the dict, padding and newline
  std::vector<float> values;
};

// Parses a .npy 1.0 file: magic, version, little-endian header length, a header that ends the
// preamble on a 64-byte boundary, then the raw data.
Npy read_npy(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Npy npy;
  EXPECT_GE(bytes.size(), 10u) << path;
  if (bytes.size() < 10) return npy;
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8)) << path;
  const size_t header_len = static_cast<uint8_t>(bytes[8]) | static_cast<uint8_t>(bytes[9]) << 8;
  EXPECT_EQ((10 + header_len) % 64, 0u) << path;
  EXPECT_LE(10 + header_len, bytes.size()) << path;
  npy.header = bytes.substr(10, header_len);
  EXPECT_EQ(npy.header.back(), '\n') << path;
  const std::string data = bytes.substr(std::min(bytes.size(), 10 + header_len));
  EXPECT_EQ(data.size() % 4, 0u) << path;
  npy.values.resize(data.size() / 4);
  std::memcpy(npy.values.data(), data.data(), npy.values.size() * 4);
  return npy;
}

// The dict part of a header, without padding.
std::string dict_of(const Npy& npy) {
  return npy.header.substr(0, npy.header.find_last_not_of(" \n") + 1);
}

class TensorDumpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           fmt::format("mla_{}_{}_{}", test->test_suite_name(), test->name(), ::getpid());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path dir_;
};

TEST_F(TensorDumpTest, WritesNpyFilesThatReadBack) {
  TensorDump dump((dir_ / "a" / "b").string());  // parents are created
  const std::vector<float> x = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-30f};
  dump.add("attn_norm", 3, x.data(), {2, 3});
  dump.add("k_rope", 12, x.data(), {6});
  dump.add("q_nope", 0, x.data(), {1, 2, 3});
  dump.add("logits", -1, x.data(), {3, 2});
  dump.add("empty", -1, nullptr, {0, 4});

  EXPECT_THAT(dump.files(), ElementsAre("L03.attn_norm.npy", "L12.k_rope.npy", "L00.q_nope.npy",
                                        "logits.npy", "empty.npy"));
  const fs::path out = dir_ / "a" / "b";
  EXPECT_EQ(dump.dir(), out.string());

  const Npy norm = read_npy(out / "L03.attn_norm.npy");
  EXPECT_EQ(dict_of(norm), "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }");
  ASSERT_EQ(norm.values.size(), x.size());
  EXPECT_EQ(std::memcmp(norm.values.data(), x.data(), x.size() * 4), 0);  // -0.0, subnormal too
  EXPECT_TRUE(std::signbit(norm.values[4]));
  EXPECT_EQ(dict_of(read_npy(out / "L12.k_rope.npy")),
            "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }");
  EXPECT_EQ(dict_of(read_npy(out / "L00.q_nope.npy")),
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }");
  const Npy logits = read_npy(out / "logits.npy");
  EXPECT_EQ(dict_of(logits), "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }");
  EXPECT_EQ(logits.values, x);
  const Npy empty = read_npy(out / "empty.npy");
  EXPECT_EQ(dict_of(empty), "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }");
  EXPECT_TRUE(empty.values.empty());
}

TEST_F(TensorDumpTest, FirstAddWinsAndWantsTurnsFalse) {
  TensorDump dump(dir_.string());
  const std::vector<float> x = {1, 2};
  EXPECT_TRUE(dump.wants("latent", 1));
  dump.add("latent", 1, x.data(), {2});
  EXPECT_FALSE(dump.wants("latent", 1));
  EXPECT_TRUE(dump.wants("latent", 2));
  EXPECT_TRUE(dump.wants("latent", -1));
  try {
    dump.add("latent", 1, x.data(), {2});
    ADD_FAILURE() << "a second add of one tensor must throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
    EXPECT_THAT(e.what(), HasSubstr("L01.latent.npy"));
  }
  EXPECT_THAT(dump.files(), ElementsAre("L01.latent.npy"));
}

TEST_F(TensorDumpTest, FilterSelectsNamesAndLayers) {
  TensorDump dump(dir_.string(), {.names = {"q_rope", "logits"}, .layers = {2}});
  EXPECT_TRUE(dump.wants("q_rope", 2));
  EXPECT_FALSE(dump.wants("q_rope", 1));
  EXPECT_FALSE(dump.wants("q_nope", 2));
  EXPECT_TRUE(dump.wants("logits", -1));  // layers select per-layer tensors only
  EXPECT_FALSE(dump.wants("final_norm", -1));
  const std::vector<float> x = {1, 2};
  for (int64_t layer : {0, 1, 2, 3}) {
    dump.add("q_rope", layer, x.data(), {2});
    dump.add("q_nope", layer, x.data(), {2});
  }
  dump.add("final_norm", -1, x.data(), {2});
  dump.add("logits", -1, x.data(), {2});
  EXPECT_THAT(dump.files(), ElementsAre("L02.q_rope.npy", "logits.npy"));
  std::vector<std::string> on_disk;
  for (const auto& e : fs::directory_iterator(dir_)) on_disk.push_back(e.path().filename());
  std::sort(on_disk.begin(), on_disk.end());
  EXPECT_THAT(on_disk, ElementsAre("L02.q_rope.npy", "logits.npy"));

  TensorDump layers_only((dir_ / "layers").string(), {.names = {}, .layers = {0}});
  EXPECT_TRUE(layers_only.wants("ffn_out", 0));
  EXPECT_FALSE(layers_only.wants("ffn_out", 1));
  EXPECT_TRUE(layers_only.wants("logits", -1));
}

TEST_F(TensorDumpTest, RefusesBadNamesLayersAndShapes) {
  TensorDump dump(dir_.string());
  const std::vector<float> x = {1, 2};
  for (const char* name : {"", "Attn", "attn-out", "a.b", "../x", "q rope", "a/b"}) {
    try {
      dump.add(name, 0, x.data(), {2});
      ADD_FAILURE() << "name '" << name << "' must be refused";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << name;
      EXPECT_THAT(e.what(), HasSubstr("'" + std::string(name) + "'"));
    }
    EXPECT_THROW(dump.wants(name, 0), Error) << name;
  }
  EXPECT_THROW(dump.add("x", -2, x.data(), {2}), Error);
  EXPECT_THROW(dump.add("x", 0, x.data(), {2, -1}), Error);
  EXPECT_THROW(dump.add("x", 0, nullptr, {2}), Error);
  EXPECT_TRUE(dump.files().empty());
  EXPECT_THROW(TensorDump((dir_ / "f").string(), {.names = {"Bad"}, .layers = {}}), Error);
  EXPECT_THROW(TensorDump((dir_ / "f").string(), {.names = {}, .layers = {-1}}), Error);
}

TEST_F(TensorDumpTest, RefusesADirectoryItCannotUse) {
  fs::create_directories(dir_);
  const fs::path file = dir_ / "file";
  std::ofstream(file) << "x";
  for (const fs::path& bad : {file, file / "sub"}) {
    try {
      TensorDump dump(bad.string());
      ADD_FAILURE() << bad << " must be refused";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << bad;
      EXPECT_THAT(e.what(), HasSubstr(bad.string()));
    }
  }
  // A stale dump in the directory would be compared as if it were this run's.
  const fs::path stale = dir_ / "stale";
  fs::create_directories(stale);
  std::ofstream(stale / "notes.txt") << "other files are fine";
  EXPECT_NO_THROW(TensorDump(stale.string()));
  std::ofstream(stale / "L00.attn_norm.npy") << "old";
  try {
    TensorDump dump(stale.string());
    ADD_FAILURE() << "a directory with .npy files must be refused";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
    EXPECT_THAT(e.what(), HasSubstr(stale.string()));
  }
}

}  // namespace
}  // namespace mla
