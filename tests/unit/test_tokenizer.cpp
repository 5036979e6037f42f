// Tokenizer against Hugging Face `tokenizers`: every string of the corpus in
// tests/data/tokenizers/{v3,v2}/cases.json (multilingual text, CJK, emoji and ZWJ sequences,
// code, whitespace runs, digits, special tokens, ids that are not UTF-8 alone) must encode to
// the ids `tokenizers` produced, with and without special tokens, and decode to its text, with
// and without special tokens; bad input and unsupported files are refused naming the problem.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "kernels/error.h"
#include "runtime/tiny_checkpoint.h"
#include "runtime/tokenizer.h"

namespace mla {
namespace {

using testing::HasSubstr;

std::string data_dir(const std::string& name) {
  return std::string(MLA_TEST_DATA_DIR) + "/tokenizers/" + name;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

class TokenizerParity : public testing::TestWithParam<std::string> {};

TEST_P(TokenizerParity, EncodesAndDecodesAsHuggingFaceTokenizers) {
  const Tokenizer tok = Tokenizer::load(data_dir(GetParam()));
  const nlohmann::json data = read_json(data_dir(GetParam()) + "/cases.json");
  EXPECT_EQ(tok.vocab_size(), data["vocab_size"].get<int32_t>());
  int checked = 0;
  for (const auto& c : data["cases"]) {
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    const auto with_special = c["ids_with_special"].get<std::vector<int32_t>>();
    const std::string what = c["text"].is_null() ? "ids " + c["ids"].dump() : c["text"].dump();
    if (!c["text"].is_null()) {
      const std::string text = c["text"].get<std::string>();
      EXPECT_EQ(tok.encode(text, false), ids) << what;
      EXPECT_EQ(tok.encode(text, true), with_special) << what;
    }
    EXPECT_EQ(tok.decode(with_special, false), c["decoded"].get<std::string>()) << what;
    EXPECT_EQ(tok.decode(with_special, true), c["decoded_skip_special"].get<std::string>()) << what;
    ++checked;
  }
  EXPECT_GT(checked, 80);
}

INSTANTIATE_TEST_SUITE_P(DeepSeek, TokenizerParity, testing::Values("v3", "v2"));

TEST(Tokenizer, ConfigNamesBosAndEos) {
  const Tokenizer tok = Tokenizer::load(data_dir("v3"));
  ASSERT_TRUE(tok.bos_id().has_value());
  ASSERT_TRUE(tok.eos_id().has_value());
  EXPECT_EQ(tok.token_id("<｜begin▁of▁sentence｜>"), tok.bos_id());
  EXPECT_EQ(tok.token_id("<｜end▁of▁sentence｜>"), tok.eos_id());
  EXPECT_TRUE(tok.is_special(*tok.bos_id()));
  EXPECT_EQ(tok.encode("", true), std::vector<int32_t>{*tok.bos_id()});
}

TEST(Tokenizer, BadInputIsRefusedNamingTheProblem) {
  const Tokenizer tok = Tokenizer::load(data_dir("v3"));
  auto message = [](const std::function<void()>& fn, ErrorCode code) {
    try {
      fn();
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), code) << e.what();
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(message([&] { tok.encode("ok \xC3\x28 no"); }, ErrorCode::kInvalidArgument),
              HasSubstr("not UTF-8 at byte 3"));
  EXPECT_THAT(message([&] { tok.encode("\xF0\x9F\x98"); }, ErrorCode::kInvalidArgument),
              HasSubstr("not UTF-8 at byte 0"));
  // Ids without a token (a model's padded vocabulary) add nothing, as in `tokenizers`.
  const std::vector<int32_t> hello = tok.encode("Hello", false);
  std::vector<int32_t> padded = {-1, tok.vocab_size()};
  padded.insert(padded.end(), hello.begin(), hello.end());
  padded.push_back(tok.vocab_size() + 1000);
  EXPECT_EQ(tok.decode(padded), "Hello");
  EXPECT_THAT(message([] { Tokenizer::load("/nonexistent"); }, ErrorCode::kNotFound),
              HasSubstr("tokenizer.json not found"));

  // What the tokenizer cannot reproduce exactly is refused at load time, naming the field.
  nlohmann::json t = read_json(data_dir("v3") + "/tokenizer.json");
  auto refused = [&](nlohmann::json changed) {
    return message([&] { Tokenizer::parse(changed.dump(), "", "t.json"); },
                   ErrorCode::kInvalidArgument);
  };
  nlohmann::json nfc = t;
  nfc["normalizer"] = {{"type", "NFC"}};
  EXPECT_THAT(refused(nfc), HasSubstr("t.json: normalizer"));
  nlohmann::json merged = t;
  merged["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithPrevious";
  EXPECT_THAT(refused(merged), HasSubstr("pre_tokenizer[0].behavior"));
  nlohmann::json bad_regex = t;
  bad_regex["pre_tokenizer"]["pretokenizers"][1]["pattern"]["Regex"] = "[a-";
  EXPECT_THAT(refused(bad_regex), HasSubstr("pre_tokenizer[1]: regex does not compile"));
  nlohmann::json wordpiece = t;
  wordpiece["model"]["type"] = "WordPiece";
  EXPECT_THAT(refused(wordpiece), HasSubstr("model.type"));
  nlohmann::json strip = t;
  strip["added_tokens"][0]["lstrip"] = true;
  EXPECT_THAT(refused(strip), HasSubstr(".lstrip: must be false"));
  EXPECT_THAT(refused("not json"), HasSubstr("t.json"));
}

// make-tiny's tokenizer: every byte one token, bos and eos at the config's ids; text round
// trips through it, whatever the script.
TEST(Tokenizer, MakeTinyWritesAByteLevelTokenizerThatRoundTripsText) {
  const std::string dir = testing::TempDir() + "/tiny_tokenizer";
  std::filesystem::create_directories(dir);
  ModelConfig config = model_preset("v3");
  ASSERT_TRUE(write_byte_level_tokenizer(config, dir));
  const Tokenizer tok = Tokenizer::load(dir);
  EXPECT_EQ(tok.bos_id(), 0);
  EXPECT_EQ(tok.eos_id(), config.eos_token_ids[0]);
  EXPECT_LE(tok.vocab_size(), config.vocab_size);
  const std::string text = "Hello, wörld! 深度求索 😀 x=1234\n\ttab";
  const std::vector<int32_t> ids = tok.encode(text);
  EXPECT_EQ(ids.front(), 0);
  EXPECT_EQ(ids.size(), 1 + text.size()) << "one token per byte";
  EXPECT_EQ(tok.decode(ids, true), text);
  EXPECT_EQ(tok.encode("<｜User｜>hi", false).size(), 3u);
  // DeepSeek-V3's chat template, as the test tokenizer made by transformers carries it.
  ASSERT_NE(tok.chat_template(), nullptr);
  const Tokenizer v3 = Tokenizer::load(data_dir("v3"));
  const auto chat = nlohmann::ordered_json::parse(
      R"([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])");
  EXPECT_EQ(tok.chat_template()->render(chat, true), v3.chat_template()->render(chat, true));
  EXPECT_EQ(tok.chat_template()->render(chat, true),
            "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>");
  config.vocab_size = 200;
  EXPECT_FALSE(write_byte_level_tokenizer(config, testing::TempDir() + "/no_tokenizer"));
}

}  // namespace
}  // namespace mla
