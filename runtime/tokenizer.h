// Tokenizer: a checkpoint's Hugging Face tokenizer.json (byte-level BPE, as DeepSeek-V2, V3 and
// R1 ship it) with its tokenizer_config.json, encoding and decoding exactly as the `tokenizers`
// library does (tests/data/tokenizers holds what it produced; tests/parity/make_tokenizers.py
// made them).
//
//   encode: the text is cut at added tokens (leftmost, longest first; each is its own id);
//           every other span goes through the pre-tokenizer (each Split regex in order, its
//           matches isolated as pieces, then ByteLevel: every byte of a piece becomes one of
//           256 printable characters) and BPE (per piece, the adjacent pair of lowest merge
//           rank merges first, leftmost among equals); with special tokens, the
//           post-processor's template adds them (DeepSeek: the begin-of-sentence token first).
//   decode: added tokens give their text (special ones none with skip_special), the others
//           their byte-level characters mapped back to bytes; bytes that are not UTF-8 come
//           out as U+FFFD, one per maximal invalid subsequence (as Rust's from_utf8_lossy).
//
// Supported: no normalizer (or an empty Sequence), Split pre-tokenizers with a Regex or String
// pattern and behavior Isolated (not inverted), ByteLevel without prefix space (with or without
// its own GPT-2 regex), a BPE model without dropout, byte fallback or subword affixes, added
// tokens without lstrip/rstrip/single_word, and TemplateProcessing or no post-processor.
// Anything else is refused when loading, naming the field. Regexes run on PCRE2 (UTF and
// Unicode properties), which agrees with the Oniguruma engine `tokenizers` uses on these
// patterns (the test data covers the cases where engines could differ).
//
// Immutable after loading; thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/chat_template.h"

namespace mla {

class Tokenizer {
 public:
  // Reads DIR/tokenizer.json and, if present, DIR/tokenizer_config.json. Throws kNotFound
  // without tokenizer.json, kInvalidArgument for what is malformed or not supported (naming
  // the field).
  static Tokenizer load(const std::string& dir);
  // The same from the files' contents (`config_json` may be empty).
  static Tokenizer parse(const std::string& tokenizer_json, const std::string& config_json,
                         const std::string& origin);

  // The ids of `text` (UTF-8; throws kInvalidArgument naming the byte offset where it is not).
  // With add_special_tokens, the post-processor's tokens too.
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  // The text of `ids`. An id without a token (a model's vocabulary may be larger than its
  // tokenizer's, e.g. padded) contributes nothing, as in `tokenizers`.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;
  // The bytes one token stands for (not necessarily UTF-8 on its own: a character may span
  // tokens; empty for an id without a token); decode() is the concatenation of these, made
  // valid UTF-8. Computed once when loading.
  const std::string& token_bytes(int32_t id) const;
  // The character (UTF-8) of GPT-2's byte-level alphabet that stands for `byte` in a
  // byte-level vocabulary.
  static std::string byte_level_char(uint8_t byte);

  // Ids 0 .. vocab_size() - 1 (the model's and the added tokens).
  int32_t vocab_size() const;
  // tokenizer_config.json's bos_token and eos_token, when given and in the vocabulary.
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  // tokenizer_config.json's chat_template, or null when it has none. Encode its text with
  // add_special_tokens = false.
  const ChatTemplate* chat_template() const;
  // The ids of `messages` (a JSON array of {role, content}) under the chat template with the
  // generation prompt, as apply_chat_template(messages, tokenize=True,
  // add_generation_prompt=True). Throws kFailedPrecondition without a chat template and
  // kInvalidArgument ("messages: ...") when the template refuses the conversation.
  std::vector<int32_t> encode_chat(const nlohmann::ordered_json& messages) const;
  // Whether `id` is an added token marked special.
  bool is_special(int32_t id) const;
  // The id of a token's text (a vocabulary entry or an added token), if any.
  std::optional<int32_t> token_id(std::string_view token) const;

  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mla
