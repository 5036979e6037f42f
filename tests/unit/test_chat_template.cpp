// Chat templates against transformers: every conversation of
// tests/data/tokenizers/{v3,r1,v2}/chat_cases.json (DeepSeek-V3's, R1's and V2's published
// templates; with and without a system message, multi-turn, reasoning, tool calls, odd text;
// with and without the generation prompt) must render to the text apply_chat_template made
// and encode to its ids, or be refused where transformers refused it. The small templates of
// tests/data/tokenizers/jinja_cases.json cover the rest of the Jinja the engine implements
// (runtime/jinja.h): each must render exactly as transformers' environment did, or fail where
// it failed. tests/parity/make_tokenizers.py made both.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "kernels/error.h"
#include "runtime/jinja.h"
#include "runtime/tokenizer.h"

namespace mla {
namespace {

using testing::HasSubstr;

std::string data_dir(const std::string& name) {
  return std::string(MLA_TEST_DATA_DIR) + "/tokenizers/" + name;
}

nlohmann::ordered_json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::ordered_json::parse(in);
}

class ChatTemplateParity : public testing::TestWithParam<std::string> {};

TEST_P(ChatTemplateParity, RendersAndEncodesAsTransformers) {
  const Tokenizer tok = Tokenizer::load(data_dir(GetParam()));
  ASSERT_NE(tok.chat_template(), nullptr);
  const auto data = read_json(data_dir(GetParam()) + "/chat_cases.json");
  int rendered = 0, refused = 0;
  for (const auto& c : data["cases"]) {
    const std::string what =
        c["name"].get<std::string>() + (c["add_generation_prompt"].get<bool>() ? " +gen" : "");
    const bool gen = c["add_generation_prompt"].get<bool>();
    if (c.contains("error")) {
      EXPECT_THROW(tok.chat_template()->render(c["messages"], gen), Error) << what;
      ++refused;
      continue;
    }
    std::string text;
    ASSERT_NO_THROW(text = tok.chat_template()->render(c["messages"], gen)) << what;
    EXPECT_EQ(text, c["text"].get<std::string>()) << what;
    EXPECT_EQ(tok.encode(text, false), c["ids"].get<std::vector<int32_t>>()) << what;
    ++rendered;
  }
  EXPECT_GE(rendered, 20);
  if (GetParam() == "v2") EXPECT_GE(refused, 2);  // its template cannot take tool calls
}

INSTANTIATE_TEST_SUITE_P(DeepSeek, ChatTemplateParity, testing::Values("v3", "r1", "v2"));

TEST(Jinja, RendersAsTransformersEnvironment) {
  const auto data = read_json(data_dir("jinja_cases.json"));
  int checked = 0;
  for (const auto& c : data["cases"]) {
    const std::string source = c["template"].get<std::string>();
    if (c.contains("error")) {
      EXPECT_THROW(jinja::Template::parse(source).render(data["context"]), Error) << source;
    } else {
      std::string out;
      ASSERT_NO_THROW(out = jinja::Template::parse(source).render(data["context"])) << source;
      EXPECT_EQ(out, c["output"].get<std::string>()) << source;
    }
    ++checked;
  }
  EXPECT_GE(checked, 30);
}

TEST(Jinja, RaiseExceptionKeepsTheTemplatesWords) {
  const auto t = jinja::Template::parse("{{ raise_exception('roles must alternate') }}");
  try {
    t.render(nlohmann::ordered_json::object());
    FAIL() << "rendered";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_STREQ(e.what(), "roles must alternate");
  }
}

TEST(Jinja, RefusesWhatItDoesNotSupportNamingTheLine) {
  for (const char* source : {"a\n{% include 'x' %}", "a\n{{ 1 +  }}", "{% if x %}open",
                             "{{ 'unterminated }}", "a\n\n{{ x | no_such_filter }}"}) {
    try {
      jinja::Template::parse(source).render(nlohmann::ordered_json{{"x", 1}});
      ADD_FAILURE() << source << " was accepted";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("line ")) << source;
    }
  }
}

TEST(ChatTemplate, ATokenizerWithoutOneHasNone) {
  const std::string tokenizer_json = [] {
    std::ifstream in(data_dir("v3") + "/tokenizer.json");
    return std::string(std::istreambuf_iterator<char>(in), {});
  }();
  const Tokenizer tok = Tokenizer::parse(tokenizer_json, R"({"bos_token": "x"})", "test");
  EXPECT_EQ(tok.chat_template(), nullptr);
  EXPECT_THROW(Tokenizer::parse(tokenizer_json, R"({"chat_template": 3})", "test"), Error);
  try {
    Tokenizer::parse(tokenizer_json, R"({"chat_template": "{% for %}"})", "cfg");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("chat_template: line 1"));
  }
}

}  // namespace
}  // namespace mla
