#include "runtime/chat_template.h"

#include "kernels/error.h"

namespace mla {

ChatTemplate ChatTemplate::parse(std::string_view source, nlohmann::ordered_json special_tokens) {
  try {
    return ChatTemplate(jinja::Template::parse(source), std::move(special_tokens));
  } catch (const Error& e) {
    MLA_THROW(kInvalidArgument, "chat_template: {}", e.what());
  }
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages,
                                 bool add_generation_prompt) const {
  MLA_REQUIRE(messages.is_array(), "messages: expected an array");
  nlohmann::ordered_json context = special_tokens_;
  context["messages"] = messages;
  context["tools"] = nullptr;
  context["documents"] = nullptr;
  context["add_generation_prompt"] = add_generation_prompt;
  return template_.render(context);
}

}  // namespace mla
