// Text in, text out through the coordinator (GenerateRequest.prompt and stop, the responses'
// text): a cluster of two TP1 groups serving a make-tiny model with its tokenizer, the
// coordinator given that tokenizer. A text prompt generates the offline engine's tokens for
// the tokenizer's ids, and the streamed text is their decoded text in whole characters; a stop
// string ends the stream before it (finish STOP, the worker stops); `mlaserve client --prompt`
// prints the text; a conversation (GenerateRequest.messages, `mlaserve client --chat`) is
// rendered with the model's chat template and answered as the offline engine answers its ids;
// bad text fields are INVALID_ARGUMENT naming the field, and a coordinator without a tokenizer
// refuses text with FAILED_PRECONDITION.
#include "runtime/text_stream.h"
#include "runtime/tiny_checkpoint.h"
#include "runtime/tokenizer.h"
#include "runtime/utf8.h"
#include "tests/e2e/cluster_fixture.h"

namespace mla::e2e {
namespace {

class TextTest : public ClusterTest {
 protected:
  void SetUp() override {
    ClusterTest::SetUp();
    tp_ = 1;
    model_ = dir_ + "/tiny";
    write_random_checkpoint(model_preset("v3"), model_, 5);
    coordinator_extra_ = {"--tokenizer", model_};
  }

  // The offline engine's tokens for a prompt of `ids`.
  Tokens offline(const std::vector<int32_t>& ids, int32_t max_tokens) {
    ModelOptions o;
    o.show_progress = false;
    Engine engine(DeepseekModel::load(model_, o), EngineOptions{});
    Request r;
    r.prompt = ids;
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    const RequestId id = engine.add_request(r);
    Tokens out;
    while (engine.has_work()) {
      for (const StepOutput& s : engine.step()) {
        if (s.id == id && s.token >= 0) out.push_back(s.token);
      }
    }
    return out;
  }

  static v1::GenerateRequest text_request(const std::string& prompt, int32_t max_tokens) {
    v1::GenerateRequest r;
    r.set_prompt(prompt);
    r.set_max_tokens(max_tokens);
    r.set_ignore_eos(true);
    return r;
  }
};

TEST_F(TextTest, ATextPromptStreamsTheOfflineTokensAsTextAndStopsAtAStopString) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  const Tokenizer tok = Tokenizer::load(model_);
  const std::string prompt = "Hello, 世界! ";
  const Tokens expected = offline(tok.encode(prompt), 40);
  const std::string text = tok.decode(expected, true);
  ASSERT_GE(text.size(), 4u) << "the random model's text is too short to cut a stop string from";

  std::vector<std::string> pieces;
  const Stream whole =
      run_stream(client(), text_request(prompt, 40), kStreamDeadline,
                 [&](const v1::GenerateResponse& m) { pieces.push_back(m.text()); });
  ASSERT_TRUE(whole.ok) << whole.error;
  EXPECT_EQ(whole.result.tokens, expected);
  EXPECT_EQ(whole.result.text, text);
  EXPECT_EQ(whole.result.usage.prompt_tokens(), static_cast<int>(tok.encode(prompt).size()));
  for (const std::string& p : pieces) EXPECT_EQ(utf8::first_invalid(p), std::string::npos) << p;

  // A stop string from the middle of the text: the stream ends before it.
  const size_t at = text.size() / 2;
  std::string stop = text.substr(at, 2);
  while (utf8::first_invalid(stop) != std::string::npos) stop = text.substr(at, stop.size() + 1);
  v1::GenerateRequest stopping = text_request(prompt, 40);
  stopping.add_stop(stop);
  const Stream cut = run_stream(client(), stopping);
  ASSERT_TRUE(cut.ok) << cut.error;
  EXPECT_EQ(cut.result.finish, v1::FINISH_REASON_STOP);
  EXPECT_EQ(cut.result.text, text.substr(0, text.find(stop))) << "stop '" << stop << "'";
  EXPECT_LT(cut.result.tokens.size(), expected.size());

