// TextStream: a request's generated tokens turned into text as they come, for streaming
// (issue 15): each push() returns the text that is final now. A character whose bytes span
// tokens is sent once it is whole; bytes that can never form one become U+FFFD as decode()
// makes them. With stop strings, text that could be the start of one is held back, and the
// stream ends before the first stop string found (matched on the text, across token
// boundaries; never sent). The pieces of a stream that did not stop concatenate to
// Tokenizer::decode of its tokens; of one that stopped, to that text cut before the stop
// string. One stream per request; not thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tokenizer.h"

namespace mla {

class TextStream {
 public:
  // `tokenizer` must outlive the stream. Empty stop strings are ignored.
  TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop,
             bool skip_special_tokens = true);

  // Takes the next token; returns the text final after it (may be empty; an id without a token
  // adds nothing). After stopped(), returns nothing.
  std::string push(int32_t id);
  // The end of the stream: the text still held back (an unfinished character as U+FFFD, text
  // that only might have started a stop string).
  std::string finish();
  // Whether a stop string was found; the request should end.
  bool stopped() const { return stopped_; }

 private:
  // Releases what of text_ is final: up to a stop string, or all but a suffix that may start
  // one.
  std::string release();

  const Tokenizer& tokenizer_;
  std::vector<std::string> stop_;
  size_t longest_stop_ = 0;
  bool skip_special_;
  std::string bytes_;  // token bytes not yet valid UTF-8 (an unfinished character)
  std::string text_;   // valid text not yet released
  bool stopped_ = false;
};

}  // namespace mla
