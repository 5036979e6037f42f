#include "runtime/text_stream.h"

#include <algorithm>
#include <utility>

#include "runtime/utf8.h"

namespace mla {

TextStream::TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop,
                       bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {
  for (std::string& s : stop) {
    if (s.empty()) continue;
    longest_stop_ = std::max(longest_stop_, s.size());
    stop_.push_back(std::move(s));
  }
}

std::string TextStream::push(int32_t id) {
  if (stopped_ || (skip_special_ && tokenizer_.is_special(id))) return {};
  bytes_ += tokenizer_.token_bytes(id);
  // Move what is settled to text_: whole characters, and U+FFFD for bytes that cannot become
  // one whatever follows; an unfinished character at the end waits.
  size_t i = 0;
  while (i < bytes_.size()) {
    size_t bad = 0;
    bool incomplete = false;
    const size_t len = utf8::sequence(bytes_, i, &bad, &incomplete);
    if (len > 0) {
      text_.append(bytes_, i, len);
      i += len;
    } else if (incomplete) {
      break;
    } else {
      text_ += utf8::kReplacement;
      i += bad;
    }
  }
  bytes_.erase(0, i);
  return release();
}

std::string TextStream::release() {
  if (stop_.empty()) return std::exchange(text_, {});
  // The earliest stop string in the text held (nothing released can be part of one).
  size_t cut = std::string::npos;
  for (const std::string& s : stop_) cut = std::min(cut, text_.find(s));
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string out = text_.substr(0, cut);
    text_.clear();
    bytes_.clear();
    return out;
  }
  // Hold back the longest suffix that is the start of a stop string.
  size_t hold = 0;
  for (size_t n = std::min(text_.size(), longest_stop_ - 1); n > 0 && hold == 0; --n) {
    for (const std::string& s : stop_) {
      if (n < s.size() && text_.compare(text_.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
    }
  }
  std::string out = text_.substr(0, text_.size() - hold);
  text_.erase(0, text_.size() - hold);
  return out;
}

std::string TextStream::finish() {
  if (stopped_) return {};
  std::string out = std::exchange(text_, {}) + utf8::lossy(bytes_);
  bytes_.clear();
  return out;
}

}  // namespace mla