  // The CLI prints the text as it comes.
  const CommandResult cli =
      run_command({MLASERVE_BIN, "--log-level", "warn", "client", "--address", address(),
                   "--prompt", prompt, "--max-tokens", "40", "--ignore-eos"},
                  dir_ + "/client.log");
  EXPECT_EQ(cli.exit, "exit 0") << cli.output;
  EXPECT_THAT(cli.output, HasSubstr(text)) << cli.output;

  // Bad text fields, named.
  v1::GenerateRequest both = text_request(prompt, 4);
  both.add_prompt_ids(1);
  const Stream b = run_stream(client(), both);
  EXPECT_EQ(b.error_code, ErrorCode::kInvalidArgument);
  EXPECT_THAT(b.error, HasSubstr("prompt: give one of prompt, prompt_ids and messages"));
  const Stream bad = run_stream(client(), text_request("caf\xC3", 4));
  EXPECT_EQ(bad.error_code, ErrorCode::kInvalidArgument);
  EXPECT_THAT(bad.error, HasSubstr("prompt: text is not UTF-8 at byte 3"));
  v1::GenerateRequest empty_stop = text_request(prompt, 4);
  empty_stop.add_stop("");
  const Stream es = run_stream(client(), empty_stop);
  EXPECT_EQ(es.error_code, ErrorCode::kInvalidArgument);
  EXPECT_THAT(es.error, HasSubstr("stop[0]"));
}

TEST_F(TextTest, AConversationIsRenderedWithTheChatTemplateAndAnsweredAsText) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  const Tokenizer tok = Tokenizer::load(model_);
  const auto messages = nlohmann::ordered_json::parse(R"([
      {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "深度求索?"}])");
  const std::vector<int32_t> ids = tok.encode_chat(messages);
  const Tokens expected = offline(ids, 24);
  v1::GenerateRequest chat;
  for (const auto& m : messages) {
    auto* added = chat.add_messages();
    added->set_role(m["role"].get<std::string>());
    added->set_content(m["content"].get<std::string>());
  }
  chat.set_max_tokens(24);
  chat.set_ignore_eos(true);
  const Stream s = run_stream(client(), chat);
  ASSERT_TRUE(s.ok) << s.error;
  EXPECT_EQ(s.result.usage.prompt_tokens(), static_cast<int>(ids.size()));
  EXPECT_EQ(s.result.tokens, expected);
  EXPECT_EQ(s.result.text, tok.decode(expected, true));

  // `mlaserve client --chat` renders the same conversation.
  const CommandResult cli =
      run_command({MLASERVE_BIN, "--log-level", "warn", "client", "--address", address(),
                   "--system", "Be brief.", "--chat", "Hi", "--chat", "Hello!", "--chat",
                   "深度求索?", "--max-tokens", "24", "--ignore-eos"},
                  dir_ + "/client.log");
  EXPECT_EQ(cli.exit, "exit 0") << cli.output;
  EXPECT_THAT(cli.output, HasSubstr(tok.decode(expected, true))) << cli.output;
  EXPECT_THAT(cli.output, HasSubstr(fmt::format("{} prompt + 24 generated", ids.size())));

  // Content that is not UTF-8 and a conversation beside a prompt are refused, naming the
  // field.
  v1::GenerateRequest bad = chat;
  bad.mutable_messages(1)->set_content("caf\xC3");
  const Stream b = run_stream(client(), bad);
  EXPECT_EQ(b.error_code, ErrorCode::kInvalidArgument);
  EXPECT_THAT(b.error, HasSubstr("messages[1].content: not UTF-8"));
  v1::GenerateRequest both = chat;
  both.set_prompt("x");
  const Stream bo = run_stream(client(), both);
  EXPECT_EQ(bo.error_code, ErrorCode::kInvalidArgument);
  EXPECT_THAT(bo.error, HasSubstr("give one of prompt, prompt_ids and messages"));
}

TEST_F(TextTest, ACoordinatorWithoutATokenizerRefusesText) {
  coordinator_extra_ = {};
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  const Stream s = run_stream(client(), text_request("Hello", 4));
  EXPECT_EQ(s.error_code, ErrorCode::kFailedPrecondition);
  EXPECT_THAT(s.error, HasSubstr("no tokenizer"));
}

}  // namespace
}  // namespace mla::e2e
