// TextStream: streamed text equals Tokenizer::decode of the same tokens, piece by piece valid
// UTF-8 (a character split across tokens comes out whole), and stop strings (across token
// boundaries) end the stream before them, never sent; checked on every case of
// tests/data/tokenizers/v3/cases.json and on random stop strings cut from their text.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>

#include "kernels/error.h"
#include "runtime/text_stream.h"
#include "runtime/tokenizer.h"
#include "runtime/utf8.h"

namespace mla {
namespace {

const Tokenizer& tokenizer() {
  static const Tokenizer t = Tokenizer::load(std::string(MLA_TEST_DATA_DIR) + "/tokenizers/v3");
  return t;
}

std::vector<std::vector<int32_t>> corpus_ids() {
  std::ifstream in(std::string(MLA_TEST_DATA_DIR) + "/tokenizers/v3/cases.json");
  const nlohmann::json data = nlohmann::json::parse(in);
  std::vector<std::vector<int32_t>> out;
  for (const auto& c : data["cases"]) out.push_back(c["ids_with_special"]);
  return out;
}

// Streams `ids`; returns the pieces, finish() last.
std::vector<std::string> stream(const std::vector<int32_t>& ids,
                                const std::vector<std::string>& stop, bool* stopped = nullptr) {
  TextStream s(tokenizer(), stop);
  std::vector<std::string> pieces;
  for (int32_t id : ids) pieces.push_back(s.push(id));
  pieces.push_back(s.finish());
  if (stopped) *stopped = s.stopped();
  return pieces;
}

std::string joined(const std::vector<std::string>& pieces) {
  std::string s;
  for (const std::string& p : pieces) s += p;
  return s;
}

TEST(TextStream, PiecesAreWholeCharactersAndAddUpToDecode) {
  int held_back = 0;
  for (const auto& ids : corpus_ids()) {
    const std::vector<std::string> pieces = stream(ids, {});
    EXPECT_EQ(joined(pieces), tokenizer().decode(ids, /*skip_special_tokens=*/true));
    for (size_t i = 0; i + 1 < pieces.size(); ++i) {
      EXPECT_EQ(utf8::first_invalid(pieces[i]), std::string::npos) << "piece " << i;
      // A token whose bytes did not finish a character gave no text.
      const std::string bytes = tokenizer().token_bytes(ids[i]);
      held_back += pieces[i].empty() && !bytes.empty() && !tokenizer().is_special(ids[i]);
    }
  }
  EXPECT_GT(held_back, 0) << "no character of the corpus spanned tokens";
}

TEST(TextStream, StopStringsEndTheStreamBeforeThemAcrossTokens) {
  std::mt19937 rng(5);
  int stopped_count = 0, across = 0;
  for (const auto& ids : corpus_ids()) {
    const std::string text = tokenizer().decode(ids, true);
    if (text.size() < 4 || utf8::first_invalid(text) != std::string::npos) continue;
    // A stop string cut from the text (on character boundaries), and one that never occurs.
    size_t a = rng() % (text.size() - 1), len = 1 + rng() % std::min<size_t>(6, text.size() - a);
    while (a > 0 && (static_cast<uint8_t>(text[a]) & 0xC0) == 0x80) --a;
    while (a + len < text.size() && (static_cast<uint8_t>(text[a + len]) & 0xC0) == 0x80) ++len;
    const std::string stop = text.substr(a, len);
    bool stopped = false;
    const std::vector<std::string> pieces = stream(ids, {"\x01never", stop}, &stopped);
    EXPECT_TRUE(stopped) << stop;
    EXPECT_EQ(joined(pieces), text.substr(0, text.find(stop))) << "stop '" << stop << "'";
    ++stopped_count;
    // Whether the stop string spans tokens: no token's bytes hold it whole.
    bool inside_one = false;
    for (int32_t id : ids)
      inside_one = inside_one || tokenizer().token_bytes(id).find(stop) != std::string::npos;
    across += !inside_one;
  }
  EXPECT_GT(stopped_count, 100);
  EXPECT_GT(across, 20);
}

TEST(TextStream, TextThatMightStartAStopStringWaitsAndComesAtTheEnd) {
  const std::vector<int32_t> ids = tokenizer().encode("Hello, world", false);
  bool stopped = true;
  const std::vector<std::string> pieces = stream(ids, {"world!", ""}, &stopped);
  EXPECT_FALSE(stopped);
  EXPECT_EQ(joined(pieces), "Hello, world");
  EXPECT_EQ(pieces.back().find("world"), 0u) << "'world' was held back until the end";
  TextStream s(tokenizer(), {});
  EXPECT_EQ(s.push(tokenizer().vocab_size()), "") << "an id without a token adds nothing";
}

}  // namespace
}  // namespace mla
