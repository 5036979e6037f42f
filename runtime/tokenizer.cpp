#include "runtime/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "kernels/error.h"
#include "runtime/utf8.h"

namespace mla {
namespace {

using json = nlohmann::json;

// GPT-2's table of 256 printable characters standing for the bytes.
struct ByteLevelTable {
  std::array<uint32_t, 256> char_of{};
  std::unordered_map<uint32_t, uint8_t> byte_of;
};

const ByteLevelTable& byte_level() {
  static const ByteLevelTable table = [] {
    ByteLevelTable t;
    std::array<bool, 256> printable{};
    for (int b = '!'; b <= '~'; ++b) printable[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      t.char_of[b] = printable[b] ? static_cast<uint32_t>(b) : next++;
      t.byte_of[t.char_of[b]] = static_cast<uint8_t>(b);
    }
    return t;
  }();
  return table;
}

// The bytes a token's text stands for: every character of the byte-level alphabet becomes its
// byte; other characters (in added tokens) stay as they are.
std::string bytes_of_token(const std::string& token) {
  const ByteLevelTable& table = byte_level();
  std::string bytes;
  for (size_t i = 0; i < token.size();) {
    size_t bad = 0;
    const size_t len = std::max<size_t>(1, utf8::sequence(token, i, &bad));
    auto it = table.byte_of.find(utf8::code_point(token, i, len));
    if (it != table.byte_of.end()) {
      bytes += static_cast<char>(it->second);
    } else {
      bytes.append(token, i, len);
    }
    i += len;
  }
  return bytes;
}

// A compiled PCRE2 pattern (UTF, Unicode properties). Thread-safe: each search has its own
// match data.
class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& field) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    const uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     options, &error, &offset, nullptr);
    if (code == nullptr) {
      std::array<PCRE2_UCHAR, 256> message{};
      pcre2_get_error_message(error, message.data(), message.size());
      MLA_THROW(kInvalidArgument, "{}: regex does not compile at offset {}: {}", field, offset,
                reinterpret_cast<const char*>(message.data()));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // an interpreter run when JIT is unavailable
    code_.reset(code, pcre2_code_free);
  }

  // Calls fn(begin, end) for each non-empty match in `s`, left to right.
  void for_each_match(std::string_view s, const std::function<void(size_t, size_t)>& fn) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr), pcre2_match_data_free);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t start = 0;
    while (start < s.size()) {
      const int rc =
          pcre2_match(code_.get(), subject, s.size(), start, PCRE2_NOTEMPTY, data.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) return;
      MLA_CHECK(rc > 0, "regex search failed with PCRE2 error {}", rc);
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(data.get());
      fn(ov[0], ov[1]);
      start = ov[1];
    }
  }

 private:
  std::shared_ptr<pcre2_code> code_;
};

// The pieces of `s` a Split pre-tokenizer with behavior Isolated makes: every match, and
// every stretch between matches.
void split_isolated(const Regex& re, std::string_view s, std::vector<std::string_view>& out) {
  size_t last = 0;
  re.for_each_match(s, [&](size_t begin, size_t end) {
    if (begin > last) out.push_back(s.substr(last, begin - last));
    out.push_back(s.substr(begin, end - begin));
    last = end;
  });
  if (last < s.size()) out.push_back(s.substr(last));
}

// GPT-2's split, which ByteLevel applies itself when use_regex is true.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// A token named in tokenizer_config.json: a string, or an object with its `content`.
std::optional<std::string> config_token(const json& config, const char* key) {
  if (!config.contains(key) || config[key].is_null()) return std::nullopt;
  const json& v = config[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].get<std::string>();
  }
  return std::nullopt;
}

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

}  // namespace

struct Tokenizer::Impl {
  std::string origin;
  std::vector<Regex> splits;                     // the pre-tokenizer's, in order
  std::unordered_map<std::string, int32_t> ids;  // token text -> id (model and added)
  std::vector<std::string> bytes_of;             // id -> the bytes it stands for ("": none)
  std::array<int32_t, 256> byte_id{};            // id of each byte's character, -1 if none
  struct Merge {
    int32_t rank, id;
  };
  std::unordered_map<uint64_t, Merge> merges;  // (left id, right id) -> rank, merged id
  bool ignore_merges = false;
  struct Added {
    std::string content;
    int32_t id;
  };
  std::array<std::vector<Added>, 256> added_by_first_byte;  // longest first
  std::vector<uint8_t> special;                             // per id
  std::vector<int32_t> template_prefix, template_suffix;    // around the text's ids
  std::optional<int32_t> bos, eos;
  std::optional<ChatTemplate> chat_template;

