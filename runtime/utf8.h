// UTF-8 helpers for the tokenizer and the streamed text: encoding a code point, finding
// well-formed sequences, and making bytes valid UTF-8 the way Rust's from_utf8_lossy does
// (Unicode's recommended practice: one U+FFFD per maximal invalid subsequence), which is what
// Hugging Face `tokenizers` produces when it decodes. Pure functions; thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace mla::utf8 {

inline constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// The UTF-8 bytes of code point `cp` (< 0x110000).
std::string encode(uint32_t cp);
// The length (1 to 4) of the well-formed sequence starting at s[i], or 0 when none starts
// there; then *bad gets the length of the maximal subpart one U+FFFD replaces. A subpart that
// reaches the end of `s` may be the start of a character still to come (*incomplete true).
size_t sequence(std::string_view s, size_t i, size_t* bad, bool* incomplete = nullptr);
// The code point of the well-formed sequence of `len` bytes at s[i].
uint32_t code_point(std::string_view s, size_t i, size_t len);
// `s` with every maximal invalid subsequence replaced by U+FFFD.
std::string lossy(std::string_view s);
// The offset of the first byte of `s` that does not start a well-formed sequence, or npos.
size_t first_invalid(std::string_view s);

}  // namespace mla::utf8
