// ChatTemplate: a checkpoint's chat_template (tokenizer_config.json) applied to a conversation
// as transformers' apply_chat_template(messages, add_generation_prompt=...) does: the Jinja
// template (runtime/jinja.h) rendered with `messages`, `tools` and `documents` (none),
// `add_generation_prompt` and the tokenizer's named special tokens (bos_token, eos_token,
// unk_token, sep_token, pad_token, cls_token, mask_token: those the config names) as strings.
// The text is then encoded without adding special tokens (the template writes them), as
// transformers does when it tokenizes a chat. tests/data/tokenizers/*/chat_cases.json hold what
// transformers produced for DeepSeek-V3's, R1's and V2's published templates.
//
// Immutable; thread-safe.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "runtime/jinja.h"

namespace mla {

class ChatTemplate {
 public:
  // `source`: the template's text; `special_tokens`: an object of the named special tokens'
  // strings. Throws kInvalidArgument ("chat_template: line N: ...") for what the template
  // engine does not support.
  static ChatTemplate parse(std::string_view source, nlohmann::ordered_json special_tokens);

  // The prompt text for `messages` (an array of objects with at least `role`). Throws
  // kInvalidArgument with the template's own message when it refuses the conversation
  // (raise_exception) or cannot render it (naming the line).
  std::string render(const nlohmann::ordered_json& messages, bool add_generation_prompt) const;

 private:
  ChatTemplate(jinja::Template t, nlohmann::ordered_json special_tokens)
      : template_(std::move(t)), special_tokens_(std::move(special_tokens)) {}
  jinja::Template template_;
  nlohmann::ordered_json special_tokens_;
};

}  // namespace mla