  // BPE of one piece's bytes, appending the ids.
  void bpe(std::string_view piece, std::vector<int32_t>& out) const;
  // The ids of text without added tokens.
  void encode_span(std::string_view text, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::bpe(std::string_view piece, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    std::string chars;
    for (char c : piece) chars += byte_level_char(static_cast<uint8_t>(c));
    if (auto it = ids.find(chars); it != ids.end()) {
      out.push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int32_t id, prev, next;
  };
  std::vector<Symbol> syms;
  syms.reserve(piece.size());
  for (char c : piece) {
    // A byte without a token is dropped, as `tokenizers` does with no unk token.
    const int32_t id = byte_id[static_cast<uint8_t>(c)];
    if (id < 0) continue;
    const auto n = static_cast<int32_t>(syms.size());
    syms.push_back({id, n - 1, -1});
    if (n > 0) syms[n - 1].next = n;
  }
  // Lowest rank first, then leftmost: (rank, position, merged id).
  using Candidate = std::tuple<int32_t, int32_t, int32_t>;
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  auto consider = [&](int32_t left) {
    if (left < 0 || syms[left].next < 0) return;
    auto it = merges.find(pair_key(syms[left].id, syms[syms[left].next].id));
    if (it != merges.end()) queue.emplace(it->second.rank, left, it->second.id);
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) consider(i);
  while (!queue.empty()) {
    const auto [rank, left, merged] = queue.top();
    queue.pop();
    Symbol& l = syms[left];
    if (l.id < 0 || l.next < 0) continue;
    auto it = merges.find(pair_key(l.id, syms[l.next].id));
    if (it == merges.end() || it->second.rank != rank) continue;  // the pair changed since
    Symbol& r = syms[l.next];
    l.id = merged;
    r.id = -1;
    l.next = r.next;
    if (l.next >= 0) syms[l.next].prev = left;
    consider(l.prev);
    consider(left);
  }
  for (int32_t i = syms.empty() ? -1 : 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

void Tokenizer::Impl::encode_span(std::string_view text, std::vector<int32_t>& out) const {
  std::vector<std::string_view> pieces = {text}, next;
  for (const Regex& re : splits) {
    next.clear();
    for (std::string_view p : pieces) split_isolated(re, p, next);
    pieces.swap(next);
  }
  for (std::string_view p : pieces) bpe(p, out);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::load(const std::string& dir) {
  const std::filesystem::path path = std::filesystem::path(dir) / "tokenizer.json";
  if (!std::filesystem::is_regular_file(path)) {
    MLA_THROW(kNotFound, "{} not found (the model directory has no tokenizer)", path.string());
  }
  const std::filesystem::path config = std::filesystem::path(dir) / "tokenizer_config.json";
  return parse(read_file(path),
               std::filesystem::is_regular_file(config) ? read_file(config) : std::string(),
               path.string());
}

Tokenizer Tokenizer::parse(const std::string& tokenizer_json, const std::string& config_json,
                           const std::string& origin) {
  json t, config = json::object();
  try {
    t = json::parse(tokenizer_json);
    if (!config_json.empty()) config = json::parse(config_json);
  } catch (const json::exception& e) {
    MLA_THROW(kInvalidArgument, "{}: not valid JSON: {}", origin, e.what());
  }
  auto refuse = [&](const std::string& field, const std::string& what) {
    MLA_THROW(kInvalidArgument, "{}: {}: {}", origin, field, what);
  };
  auto impl = std::make_unique<Impl>();
  impl->origin = origin;

  // normalizer: none.
  if (t.contains("normalizer") && !t["normalizer"].is_null()) {
    const json& n = t["normalizer"];
    if (!(n.value("type", "") == "Sequence" && n.value("normalizers", json::array()).empty())) {
      refuse("normalizer", "only none is supported, got " + n.dump().substr(0, 80));
    }
  }

  // pre_tokenizer: Split (Isolated) ... then ByteLevel.
  if (!t.contains("pre_tokenizer") || !t["pre_tokenizer"].is_object()) {
    refuse("pre_tokenizer", "missing (a byte-level tokenizer needs ByteLevel)");
  }
  const json& pre = t["pre_tokenizer"];
  std::vector<json> steps;
  if (pre.value("type", "") == "Sequence") {
    for (const json& s : pre.value("pretokenizers", json::array())) steps.push_back(s);
  } else {
    steps.push_back(pre);
  }
  bool byte_level_seen = false;
  for (size_t i = 0; i < steps.size(); ++i) {
    const json& s = steps[i];
    const std::string field = fmt::format("pre_tokenizer[{}]", i);
    const std::string type = s.value("type", "");
    if (byte_level_seen) refuse(field, "nothing may follow ByteLevel");
    if (type == "Split") {
      if (s.value("behavior", "") != "Isolated") {
        refuse(field + ".behavior", "only Isolated is supported, got " + s.value("behavior", ""));
      }
      if (s.value("invert", false)) refuse(field + ".invert", "must be false");
      const json& pattern = s.value("pattern", json::object());
      if (pattern.contains("Regex")) {
        impl->splits.emplace_back(pattern["Regex"].get<std::string>(), false, field);
      } else if (pattern.contains("String")) {
        impl->splits.emplace_back(pattern["String"].get<std::string>(), true, field);
      } else {
        refuse(field + ".pattern", "needs Regex or String");
      }
    } else if (type == "ByteLevel") {
      if (s.value("add_prefix_space", false)) refuse(field + ".add_prefix_space", "must be false");
      if (s.value("use_regex", true)) impl->splits.emplace_back(kGpt2Pattern, false, field);
      byte_level_seen = true;
    } else {
      refuse(field + ".type", "only Split and ByteLevel are supported, got '" + type + "'");
    }
  }
  if (!byte_level_seen) refuse("pre_tokenizer", "must end with ByteLevel");

  // model: BPE.
  const json& model = t.value("model", json::object());
  if (model.value("type", "") != "BPE") refuse("model.type", "only BPE is supported");
  if (!model.value("dropout", json()).is_null()) refuse("model.dropout", "must be null");
  if (model.value("byte_fallback", false)) refuse("model.byte_fallback", "must be false");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (!model.value(key, json()).is_null() && !model[key].get<std::string>().empty()) {
      refuse(std::string("model.") + key, "must be null");
    }
  }
  impl->ignore_merges = model.value("ignore_merges", false);
  int32_t size = 0;
  const json vocab = model.value("vocab", json::object());
  for (const auto& [token, id] : vocab.items()) {
    const auto i = id.get<int32_t>();
    if (i < 0) refuse("model.vocab", "negative id for '" + token + "'");
    impl->ids.emplace(token, i);
    size = std::max(size, i + 1);
  }
  for (const json& a : t.value("added_tokens", json::array())) {
    const auto i = a.at("id").get<int32_t>();
    if (i < 0) refuse("added_tokens", "negative id");
    size = std::max(size, i + 1);
  }
  impl->bytes_of.resize(size);
  impl->special.assign(size, 0);
  for (const auto& [token, id] : impl->ids) impl->bytes_of[id] = bytes_of_token(token);
  for (int b = 0; b < 256; ++b) {
    auto it = impl->ids.find(byte_level_char(static_cast<uint8_t>(b)));
    impl->byte_id[b] = it == impl->ids.end() ? -1 : it->second;
  }
  int32_t rank = 0;
  for (const json& m : model.value("merges", json::array())) {
    std::string left, right;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ', 1);
      if (space == std::string::npos) refuse("model.merges", "'" + s + "' is not 'a b'");
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      refuse("model.merges", "an entry is neither 'a b' nor [a, b]: " + m.dump());
    }
    auto l = impl->ids.find(left), r = impl->ids.find(right), lr = impl->ids.find(left + right);
    if (l == impl->ids.end() || r == impl->ids.end() || lr == impl->ids.end()) {
      refuse("model.merges", fmt::format("merge {} '{} {}' names a token not in the vocabulary",
                                         rank, left, right));
    }
    impl->merges.emplace(pair_key(l->second, r->second), Impl::Merge{rank++, lr->second});
  }

  // added_tokens: matched in the raw text.
  for (const json& a : t.value("added_tokens", json::array())) {
    const auto i = a.at("id").get<int32_t>();
    const std::string content = a.at("content").get<std::string>();
    for (const char* key : {"lstrip", "rstrip", "single_word"}) {
      if (a.value(key, false)) {
        refuse(fmt::format("added_tokens['{}'].{}", content, key), "must be false");
      }
    }
    if (content.empty()) refuse("added_tokens", "an added token is empty");
    impl->ids[content] = i;
    impl->bytes_of[i] = bytes_of_token(content);
    impl->special[i] = a.value("special", false) ? 1 : 0;
    impl->added_by_first_byte[static_cast<uint8_t>(content[0])].push_back({content, i});
  }
  for (auto& list : impl->added_by_first_byte) {
    std::stable_sort(list.begin(), list.end(), [](const Impl::Added& a, const Impl::Added& b) {
      return a.content.size() > b.content.size();
    });
  }

  // post_processor: TemplateProcessing's single template (or none; ByteLevel adds nothing).
  const json& post = t.value("post_processor", json());
  if (post.is_object() && post.value("type", "") == "TemplateProcessing") {
    bool after = false;
    for (const json& item : post.value("single", json::array())) {
      if (item.contains("Sequence")) {
        after = true;
      } else if (item.contains("SpecialToken")) {
        const std::string name = item["SpecialToken"].at("id").get<std::string>();
        const json& special = post.value("special_tokens", json::object());
        if (!special.contains(name)) {
          refuse("post_processor.special_tokens", "'" + name + "' is not listed");
        }
        for (const json& id : special[name].at("ids")) {
          (after ? impl->template_suffix : impl->template_prefix).push_back(id.get<int32_t>());
        }
      } else {
        refuse("post_processor.single", "an item is neither Sequence nor SpecialToken");
      }
    }
  } else if (post.is_object() && post.value("type", "") != "ByteLevel") {
    refuse("post_processor.type", "only TemplateProcessing and ByteLevel are supported");
  }

  auto named = [&](const char* key) -> std::optional<int32_t> {
    const auto token = config_token(config, key);
    if (!token) return std::nullopt;
    auto it = impl->ids.find(*token);
    if (it == impl->ids.end()) return std::nullopt;
    return it->second;
  };
  impl->bos = named("bos_token");
  impl->eos = named("eos_token");

  // chat_template: one template, or named ones of which "default" is used.
  if (config.contains("chat_template") && !config["chat_template"].is_null()) {
    std::optional<std::string> source;
    const json& ct = config["chat_template"];
    if (ct.is_string()) source = ct.get<std::string>();
    if (ct.is_array())
      for (const json& named_template : ct)
        if (named_template.is_object() && named_template.value("name", "") == "default" &&
            named_template.contains("template") && named_template["template"].is_string())
          source = named_template["template"].get<std::string>();
    if (!source) refuse("chat_template", "neither a string nor a list with a \"default\" template");
    nlohmann::ordered_json special = nlohmann::ordered_json::object();
    for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                            "cls_token", "mask_token"})
      if (const auto token = config_token(config, key)) special[key] = *token;
    try {
      impl->chat_template.emplace(ChatTemplate::parse(*source, std::move(special)));
    } catch (const Error& e) {
      MLA_THROW(kInvalidArgument, "{}: {}", origin, e.what());
    }
  }
  return Tokenizer(std::move(impl));
}

const ChatTemplate* Tokenizer::chat_template() const {
  return impl_->chat_template ? &*impl_->chat_template : nullptr;
}

std::vector<int32_t> Tokenizer::encode_chat(const nlohmann::ordered_json& messages) const {
  if (!impl_->chat_template) {
    MLA_THROW(kFailedPrecondition, "messages: {} has no chat_template (tokenizer_config.json)",
              impl_->origin);
  }
  std::string text;
  try {
    text = impl_->chat_template->render(messages, /*add_generation_prompt=*/true);
  } catch (const Error& e) {
    MLA_THROW(kInvalidArgument, "messages: the chat template refuses them: {}", e.what());
  }
  return encode(text, /*add_special_tokens=*/false);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  if (const size_t bad = utf8::first_invalid(text); bad != std::string_view::npos) {
    MLA_THROW(kInvalidArgument, "text is not UTF-8 at byte {}", bad);
  }
  const Impl& m = *impl_;
  std::vector<int32_t> out;
  if (add_special_tokens) out = m.template_prefix;
  size_t span = 0;  // start of the text not yet encoded
  for (size_t i = 0; i < text.size();) {
    const Impl::Added* hit = nullptr;
    for (const Impl::Added& a : m.added_by_first_byte[static_cast<uint8_t>(text[i])]) {
      if (text.compare(i, a.content.size(), a.content) == 0) {
        hit = &a;
        break;
      }
    }
    if (hit == nullptr) {
      ++i;
      continue;
    }
    if (i > span) m.encode_span(text.substr(span, i - span), out);
    out.push_back(hit->id);
    i += hit->content.size();
    span = i;
  }
  if (span < text.size()) m.encode_span(text.substr(span), out);
  if (add_special_tokens) out.insert(out.end(), m.template_suffix.begin(), m.template_suffix.end());
  return out;
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  static const std::string none;
  return id < 0 || id >= vocab_size() ? none : impl_->bytes_of[id];
}

std::string Tokenizer::byte_level_char(uint8_t byte) {
  return utf8::encode(byte_level().char_of[byte]);
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (!(skip_special_tokens && is_special(id))) bytes += token_bytes(id);
  }
  return utf8::lossy(bytes);
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->bytes_of.size()); }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }
bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->special[id] != 0;
}
std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  auto it = impl_->ids.find(std::string(token));
  if (it == impl_->ids.end()) return std::nullopt;
  return it->second;
}

}  // namespace mla
