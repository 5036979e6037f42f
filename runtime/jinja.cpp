#include "runtime/jinja.h"

#include <locale.h>

#include <algorithm>
#include <charconv>
#include <clocale>
#include <cmath>
#include <ctime>
#include <cwctype>
#include <functional>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "kernels/error.h"
#include "runtime/utf8.h"

namespace mla::jinja {
namespace {

// ---------------------------------------------------------------------------------------------
// Values, with Python's semantics.

struct Value;
struct Dict;
using List = std::vector<Value>;
using Args = std::vector<Value>;
using Kwargs = std::vector<std::pair<std::string, Value>>;
using Callable = std::function<Value(Args&, Kwargs&)>;

struct Value {
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kFunction };
  Kind kind = Kind::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;  // a string; a function's name
  std::shared_ptr<List> list;
  std::shared_ptr<Dict> dict;
  std::shared_ptr<const Callable> fn;

  static Value none() { return with_kind(Kind::kNone); }
  static Value boolean(bool v) {
    Value x = with_kind(Kind::kBool);
    x.b = v;
    return x;
  }
  static Value integer(int64_t v) {
    Value x = with_kind(Kind::kInt);
    x.i = v;
    return x;
  }
  static Value real(double v) {
    Value x = with_kind(Kind::kFloat);
    x.f = v;
    return x;
  }
  static Value string(std::string v) {
    Value x = with_kind(Kind::kString);
    x.s = std::move(v);
    return x;
  }
  static Value make_list(List items = {}) {
    Value x = with_kind(Kind::kList);
    x.list = std::make_shared<List>(std::move(items));
    return x;
  }
  static Value make_dict(bool is_namespace = false);
  static Value function(std::string name, Callable call) {
    Value x = with_kind(Kind::kFunction);
    x.s = std::move(name);
    x.fn = std::make_shared<const Callable>(std::move(call));
    return x;
  }

  bool undefined() const { return kind == Kind::kUndefined; }
  bool is_number() const {
    return kind == Kind::kInt || kind == Kind::kFloat || kind == Kind::kBool;
  }
  double as_double() const { return kind == Kind::kFloat ? f : static_cast<double>(as_int()); }
  int64_t as_int() const {
    return kind == Kind::kBool ? (b ? 1 : 0) : kind == Kind::kFloat ? static_cast<int64_t>(f) : i;
  }

 private:
  static Value with_kind(Kind k) {
    Value x;
    x.kind = k;
    return x;
  }
};

struct Dict {
  std::vector<std::pair<std::string, Value>> items;  // in insertion order, as Python's dict
  bool is_namespace = false;

  const Value* find(std::string_view key) const {
    for (const auto& [k, v] : items)
      if (k == key) return &v;
    return nullptr;
  }
  void set(const std::string& key, Value v) {
    for (auto& [k, old] : items)
      if (k == key) {
        old = std::move(v);
        return;
      }
    items.emplace_back(key, std::move(v));
  }
};

Value Value::make_dict(bool is_namespace) {
  Value x = with_kind(Kind::kDict);
  x.dict = std::make_shared<Dict>();
  x.dict->is_namespace = is_namespace;
  return x;
}

// An error while rendering; Template::render adds the line.
struct RenderError {
  std::string message;
};
// raise_exception(message): the template's own words, passed on as they are.
struct Raised {
  std::string message;
};

template <typename... A>
[[noreturn]] void fail(fmt::format_string<A...> f, A&&... args) {
  throw RenderError{fmt::format(f, std::forward<A>(args)...)};
}

const char* type_name(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "undefined";
    case Value::Kind::kNone:
      return "NoneType";
    case Value::Kind::kBool:
      return "bool";
    case Value::Kind::kInt:
      return "int";
    case Value::Kind::kFloat:
      return "float";
    case Value::Kind::kString:
      return "str";
    case Value::Kind::kList:
      return "list";
    case Value::Kind::kDict:
      return v.dict->is_namespace ? "Namespace" : "dict";
    case Value::Kind::kFunction:
      return "function";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return false;
    case Value::Kind::kBool:
      return v.b;
    case Value::Kind::kInt:
      return v.i != 0;
    case Value::Kind::kFloat:
      return v.f != 0;
    case Value::Kind::kString:
      return !v.s.empty();
    case Value::Kind::kList:
      return !v.list->empty();
    case Value::Kind::kDict:
      return !v.dict->items.empty();
    case Value::Kind::kFunction:
      return true;
  }
  return false;
}

// Python's repr of a float: the shortest digits that read back, positional for exponents in
// [-4, 16), scientific otherwise, and ".0" on integral values.
std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  const std::string sci(buf, r.ptr);  // e.g. -1.2345e+02
  const size_t e = sci.find('e');
  const int exp = std::stoi(sci.substr(e + 1));
  const bool neg = sci[0] == '-';
  std::string digits;
  for (size_t k = neg ? 1 : 0; k < e; ++k)
    if (sci[k] != '.') digits += sci[k];
  std::string out = neg ? "-" : "";
  if (exp < -4 || exp >= 16) {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    out += fmt::format("e{}{:02d}", exp < 0 ? '-' : '+', std::abs(exp));
    return out;
  }
  if (exp < 0) return out + "0." + std::string(-exp - 1, '0') + digits;
  if (static_cast<int>(digits.size()) <= exp + 1)
    return out + digits + std::string(exp + 1 - digits.size(), '0') + ".0";
  return out + digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
}

std::string repr(const Value& v);

std::string str(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "";
    case Value::Kind::kNone:
      return "None";
    case Value::Kind::kBool:
      return v.b ? "True" : "False";
    case Value::Kind::kInt:
      return std::to_string(v.i);
    case Value::Kind::kFloat:
      return float_repr(v.f);
    case Value::Kind::kString:
      return v.s;
    case Value::Kind::kFunction:
      return "<function " + v.s + ">";
    case Value::Kind::kList:
    case Value::Kind::kDict:
      return repr(v);
  }
  return "";
}

std::string repr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kString: {
      const bool dq = v.s.find('\'') != std::string::npos && v.s.find('"') == std::string::npos;
      const char q = dq ? '"' : '\'';
      std::string out(1, q);
      for (const char c : v.s) {
        if (c == q || c == '\\')
          out += '\\', out += c;
        else if (c == '\n')
          out += "\\n";
        else if (c == '\r')
          out += "\\r";
        else if (c == '\t')
          out += "\\t";
        else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
          out += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
        else
          out += c;
      }
      return out + q;
    }
    case Value::Kind::kList: {
      std::string out = "[";
      for (size_t k = 0; k < v.list->size(); ++k) out += (k ? ", " : "") + repr((*v.list)[k]);
      return out + "]";
    }
    case Value::Kind::kDict: {
      std::string out = v.dict->is_namespace ? "<Namespace {" : "{";
      for (size_t k = 0; k < v.dict->items.size(); ++k)
        out += (k ? ", " : "") + repr(Value::string(v.dict->items[k].first)) + ": " +
               repr(v.dict->items[k].second);
      return out + (v.dict->is_namespace ? "}>" : "}");
    }
    default:
      return str(v);
  }
}

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == Value::Kind::kFloat || b.kind == Value::Kind::kFloat)
      return a.as_double() == b.as_double();
    return a.as_int() == b.as_int();
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return true;
    case Value::Kind::kString:
      return a.s == b.s;
    case Value::Kind::kList:
      return std::equal(a.list->begin(), a.list->end(), b.list->begin(), b.list->end(), equal);
    case Value::Kind::kDict: {
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, v] : a.dict->items) {
        const Value* w = b.dict->find(k);
        if (w == nullptr || !equal(v, *w)) return false;
      }
      return true;
    }
    case Value::Kind::kFunction:
      return a.fn == b.fn;
    default:
      return false;
  }
}

bool less(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) return a.as_double() < b.as_double();
  if (a.kind == Value::Kind::kString && b.kind == Value::Kind::kString) return a.s < b.s;
  if (a.kind == Value::Kind::kList && b.kind == Value::Kind::kList)
    return std::lexicographical_compare(a.list->begin(), a.list->end(), b.list->begin(),
                                        b.list->end(), less);
  fail("'<' not supported between instances of '{}' and '{}'", type_name(a), type_name(b));
}

// UTF-8 strings index by characters.
std::vector<size_t> char_starts(const std::string& s) {
  std::vector<size_t> starts;
  for (size_t k = 0; k < s.size(); ++k)
    if ((static_cast<unsigned char>(s[k]) & 0xC0) != 0x80) starts.push_back(k);
  return starts;
}

std::vector<uint32_t> code_points(const std::string& s) {
  std::vector<uint32_t> cps;
  for (size_t k = 0; k < s.size();) {
    size_t bad = 0;
    const size_t len = utf8::sequence(s, k, &bad);
    if (len == 0) {
      cps.push_back(0xFFFD);
      k += std::max<size_t>(bad, 1);
      continue;
    }
    cps.push_back(utf8::code_point(s, k, len));
    k += len;
  }
  return cps;
}

std::string from_code_points(const std::vector<uint32_t>& cps) {
  std::string out;
  for (const uint32_t cp : cps) out += utf8::encode(cp);
  return out;
}

// Python's str.isspace for one character.
bool py_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
         c == 0x205f || c == 0x3000;
}

int64_t length(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kString:
      return static_cast<int64_t>(char_starts(v.s).size());
    case Value::Kind::kList:
      return static_cast<int64_t>(v.list->size());
    case Value::Kind::kDict:
      return static_cast<int64_t>(v.dict->items.size());
    case Value::Kind::kUndefined:
      return 0;
    default:
      fail("object of type '{}' has no len()", type_name(v));
  }
}

// The items a for loop or a filter goes over.
List iterate(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return {};
    case Value::Kind::kList:
      return *v.list;
    case Value::Kind::kDict: {
      List keys;
      for (const auto& [k, _] : v.dict->items) keys.push_back(Value::string(k));
      return keys;
    }
    case Value::Kind::kString: {
      List chars;
      const std::vector<size_t> starts = char_starts(v.s);
      for (size_t k = 0; k < starts.size(); ++k) {
        const size_t end = k + 1 < starts.size() ? starts[k + 1] : v.s.size();
        chars.push_back(Value::string(v.s.substr(starts[k], end - starts[k])));
      }
      return chars;
    }
    default:
      fail("'{}' object is not iterable", type_name(v));
  }
}

Value from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return Value::none();
    case nlohmann::ordered_json::value_t::boolean:
      return Value::boolean(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
    case nlohmann::ordered_json::value_t::number_unsigned:
      return Value::integer(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_float:
      return Value::real(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return Value::string(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      Value list = Value::make_list();
      for (const auto& e : j) list.list->push_back(from_json(e));
      return list;
    }
    case nlohmann::ordered_json::value_t::object: {
      Value dict = Value::make_dict();
      for (const auto& [k, e] : j.items()) dict.dict->set(k, from_json(e));
      return dict;
    }
    default:
      return Value();
  }
}

// json.dumps(v, ensure_ascii=False, indent=indent) as transformers' tojson filter calls it.
void dump_json(const Value& v, int indent, int depth, std::string& out) {
  auto newline = [&](int d) {
    if (indent >= 0) out += "\n" + std::string(static_cast<size_t>(indent * d), ' ');
  };
  const std::string item_sep = indent >= 0 ? "," : ", ";
  switch (v.kind) {
    case Value::Kind::kNone:
      out += "null";
      return;
    case Value::Kind::kBool:
      out += v.b ? "true" : "false";
      return;
    case Value::Kind::kInt:
      out += std::to_string(v.i);
      return;
    case Value::Kind::kFloat:
      out += std::isnan(v.f)   ? "NaN"
             : std::isinf(v.f) ? (v.f > 0 ? "Infinity" : "-Infinity")
                               : float_repr(v.f);
      return;
    case Value::Kind::kString:
      out += '"';
      for (const char c : v.s) {
        switch (c) {
          case '"':
            out += "\\\"";
            break;
          case '\\':
            out += "\\\\";
            break;
          case '\n':
            out += "\\n";
            break;
          case '\r':
            out += "\\r";
            break;
          case '\t':
            out += "\\t";
            break;
          case '\b':
            out += "\\b";
            break;
          case '\f':
            out += "\\f";
            break;
          default:
            if (static_cast<unsigned char>(c) < 0x20)
              out += fmt::format("\\u{:04x}", static_cast<unsigned char>(c));
            else
              out += c;
        }
      }
      out += '"';
      return;
    case Value::Kind::kList:
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += item_sep;
        newline(depth + 1);
        dump_json((*v.list)[k], indent, depth + 1, out);
      }
      newline(depth);
      out += ']';
      return;
    case Value::Kind::kDict:
      if (v.dict->items.empty()) {
        out += "{}";
        return;
      }
      out += '{';
      for (size_t k = 0; k < v.dict->items.size(); ++k) {
        if (k) out += item_sep;
        newline(depth + 1);
        dump_json(Value::string(v.dict->items[k].first), indent, depth + 1, out);
        out += ": ";
        dump_json(v.dict->items[k].second, indent, depth + 1, out);
      }
      newline(depth);
      out += '}';
      return;
    default:
      fail("Object of type {} is not JSON serializable", type_name(v));
  }
}

// ---------------------------------------------------------------------------------------------
// Lexing: the source becomes text, output ({{ }}) and statement ({% %}) segments, each tag's
// inside a list of tokens.

struct Token {
  enum class Kind { kName, kString, kInt, kFloat, kOp };
  Kind kind;
  std::string text;  // a name, an operator, a string's decoded value
  int64_t i = 0;
  double f = 0;
};

struct Segment {
  enum class Kind { kText, kOutput, kStatement };
  Kind kind;
  std::string text;
  std::vector<Token> tokens;
  int line;
};

[[noreturn]] void syntax_error(int line, const std::string& what) {
  MLA_THROW(kInvalidArgument, "line {}: {}", line, what);
}

// Tokens of a tag's inside from `pos` up to its closing `close` ("}}" or "%}"), which may
// carry a '-' or '+' modifier; returns the position after the close and sets *modifier.
size_t lex_tag(const std::string& src, size_t pos, std::string_view close, int& line,
               std::vector<Token>& tokens, char* modifier) {
  static const char* const kOps[] = {"//", "**", "==", "!=", "<=", ">=", "(", ")", "[",
                                     "]",  "{",  "}",  ".",  ",",  ":",  "|", "~", "+",
                                     "-",  "*",  "/",  "%",  "<",  ">",  "="};
  const size_t n = src.size();
  while (pos < n) {
    const char c = src[pos];
    if (c == '\n') ++line;
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++pos;
      continue;
    }
    if ((c == '-' || c == '+') && src.compare(pos + 1, close.size(), close) == 0) {
      *modifier = c;
      return pos + 1 + close.size();
    }
    if (src.compare(pos, close.size(), close) == 0) {
      *modifier = 0;
      return pos + close.size();
    }
    if (c == '\'' || c == '"') {
      std::string value;
      size_t k = pos + 1;
      for (; k < n && src[k] != c; ++k) {
        if (src[k] == '\n') ++line;
        if (src[k] != '\\' || k + 1 >= n) {
          value += src[k];
          continue;
        }
        const char e = src[++k];
        switch (e) {
          case 'n':
            value += '\n';
            break;
          case 't':
            value += '\t';
            break;
          case 'r':
            value += '\r';
            break;
          case '0':
            value += '\0';
            break;
          case 'b':
            value += '\b';
            break;
          case 'f':
            value += '\f';
            break;
          case 'v':
            value += '\v';
            break;
          case 'a':
            value += '\a';
            break;
          case 'x':
          case 'u':
          case 'U': {
            const size_t digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
            if (k + digits >= n) syntax_error(line, "truncated escape in a string");
            const uint32_t cp =
                static_cast<uint32_t>(std::stoul(src.substr(k + 1, digits), nullptr, 16));
            value += utf8::encode(cp);
            k += digits;
            break;
          }
          case '\n':
            ++line;
            break;
          default:
            if (e != '\\' && e != '\'' && e != '"') value += '\\';
            value += e;
        }
      }
      if (k >= n) syntax_error(line, "unterminated string");
      tokens.push_back({Token::Kind::kString, std::move(value)});
      pos = k + 1;
      continue;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t k = pos;
      while (k < n && (std::isdigit(static_cast<unsigned char>(src[k])) || src[k] == '_')) ++k;
      bool is_float = false;
      if (k + 1 < n && src[k] == '.' && std::isdigit(static_cast<unsigned char>(src[k + 1]))) {
        is_float = true;
        for (++k; k < n && std::isdigit(static_cast<unsigned char>(src[k])); ++k) {
        }
      }
      if (k < n && (src[k] == 'e' || src[k] == 'E')) {
        size_t m = k + 1;
        if (m < n && (src[m] == '+' || src[m] == '-')) ++m;
        if (m < n && std::isdigit(static_cast<unsigned char>(src[m]))) {
          is_float = true;
          for (k = m; k < n && std::isdigit(static_cast<unsigned char>(src[k])); ++k) {
          }
        }
      }
      std::string text = src.substr(pos, k - pos);
      text.erase(std::remove(text.begin(), text.end(), '_'), text.end());
      Token t{is_float ? Token::Kind::kFloat : Token::Kind::kInt, text};
      if (is_float)
        t.f = std::stod(text);
      else
        t.i = std::stoll(text);
      tokens.push_back(std::move(t));
      pos = k;
      continue;
    }
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t k = pos;
      while (k < n && (std::isalnum(static_cast<unsigned char>(src[k])) || src[k] == '_')) ++k;
      tokens.push_back({Token::Kind::kName, src.substr(pos, k - pos)});
      pos = k;
      continue;
    }
    bool matched = false;
    for (const char* op : kOps) {
      const std::string_view o(op);
      if (src.compare(pos, o.size(), o) == 0) {
        tokens.push_back({Token::Kind::kOp, std::string(o)});
        pos += o.size();
        matched = true;
        break;
      }
    }
    if (!matched) syntax_error(line, fmt::format("unexpected character '{}'", c));
  }
  syntax_error(line, fmt::format("missing '{}'", close));
}

std::vector<Segment> lex(std::string_view source) {
  // Newlines become \n and one trailing newline goes (Jinja's keep_trailing_newline=False).
  std::string src;
  src.reserve(source.size());
  for (size_t k = 0; k < source.size(); ++k) {
    if (source[k] == '\r') {
      src += '\n';
      if (k + 1 < source.size() && source[k + 1] == '\n') ++k;
    } else {
      src += source[k];
    }
  }
  if (!src.empty() && src.back() == '\n') src.pop_back();

  std::vector<Segment> segments;
  const size_t n = src.size();
  size_t pos = 0;
  int line = 1;
  bool strip_next = false;    // the last tag ended with '-': strip the next text's whitespace
  bool trim_newline = false;  // the last tag was a block or comment: trim_blocks
  bool line_starting = true;  // the next text starts at the beginning of a line
  while (pos <= n) {
    size_t tag = src.find('{', pos);
    while (tag != std::string::npos && tag + 1 < n && src[tag + 1] != '{' && src[tag + 1] != '%' &&
           src[tag + 1] != '#')
      tag = src.find('{', tag + 1);
    if (tag != std::string::npos && tag + 1 >= n) tag = std::string::npos;
    std::string text = src.substr(pos, (tag == std::string::npos ? n : tag) - pos);
    const int text_line = line;
    line += static_cast<int>(std::count(text.begin(), text.end(), '\n'));
    if (strip_next) {
      text.erase(0, text.find_first_not_of(" \t\n\r\v\f") == std::string::npos
                        ? text.size()
                        : text.find_first_not_of(" \t\n\r\v\f"));
    } else if (trim_newline && !text.empty() && text[0] == '\n') {
      text.erase(0, 1);
    }
    if (tag == std::string::npos) {
      if (!text.empty()) segments.push_back({Segment::Kind::kText, std::move(text), {}, text_line});
      break;
    }
    const char kind = src[tag + 1];
    const char open_modifier = tag + 2 < n ? src[tag + 2] : 0;
    if (open_modifier == '-') {
      const size_t keep = text.find_last_not_of(" \t\n\r\v\f");
      text.erase(keep == std::string::npos ? 0 : keep + 1);
    } else if (open_modifier != '+' && kind != '{') {
      // lstrip_blocks: spaces and tabs from the start of the line to a block or comment tag.
      const size_t l_pos = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
      if ((l_pos > 0 || line_starting) && l_pos < text.size() &&
          text.find_first_not_of(" \t\v\f\r", l_pos) == std::string::npos)
        text.erase(l_pos);
    }
    if (!text.empty()) segments.push_back({Segment::Kind::kText, std::move(text), {}, text_line});
    size_t body = tag + 2 + ((open_modifier == '-' || open_modifier == '+') ? 1 : 0);
    char close_modifier = 0;
    if (kind == '#') {
      const size_t end = src.find("#}", body);
      if (end == std::string::npos) syntax_error(line, "missing '#}'");
      line += static_cast<int>(std::count(src.begin() + static_cast<long>(body),
                                          src.begin() + static_cast<long>(end), '\n'));
      close_modifier =
          end > body && (src[end - 1] == '-' || src[end - 1] == '+') ? src[end - 1] : 0;
      pos = end + 2;
    } else {
      Segment seg{kind == '{' ? Segment::Kind::kOutput : Segment::Kind::kStatement, "", {}, line};
      pos = lex_tag(src, body, kind == '{' ? "}}" : "%}", line, seg.tokens, &close_modifier);
      if (seg.tokens.empty()) syntax_error(seg.line, "empty tag");
      segments.push_back(std::move(seg));
    }
    strip_next = close_modifier == '-';
    trim_newline = kind != '{' && close_modifier != '+';
    line_starting = kind != '{' && close_modifier == 0 && pos < n && src[pos] == '\n';
    if (strip_next) {
      // The '-' strips what follows; whether the text then starts a line depends on what
      // was stripped, which Jinja reads off the whitespace it consumed.
      const size_t next = src.find_first_not_of(" \t\n\r\v\f", pos);
      line_starting = next != pos && (next == std::string::npos ? n : next) > pos &&
                      src[(next == std::string::npos ? n : next) - 1] == '\n';
    }
  }
  return segments;
}

// ---------------------------------------------------------------------------------------------
// Syntax tree.

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    kLiteral,
    kName,
    kList,
    kDict,
    kAttr,
    kItem,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kNeg,
    kBinary,
    kCompare,
    kAnd,
    kOr,
    kNot,
    kCond
  };
  Kind kind;
  int line = 0;
  Value literal;
  std::string name;           // a name, attribute, filter, test or operator
  std::vector<ExprPtr> args;  // operands; a call's callee first; a slice's missing bounds null
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negated = false;  // `is not`
};

struct Node;
using Body = std::vector<Node>;

struct Node {
  enum class Kind { kText, kOutput, kIf, kFor, kSet, kSetBlock, kBreak, kContinue, kMacro };
  Kind kind;
  int line = 0;
  std::string text;                                // text; set's / macro's name
  std::string attr;                                // set ns.attr
  std::vector<std::string> names;                  // for's loop variables; macro's parameters
  ExprPtr expr;                                    // output, for's iterable, set's value
  ExprPtr filter;                                  // for ... if filter
  std::vector<ExprPtr> defaults;                   // macro parameters' defaults (null: none)
  std::vector<std::pair<ExprPtr, Body>> branches;  // if/elif
  Body body;                                       // for, set block, macro
  Body else_body;                                  // else of if and for
};

class Parser {
 public:
  explicit Parser(std::vector<Segment> segments) : segs_(std::move(segments)) {}

  Body parse_all() {
    Body body = parse_body({});
    if (seg_ < segs_.size())
      syntax_error(segs_[seg_].line, "unexpected '" + segs_[seg_].tokens[0].text + "'");
    return body;
  }

 private:
  // Statements until one whose keyword is in `ends` (left unconsumed) or the end.
  Body parse_body(const std::vector<std::string>& ends) {
    Body body;
    while (seg_ < segs_.size()) {
      Segment& s = segs_[seg_];
      if (s.kind == Segment::Kind::kText) {
        body.push_back(Node{Node::Kind::kText, s.line, std::move(s.text)});
        ++seg_;
        continue;
      }
      toks_ = &s.tokens;
      tok_ = 0;
      line_ = s.line;
      if (s.kind == Segment::Kind::kOutput) {
        Node node{Node::Kind::kOutput, s.line};
        node.expr = parse_expr();
        expect_end();
        ++seg_;
        body.push_back(std::move(node));
        continue;
      }
      const std::string keyword = s.tokens[0].kind == Token::Kind::kName ? s.tokens[0].text : "";
      if (std::find(ends.begin(), ends.end(), keyword) != ends.end()) return body;
      ++tok_;
      ++seg_;
      body.push_back(parse_statement(keyword));
    }
    if (!ends.empty())
      syntax_error(segs_.empty() ? 1 : segs_.back().line, "missing '{% " + ends.back() + " %}'");
    return body;
  }

  // The current segment is the end tag `keyword` (checked by parse_body): consume it.
  void close(const std::string& keyword) {
    (void)keyword;
    toks_ = &segs_[seg_].tokens;
    tok_ = 1;
    line_ = segs_[seg_].line;
    expect_end();
    ++seg_;
  }

  std::string current_keyword() const { return segs_[seg_].tokens[0].text; }

  Node parse_statement(const std::string& keyword) {
    Node node{Node::Kind::kText, line_};
    if (keyword == "if") {
      node.kind = Node::Kind::kIf;
      ExprPtr cond = parse_expr();
      expect_end();
      for (;;) {
        Body branch = parse_body({"elif", "else", "endif"});
        node.branches.emplace_back(std::move(cond), std::move(branch));
        const std::string k = current_keyword();
        if (k == "elif") {
          toks_ = &segs_[seg_].tokens;
          tok_ = 1;
          line_ = segs_[seg_].line;
          cond = parse_expr();
          expect_end();
          ++seg_;
          continue;
        }
        if (k == "else") {
          close(k);
          node.else_body = parse_body({"endif"});
        }
        close("endif");
        return node;
      }
    }
    if (keyword == "for") {
      node.kind = Node::Kind::kFor;
      node.names.push_back(take_name());
      while (accept(",")) node.names.push_back(take_name());
      if (!accept_name("in")) fail_here("expected 'in'");
      node.expr = parse_condless();
      if (accept_name("if")) node.filter = parse_or();
      if (accept_name("recursive")) fail_here("recursive loops are not supported");
      expect_end();
      node.body = parse_body({"else", "endfor"});
      if (current_keyword() == "else") {
        close("else");
        node.else_body = parse_body({"endfor"});
      }
      close("endfor");
      return node;
    }
    if (keyword == "set") {
      node.kind = Node::Kind::kSet;
      node.text = take_name();
      if (accept(".")) node.attr = take_name();
      if (accept("=")) {
        node.expr = parse_tuple_or_expr();
        expect_end();
        return node;
      }
      if (!node.attr.empty()) fail_here("expected '='");
      expect_end();
      node.kind = Node::Kind::kSetBlock;
      node.body = parse_body({"endset"});
      close("endset");
      return node;
    }
    if (keyword == "break" || keyword == "continue") {
      node.kind = keyword == "break" ? Node::Kind::kBreak : Node::Kind::kContinue;
      expect_end();
      return node;
    }
    if (keyword == "macro") {
      node.kind = Node::Kind::kMacro;
      node.text = take_name();
      expect("(");
      if (!accept(")")) {
        do {
          node.names.push_back(take_name());
          node.defaults.push_back(accept("=") ? parse_expr() : nullptr);
        } while (accept(","));
        expect(")");
      }
      expect_end();
      node.body = parse_body({"endmacro"});
      close("endmacro");
      return node;
    }
    if (keyword == "generation") {
      // transformers' AssistantTracker marks the assistant's tokens; the text is unchanged.
      expect_end();
      node.kind = Node::Kind::kIf;
      node.branches.emplace_back(literal(Value::boolean(true)), parse_body({"endgeneration"}));
      close("endgeneration");
      return node;
    }
    fail_here(keyword.empty() ? "expected a statement" : "unsupported statement '" + keyword + "'");
  }

  // --- expressions (Jinja's precedence, loosest first) ---

  ExprPtr parse_tuple_or_expr() {
    ExprPtr first = parse_expr();
    if (!peek(",")) return first;
    auto list = make(Expr::Kind::kList);
    list->args.push_back(std::move(first));
    while (accept(",")) {
      if (at_end()) break;
      list->args.push_back(parse_expr());
    }
    return list;
  }

  ExprPtr parse_expr() {
    ExprPtr value = parse_or();
    while (accept_name("if")) {
      auto cond = make(Expr::Kind::kCond);
      cond->args.push_back(parse_or());
      cond->args.push_back(std::move(value));
      cond->args.push_back(accept_name("else") ? parse_expr() : nullptr);
      value = std::move(cond);
    }
    return value;
  }

  ExprPtr parse_condless() { return parse_or(); }

  ExprPtr parse_or() {
    ExprPtr left = parse_and();
    while (accept_name("or")) left = binary(Expr::Kind::kOr, "or", std::move(left), parse_and());
    return left;
  }
  ExprPtr parse_and() {
    ExprPtr left = parse_not();
    while (accept_name("and")) left = binary(Expr::Kind::kAnd, "and", std::move(left), parse_not());
    return left;
  }
  ExprPtr parse_not() {
    if (peek_name("not") && !(tok_ + 1 < toks_->size() && (*toks_)[tok_ + 1].text == "in")) {
      ++tok_;
      auto e = make(Expr::Kind::kNot);
      e->args.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    ExprPtr left = parse_math1();
    for (;;) {
      std::string op;
      for (const char* o : {"==", "!=", "<", ">", "<=", ">="})
        if (peek(o)) op = o;
      if (!op.empty()) {
        ++tok_;
      } else if (accept_name("in")) {
        op = "in";
      } else if (peek_name("not") && tok_ + 1 < toks_->size() && (*toks_)[tok_ + 1].text == "in") {
        tok_ += 2;
        op = "not in";
      } else {
        return left;
      }
      left = binary(Expr::Kind::kCompare, op, std::move(left), parse_math1());
    }
  }
  ExprPtr parse_math1() {
    ExprPtr left = parse_concat();
    for (;;) {
      if (peek("+") || peek("-")) {
        const std::string op = (*toks_)[tok_++].text;
        left = binary(Expr::Kind::kBinary, op, std::move(left), parse_concat());
      } else {
        return left;
      }
    }
  }
  ExprPtr parse_concat() {
    ExprPtr left = parse_math2();
    while (accept("~")) left = binary(Expr::Kind::kBinary, "~", std::move(left), parse_math2());
    return left;
  }
  ExprPtr parse_math2() {
    ExprPtr left = parse_pow();
    for (;;) {
      if (peek("*") || peek("/") || peek("//") || peek("%")) {
        const std::string op = (*toks_)[tok_++].text;
        left = binary(Expr::Kind::kBinary, op, std::move(left), parse_pow());
      } else {
        return left;
      }
    }
  }
  ExprPtr parse_pow() {
    ExprPtr left = parse_unary();
    while (accept("**")) left = binary(Expr::Kind::kBinary, "**", std::move(left), parse_unary());
    return left;
  }
  ExprPtr parse_unary() {
    if (accept("-")) {
      auto e = make(Expr::Kind::kNeg);
      e->args.push_back(parse_unary());
      return e;
    }
    if (accept("+")) return parse_unary();
    ExprPtr e = parse_postfix(parse_primary());
    return parse_filters(std::move(e));
  }

  ExprPtr parse_primary() {
    if (at_end()) fail_here("expected an expression");
    const Token& t = (*toks_)[tok_];
    switch (t.kind) {
      case Token::Kind::kString: {
        std::string s = t.text;
        ++tok_;
        // Adjacent string literals concatenate.
        while (!at_end() && (*toks_)[tok_].kind == Token::Kind::kString) s += (*toks_)[tok_++].text;
        return literal(Value::string(std::move(s)));
      }
      case Token::Kind::kInt:
        ++tok_;
        return literal(Value::integer(t.i));
      case Token::Kind::kFloat:
        ++tok_;
        return literal(Value::real(t.f));
      case Token::Kind::kName: {
        ++tok_;
        if (t.text == "true" || t.text == "True") return literal(Value::boolean(true));
        if (t.text == "false" || t.text == "False") return literal(Value::boolean(false));
        if (t.text == "none" || t.text == "None") return literal(Value::none());
        auto e = make(Expr::Kind::kName);
        e->name = t.text;
        return e;
      }
      case Token::Kind::kOp:
        break;
    }
    if (accept("(")) {
      if (accept(")")) return make(Expr::Kind::kList);
      ExprPtr e = parse_expr();
      if (peek(",")) {
        auto list = make(Expr::Kind::kList);
        list->args.push_back(std::move(e));
        while (accept(",") && !peek(")")) list->args.push_back(parse_expr());
        e = std::move(list);
      }
      expect(")");
      return e;
    }
    if (accept("[")) {
      auto list = make(Expr::Kind::kList);
      while (!accept("]")) {
        list->args.push_back(parse_expr());
        if (!accept(",")) {
          expect("]");
          break;
        }
      }
      return list;
    }
    if (accept("{")) {
      auto dict = make(Expr::Kind::kDict);
      while (!accept("}")) {
        dict->args.push_back(parse_expr());
        expect(":");
        dict->args.push_back(parse_expr());
        if (!accept(",")) {
          expect("}");
          break;
        }
      }
      return dict;
    }
    fail_here("unexpected '" + t.text + "'");
  }

  ExprPtr parse_postfix(ExprPtr e) {
    for (;;) {
      if (accept(".")) {
        auto a = make(Expr::Kind::kAttr);
        if (!at_end() && (*toks_)[tok_].kind == Token::Kind::kInt) {
          a = make(Expr::Kind::kItem);
          a->args.push_back(std::move(e));
          a->args.push_back(literal(Value::integer((*toks_)[tok_++].i)));
        } else {
          a->name = take_name();
          a->args.push_back(std::move(e));
        }
        e = std::move(a);
      } else if (accept("[")) {
        ExprPtr lo, hi, step;
        if (!peek(":")) lo = parse_expr();
        if (accept(":")) {
          auto s = make(Expr::Kind::kSlice);
          if (!peek("]") && !peek(":")) hi = parse_expr();
          if (accept(":") && !peek("]")) step = parse_expr();
          expect("]");
          s->args.push_back(std::move(e));
          s->args.push_back(std::move(lo));
          s->args.push_back(std::move(hi));
          s->args.push_back(std::move(step));
          e = std::move(s);
        } else {
          expect("]");
          auto item = make(Expr::Kind::kItem);
          item->args.push_back(std::move(e));
          item->args.push_back(std::move(lo));
          e = std::move(item);
        }
      } else if (peek("(")) {
        auto call = make(Expr::Kind::kCall);
        call->args.push_back(std::move(e));
        parse_call_args(*call);
        e = std::move(call);
      } else {
        return e;
      }
    }
  }

  void parse_call_args(Expr& call) {
    expect("(");
    while (!accept(")")) {
      if (!at_end() && (*toks_)[tok_].kind == Token::Kind::kName && tok_ + 1 < toks_->size() &&
          (*toks_)[tok_ + 1].text == "=" && (*toks_)[tok_ + 1].kind == Token::Kind::kOp) {
        std::string key = (*toks_)[tok_].text;
        tok_ += 2;
        call.kwargs.emplace_back(std::move(key), parse_expr());
      } else {
        call.args.push_back(parse_expr());
      }
      if (!accept(",")) {
        expect(")");
        break;
      }
    }
  }

  ExprPtr parse_filters(ExprPtr e) {
    for (;;) {
      if (accept("|")) {
        auto f = make(Expr::Kind::kFilter);
        f->name = take_name();
        while (accept(".")) f->name += "." + take_name();
        f->args.push_back(std::move(e));
        if (peek("(")) parse_call_args(*f);
        e = std::move(f);
      } else if (accept_name("is")) {
        auto t = make(Expr::Kind::kTest);
        t->negated = accept_name("not");
        t->name = take_name();
        t->args.push_back(std::move(e));
        if (peek("(")) {
          parse_call_args(*t);
        } else if (!at_end() && ((*toks_)[tok_].kind == Token::Kind::kString ||
                                 (*toks_)[tok_].kind == Token::Kind::kInt ||
                                 (*toks_)[tok_].kind == Token::Kind::kFloat || peek_name("none") ||
                                 peek_name("true") || peek_name("false"))) {
          t->args.push_back(parse_primary());
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }

  // --- helpers ---

  bool at_end() const { return tok_ >= toks_->size(); }
  bool peek(std::string_view op) const {
    return !at_end() && (*toks_)[tok_].kind == Token::Kind::kOp && (*toks_)[tok_].text == op;
  }
  bool peek_name(std::string_view name) const {
    return !at_end() && (*toks_)[tok_].kind == Token::Kind::kName && (*toks_)[tok_].text == name;
  }
  bool accept(std::string_view op) {
    if (!peek(op)) return false;
    ++tok_;
    return true;
  }
  bool accept_name(std::string_view name) {
    if (!peek_name(name)) return false;
    ++tok_;
    return true;
  }
  void expect(std::string_view op) {
    if (!accept(op)) fail_here(fmt::format("expected '{}'", op));
  }
  void expect_end() {
    if (!at_end()) fail_here("unexpected '" + (*toks_)[tok_].text + "'");
  }
  std::string take_name() {
    if (at_end() || (*toks_)[tok_].kind != Token::Kind::kName) fail_here("expected a name");
    return (*toks_)[tok_++].text;
  }
  [[noreturn]] void fail_here(const std::string& what) const { syntax_error(line_, what); }

  ExprPtr make(Expr::Kind kind) const {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line_;
    return e;
  }
  ExprPtr literal(Value v) const {
    auto e = make(Expr::Kind::kLiteral);
    e->literal = std::move(v);
    return e;
  }
  ExprPtr binary(Expr::Kind kind, std::string op, ExprPtr a, ExprPtr b) const {
    auto e = make(kind);
    e->name = std::move(op);
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }

  std::vector<Segment> segs_;
  size_t seg_ = 0;
  const std::vector<Token>* toks_ = nullptr;
  size_t tok_ = 0;
  int line_ = 1;
};

// ---------------------------------------------------------------------------------------------
// Rendering.

std::string py_strip(const std::string& s, const Value& chars, bool left, bool right) {
  std::vector<uint32_t> cps = code_points(s);
  std::vector<uint32_t> set;
  if (chars.kind == Value::Kind::kString) set = code_points(chars.s);
  auto strip_it = [&](uint32_t c) {
    return chars.kind == Value::Kind::kString ? std::find(set.begin(), set.end(), c) != set.end()
                                              : py_space(c);
  };
  size_t lo = 0, hi = cps.size();
  if (left)
    while (lo < hi && strip_it(cps[lo])) ++lo;
  if (right)
    while (hi > lo && strip_it(cps[hi - 1])) --hi;
  return from_code_points(
      {cps.begin() + static_cast<long>(lo), cps.begin() + static_cast<long>(hi)});
}

List py_split(const std::string& s, const Value& sep, int64_t maxsplit, bool from_right) {
  List parts;
  if (sep.kind != Value::Kind::kString) {
    // Runs of whitespace; no empty parts.
    const std::vector<uint32_t> cps = code_points(s);
    std::vector<std::pair<size_t, size_t>> words;
    for (size_t k = 0; k < cps.size();) {
      while (k < cps.size() && py_space(cps[k])) ++k;
      if (k == cps.size()) break;
      size_t e = k;
      while (e < cps.size() && !py_space(cps[e])) ++e;
      words.emplace_back(k, e);
      k = e;
    }
    auto text = [&](size_t a, size_t b) {
      return from_code_points(
          {cps.begin() + static_cast<long>(a), cps.begin() + static_cast<long>(b)});
    };
    if (maxsplit >= 0 && static_cast<int64_t>(words.size()) > maxsplit + 1) {
      if (from_right) {
        const size_t first = words.size() - static_cast<size_t>(maxsplit);
        size_t end = words[first - 1].second;
        parts.push_back(Value::string(py_strip(text(0, end), Value(), true, false)));
        for (size_t k = first; k < words.size(); ++k)
          parts.push_back(Value::string(text(words[k].first, words[k].second)));
      } else {
        for (int64_t k = 0; k < maxsplit; ++k)
          parts.push_back(Value::string(text(words[k].first, words[k].second)));
        parts.push_back(
            Value::string(py_strip(text(words[maxsplit].first, cps.size()), Value(), false, true)));
      }
      return parts;
    }
    for (const auto& [a, b] : words) parts.push_back(Value::string(text(a, b)));
    return parts;
  }
  if (sep.s.empty()) fail("empty separator");
  std::vector<std::string> pieces;
  if (!from_right) {
    size_t start = 0;
    for (int64_t done = 0; maxsplit < 0 || done < maxsplit; ++done) {
      const size_t at = s.find(sep.s, start);
      if (at == std::string::npos) break;
      pieces.push_back(s.substr(start, at - start));
      start = at + sep.s.size();
    }
    pieces.push_back(s.substr(start));
  } else {
    size_t end = s.size();
    for (int64_t done = 0; maxsplit < 0 || done < maxsplit; ++done) {
      if (end < sep.s.size()) break;
      const size_t at = s.rfind(sep.s, end - sep.s.size());
      if (at == std::string::npos) break;
      pieces.insert(pieces.begin(), s.substr(at + sep.s.size(), end - at - sep.s.size()));
      end = at;
    }
    pieces.insert(pieces.begin(), s.substr(0, end));
  }
  for (auto& p : pieces) parts.push_back(Value::string(std::move(p)));
  return parts;
}

std::string py_replace(const std::string& s, const std::string& from, const std::string& to,
                       int64_t count) {
  std::string out;
  size_t start = 0;
  for (int64_t done = 0; count < 0 || done < count; ++done) {
    size_t at = s.find(from, start);
    if (from.empty()) at = start <= s.size() ? start : std::string::npos;
    if (at == std::string::npos || (from.empty() && at > s.size())) break;
    out += s.substr(start, at - start) + to;
    if (from.empty()) {
      if (at == s.size()) return out;
      size_t bad = 0;
      const size_t len = std::max<size_t>(utf8::sequence(s, at, &bad), 1);
      out += s.substr(at, len);
      start = at + len;
      continue;
    }
    start = at + from.size();
  }
  return out + (start <= s.size() ? s.substr(start) : "");
}

// Unicode case mapping through the C library's tables (glibc's C.UTF-8 locale), one character
// to one (Python's few one-to-many mappings, such as "ß".upper() == "SS", are not made).
locale_t utf8_locale() {
  static const locale_t locale = newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(0));
  return locale;
}

uint32_t to_case(uint32_t c, bool upper) {
  const locale_t l = utf8_locale();
  if (l == static_cast<locale_t>(0)) {
    if (upper && c >= 'a' && c <= 'z') return c - 32;
    if (!upper && c >= 'A' && c <= 'Z') return c + 32;
    return c;
  }
  return static_cast<uint32_t>(upper ? towupper_l(static_cast<wint_t>(c), l)
                                     : towlower_l(static_cast<wint_t>(c), l));
}

bool is_letter(uint32_t c) {
  const locale_t l = utf8_locale();
  if (l == static_cast<locale_t>(0)) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  return iswalpha_l(static_cast<wint_t>(c), l) != 0;
}

std::string change_case(const std::string& s, bool upper) {
  std::vector<uint32_t> cps = code_points(s);
  for (uint32_t& c : cps) c = to_case(c, upper);
  return from_code_points(cps);
}

// str.title() (only_first false) and str.capitalize() (only_first true).
std::string title_case(const std::string& s, bool only_first) {
  std::vector<uint32_t> cps = code_points(s);
  bool at_word = true;
  for (uint32_t& c : cps) {
    const bool letter = is_letter(c);
    if (letter)
      c = to_case(c, at_word);
    else if (only_first)
      c = to_case(c, false);
    at_word = only_first ? false : !letter;
  }
  return from_code_points(cps);
}

const Value& arg(const Args& args, const Kwargs& kwargs, size_t index, std::string_view key) {
  static const Value kUndefined;
  if (index < args.size()) return args[index];
  for (const auto& [k, v] : kwargs)
    if (k == key) return v;
  return kUndefined;
}

Value item(const Value& obj, const Value& key);

Value method(const Value& self, const std::string& name) {
  auto bind = [&](Callable call) { return Value::function(name, std::move(call)); };
  if (self.kind == Value::Kind::kString) {
    const std::string s = self.s;
    if (name == "split" || name == "rsplit")
      return bind([s, right = name == "rsplit"](Args& a, Kwargs& k) {
        const Value& max = arg(a, k, 1, "maxsplit");
        return Value::make_list(
            py_split(s, arg(a, k, 0, "sep"), max.undefined() ? -1 : max.as_int(), right));
      });
    if (name == "strip" || name == "lstrip" || name == "rstrip")
      return bind([s, name](Args& a, Kwargs& k) {
        return Value::string(
            py_strip(s, arg(a, k, 0, "chars"), name != "rstrip", name != "lstrip"));
      });
    if (name == "startswith" || name == "endswith")
      return bind([s, name](Args& a, Kwargs& k) {
        const Value& x = arg(a, k, 0, "prefix");
        List options = x.kind == Value::Kind::kList ? *x.list : List{x};
        for (const Value& o : options) {
          if (o.kind != Value::Kind::kString) fail("{} arg must be str", name);
          const bool hit = name == "startswith"
                               ? s.compare(0, o.s.size(), o.s) == 0
                               : s.size() >= o.s.size() &&
                                     s.compare(s.size() - o.s.size(), o.s.size(), o.s) == 0;
          if (hit) return Value::boolean(true);
        }
        return Value::boolean(false);
      });
    if (name == "upper" || name == "lower")
      return bind(
          [s, up = name == "upper"](Args&, Kwargs&) { return Value::string(change_case(s, up)); });
    if (name == "title" || name == "capitalize")
      return bind([s, first = name == "capitalize"](Args&, Kwargs&) {
        return Value::string(title_case(s, first));
      });
    if (name == "replace")
      return bind([s](Args& a, Kwargs& k) {
        const Value& count = arg(a, k, 2, "count");
        return Value::string(py_replace(s, str(arg(a, k, 0, "old")), str(arg(a, k, 1, "new")),
                                        count.undefined() ? -1 : count.as_int()));
      });
    if (name == "find" || name == "count")
      return bind([s, name](Args& a, Kwargs& k) {
        const std::string sub = str(arg(a, k, 0, "sub"));
        if (name == "find") {
          const size_t at = s.find(sub);
          if (at == std::string::npos) return Value::integer(-1);
          return Value::integer(static_cast<int64_t>(char_starts(s.substr(0, at)).size()));
        }
        int64_t n = 0;
        for (size_t at = s.find(sub); at != std::string::npos;
             at = s.find(sub, at + std::max<size_t>(sub.size(), 1)))
          ++n;
        return Value::integer(n);
      });
    if (name == "join")
      return bind([s](Args& a, Kwargs& k) {
        std::string out;
        const List items = iterate(arg(a, k, 0, "iterable"));
        for (size_t i = 0; i < items.size(); ++i) {
          if (items[i].kind != Value::Kind::kString)
            fail("sequence item {}: expected str instance", i);
          out += (i ? s : "") + items[i].s;
        }
        return Value::string(out);
      });
  }
  if (self.kind == Value::Kind::kDict && !self.dict->is_namespace) {
    const std::shared_ptr<Dict> d = self.dict;
    if (name == "items")
      return bind([d](Args&, Kwargs&) {
        List out;
        for (const auto& [k, v] : d->items) out.push_back(Value::make_list({Value::string(k), v}));
        return Value::make_list(std::move(out));
      });
    if (name == "keys" || name == "values")
      return bind([d, keys = name == "keys"](Args&, Kwargs&) {
        List out;
        for (const auto& [k, v] : d->items) out.push_back(keys ? Value::string(k) : v);
        return Value::make_list(std::move(out));
      });
    if (name == "get")
      return bind([d](Args& a, Kwargs& k) {
        const Value* v = d->find(str(arg(a, k, 0, "key")));
        if (v != nullptr) return *v;
        const Value& fallback = arg(a, k, 1, "default");
        return fallback.undefined() ? Value::none() : fallback;
      });
  }
  return Value();
}

Value attribute(const Value& obj, const std::string& name) {
  if (obj.undefined()) fail("'{}' is undefined (reading its attribute '{}')", "value", name);
  if (obj.kind == Value::Kind::kDict) {
    if (const Value* v = obj.dict->find(name)) return *v;
  }
  return method(obj, name);
}

int64_t normalize_index(int64_t i, int64_t n) { return i < 0 ? i + n : i; }

Value item(const Value& obj, const Value& key) {
  switch (obj.kind) {
    case Value::Kind::kUndefined:
      fail("'{}' is undefined (reading an item)", "value");
    case Value::Kind::kDict:
      if (key.kind == Value::Kind::kString) {
        if (const Value* v = obj.dict->find(key.s)) return *v;
        return method(obj, key.s);
      }
      return Value();
    case Value::Kind::kList: {
      if (!key.is_number() || key.kind == Value::Kind::kFloat) return Value();
      const int64_t n = static_cast<int64_t>(obj.list->size());
      const int64_t i = normalize_index(key.as_int(), n);
      return i >= 0 && i < n ? (*obj.list)[static_cast<size_t>(i)] : Value();
    }
    case Value::Kind::kString: {
      if (key.kind == Value::Kind::kString) return method(obj, key.s);
      if (!key.is_number() || key.kind == Value::Kind::kFloat) return Value();
      const List chars = iterate(obj);
      const int64_t n = static_cast<int64_t>(chars.size());
      const int64_t i = normalize_index(key.as_int(), n);
      return i >= 0 && i < n ? chars[static_cast<size_t>(i)] : Value();
    }
    default:
      return Value();
  }
}

// Python's slice of a list or string.
Value slice(const Value& obj, const Value& lo, const Value& hi, const Value& step_v) {
  if (obj.kind != Value::Kind::kList && obj.kind != Value::Kind::kString)
    fail("'{}' object is not subscriptable", type_name(obj));
  const List items = iterate(obj);
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t step =
      step_v.undefined() || step_v.kind == Value::Kind::kNone ? 1 : step_v.as_int();
  if (step == 0) fail("slice step cannot be zero");
  auto bound = [&](const Value& v, int64_t dflt) {
    if (v.undefined() || v.kind == Value::Kind::kNone) return dflt;
    int64_t i = v.as_int();
    if (i < 0) i += n;
    if (step > 0) return std::clamp<int64_t>(i, 0, n);
    return std::clamp<int64_t>(i, -1, n - 1);
  };
  const int64_t start = bound(lo, step > 0 ? 0 : n - 1);
  const int64_t stop = bound(hi, step > 0 ? n : -1);
  List out;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step)
    out.push_back(items[static_cast<size_t>(i)]);
  if (obj.kind == Value::Kind::kList) return Value::make_list(std::move(out));
  std::string s;
  for (const Value& c : out) s += c.s;
  return Value::string(std::move(s));
}

Value binary_op(const std::string& op, const Value& a, const Value& b) {
  if (op == "~") return Value::string(str(a) + str(b));
  const bool numbers = a.is_number() && b.is_number();
  const bool floats = numbers && (a.kind == Value::Kind::kFloat || b.kind == Value::Kind::kFloat);
  if (op == "+") {
    if (numbers)
      return floats ? Value::real(a.as_double() + b.as_double())
                    : Value::integer(a.as_int() + b.as_int());
    if (a.kind == Value::Kind::kString && b.kind == Value::Kind::kString)
      return Value::string(a.s + b.s);
    if (a.kind == Value::Kind::kList && b.kind == Value::Kind::kList) {
      List out = *a.list;
      out.insert(out.end(), b.list->begin(), b.list->end());
      return Value::make_list(std::move(out));
    }
  } else if (op == "-" && numbers) {
    return floats ? Value::real(a.as_double() - b.as_double())
                  : Value::integer(a.as_int() - b.as_int());
  } else if (op == "*") {
    if (numbers)
      return floats ? Value::real(a.as_double() * b.as_double())
                    : Value::integer(a.as_int() * b.as_int());
    const Value* seq = a.is_number() ? &b : &a;
    const Value* times = a.is_number() ? &a : &b;
    if (times->is_number() && times->kind != Value::Kind::kFloat) {
      if (seq->kind == Value::Kind::kString) {
        std::string out;
        for (int64_t k = 0; k < times->as_int(); ++k) out += seq->s;
        return Value::string(out);
      }
      if (seq->kind == Value::Kind::kList) {
        List out;
        for (int64_t k = 0; k < times->as_int(); ++k)
          out.insert(out.end(), seq->list->begin(), seq->list->end());
        return Value::make_list(std::move(out));
      }
    }
  } else if (numbers && (op == "/" || op == "//" || op == "%")) {
    if (b.as_double() == 0) fail("division by zero");
    if (op == "/") return Value::real(a.as_double() / b.as_double());
    if (floats) {
      const double q = std::floor(a.as_double() / b.as_double());
      return op == "//" ? Value::real(q) : Value::real(a.as_double() - q * b.as_double());
    }
    const int64_t x = a.as_int(), y = b.as_int();
    int64_t q = x / y;
    if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
    return op == "//" ? Value::integer(q) : Value::integer(x - q * y);
  } else if (op == "**" && numbers) {
    if (!floats && b.as_int() >= 0) {
      int64_t r = 1;
      for (int64_t k = 0; k < b.as_int(); ++k) r *= a.as_int();
      return Value::integer(r);
    }
    return Value::real(std::pow(a.as_double(), b.as_double()));
  }
  fail("unsupported operand type(s) for {}: '{}' and '{}'", op, type_name(a), type_name(b));
}

bool contains(const Value& container, const Value& x) {
  switch (container.kind) {
    case Value::Kind::kString:
      if (x.kind != Value::Kind::kString)
        fail("'in <string>' requires string as left operand, not {}", type_name(x));
      return container.s.find(x.s) != std::string::npos;
    case Value::Kind::kList:
      return std::any_of(container.list->begin(), container.list->end(),
                         [&](const Value& v) { return equal(v, x); });
    case Value::Kind::kDict:
      return x.kind == Value::Kind::kString && container.dict->find(x.s) != nullptr;
    case Value::Kind::kUndefined:
      return false;
    default:
      fail("argument of type '{}' is not iterable", type_name(container));
  }
}

bool test(const std::string& name, const Value& v, const Args& args) {
  auto need = [&](size_t n) {
    if (args.size() < n) fail("test '{}' needs {} argument(s)", name, n);
  };
  if (name == "defined") return !v.undefined();
  if (name == "undefined") return v.undefined();
  if (name == "none") return v.kind == Value::Kind::kNone;
  if (name == "string") return v.kind == Value::Kind::kString;
  if (name == "number") return v.kind == Value::Kind::kInt || v.kind == Value::Kind::kFloat;
  if (name == "integer") return v.kind == Value::Kind::kInt;
  if (name == "float") return v.kind == Value::Kind::kFloat;
  if (name == "boolean") return v.kind == Value::Kind::kBool;
  if (name == "true") return v.kind == Value::Kind::kBool && v.b;
  if (name == "false") return v.kind == Value::Kind::kBool && !v.b;
  if (name == "mapping") return v.kind == Value::Kind::kDict;
  if (name == "iterable")
    return v.kind == Value::Kind::kList || v.kind == Value::Kind::kDict ||
           v.kind == Value::Kind::kString;
  if (name == "sequence")
    return v.kind == Value::Kind::kList || v.kind == Value::Kind::kDict ||
           v.kind == Value::Kind::kString;
  if (name == "callable") return v.kind == Value::Kind::kFunction;
  if (name == "odd" || name == "even") {
    if (!v.is_number()) fail("test '{}' needs a number", name);
    return (v.as_int() % 2 != 0) == (name == "odd");
  }
  if (name == "divisibleby") {
    need(1);
    return args[0].as_int() != 0 && v.as_int() % args[0].as_int() == 0;
  }
  if (name == "equalto" || name == "eq" || name == "==" || name == "sameas") {
    need(1);
    return equal(v, args[0]);
  }
  if (name == "ne" || name == "!=") {
    need(1);
    return !equal(v, args[0]);
  }
  if (name == "in") {
    need(1);
    return contains(args[0], v);
  }
  fail("no test named '{}'", name);
}

class Renderer;

Value filter(Renderer& r, const std::string& name, const Value& v, Args& args, Kwargs& kwargs);

class Renderer {
 public:
  Renderer() {
    scopes_.emplace_back();
    auto& globals = scopes_.back();
    globals["raise_exception"] = Value::function(
        "raise_exception",
        [](Args& a, Kwargs& k) -> Value { throw Raised{str(arg(a, k, 0, "message"))}; });
    globals["namespace"] = Value::function("namespace", [](Args& a, Kwargs& k) {
      Value ns = Value::make_dict(true);
      for (const Value& init : a)
        if (init.kind == Value::Kind::kDict)
          for (const auto& [key, val] : init.dict->items) ns.dict->set(key, val);
      for (const auto& [key, val] : k) ns.dict->set(key, val);
      return ns;
    });
    globals["range"] = Value::function("range", [](Args& a, Kwargs&) {
      if (a.empty() || a.size() > 3) fail("range expected 1 to 3 arguments");
      const int64_t start = a.size() > 1 ? a[0].as_int() : 0;
      const int64_t stop = a.size() > 1 ? a[1].as_int() : a[0].as_int();
      const int64_t step = a.size() > 2 ? a[2].as_int() : 1;
      if (step == 0) fail("range() arg 3 must not be zero");
      List out;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        out.push_back(Value::integer(i));
        if (out.size() > 1000000) fail("range too large");
      }
      return Value::make_list(std::move(out));
    });
    globals["strftime_now"] = Value::function("strftime_now", [](Args& a, Kwargs& k) {
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[256];
      const size_t len = std::strftime(buf, sizeof buf, str(arg(a, k, 0, "format")).c_str(), &tm);
      return Value::string(std::string(buf, len));
    });
  }

  void set_context(const nlohmann::ordered_json& context) {
    scopes_.emplace_back();
    for (const auto& [k, v] : context.items()) scopes_.back()[k] = from_json(v);
    scopes_.emplace_back();  // the template's own top-level names
  }

  enum class Flow { kNormal, kBreak, kContinue };

  Flow exec(const Body& body, std::string& out) {
    for (const Node& node : body) {
      const Flow flow = exec(node, out);
      if (flow != Flow::kNormal) return flow;
    }
    return Flow::kNormal;
  }

  int line() const { return line_; }

  Value call(const Value& callee, Args& args, Kwargs& kwargs) {
    if (callee.kind != Value::Kind::kFunction)
      fail("'{}' object is not callable", type_name(callee));
    return (*callee.fn)(args, kwargs);
  }

 private:
  Flow exec(const Node& node, std::string& out) {
    line_ = node.line;
    switch (node.kind) {
      case Node::Kind::kText:
        out += node.text;
        return Flow::kNormal;
      case Node::Kind::kOutput:
        out += str(eval(*node.expr));
        return Flow::kNormal;
      case Node::Kind::kIf:
        for (const auto& [cond, branch] : node.branches)
          if (truthy(eval(*cond))) return exec(branch, out);
        return exec(node.else_body, out);
      case Node::Kind::kFor:
        return exec_for(node, out);
      case Node::Kind::kSet: {
        Value v = eval(*node.expr);
        if (node.attr.empty()) {
          scopes_.back()[node.text] = std::move(v);
          return Flow::kNormal;
        }
        Value ns = lookup(node.text);
        if (ns.kind != Value::Kind::kDict || !ns.dict->is_namespace)
          fail("can only set attributes of a namespace ('{}' is {})", node.text, type_name(ns));
        ns.dict->set(node.attr, std::move(v));
        return Flow::kNormal;
      }
      case Node::Kind::kSetBlock: {
        std::string captured;
        exec(node.body, captured);
        scopes_.back()[node.text] = Value::string(std::move(captured));
        return Flow::kNormal;
      }
      case Node::Kind::kBreak:
        return Flow::kBreak;
      case Node::Kind::kContinue:
        return Flow::kContinue;
      case Node::Kind::kMacro: {
        const Node* macro = &node;
        scopes_.back()[node.text] = Value::function(node.text, [this, macro](Args& a, Kwargs& k) {
          scopes_.emplace_back();
          for (size_t p = 0; p < macro->names.size(); ++p) {
            Value v = arg(a, k, p, macro->names[p]);
            if (v.undefined() && macro->defaults[p]) v = eval(*macro->defaults[p]);
            scopes_.back()[macro->names[p]] = std::move(v);
          }
          std::string text;
          const int saved_line = line_;
          exec(macro->body, text);
          line_ = saved_line;
          scopes_.pop_back();
          return Value::string(std::move(text));
        });
        return Flow::kNormal;
      }
    }
    return Flow::kNormal;
  }

  Flow exec_for(const Node& node, std::string& out) {
    List items = iterate(eval(*node.expr));
    if (node.filter) {
      List kept;
      for (Value& v : items) {
        scopes_.emplace_back();
        bind_loop_vars(node, v);
        if (truthy(eval(*node.filter))) kept.push_back(std::move(v));
        scopes_.pop_back();
      }
      items = std::move(kept);
    }
    if (items.empty()) return exec(node.else_body, out);
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
      scopes_.emplace_back();
      Value loop = Value::make_dict();
      loop.dict->set("index0", Value::integer(k));
      loop.dict->set("index", Value::integer(k + 1));
      loop.dict->set("revindex0", Value::integer(n - k - 1));
      loop.dict->set("revindex", Value::integer(n - k));
      loop.dict->set("first", Value::boolean(k == 0));
      loop.dict->set("last", Value::boolean(k == n - 1));
      loop.dict->set("length", Value::integer(n));
      if (k > 0) loop.dict->set("previtem", items[static_cast<size_t>(k - 1)]);
      if (k + 1 < n) loop.dict->set("nextitem", items[static_cast<size_t>(k + 1)]);
      loop.dict->set("cycle", Value::function("cycle", [k](Args& a, Kwargs&) {
                       if (a.empty()) fail("no items for cycling given");
                       return a[static_cast<size_t>(k) % a.size()];
                     }));
      scopes_.back()["loop"] = std::move(loop);
      bind_loop_vars(node, items[static_cast<size_t>(k)]);
      const Flow flow = exec(node.body, out);
      scopes_.pop_back();
      if (flow == Flow::kBreak) break;
    }
    return Flow::kNormal;
  }

  void bind_loop_vars(const Node& node, const Value& v) {
    if (node.names.size() == 1) {
      scopes_.back()[node.names[0]] = v;
      return;
    }
    if (v.kind != Value::Kind::kList || v.list->size() != node.names.size())
      fail("cannot unpack {} into {} loop variables", repr(v), node.names.size());
    for (size_t k = 0; k < node.names.size(); ++k) scopes_.back()[node.names[k]] = (*v.list)[k];
  }

  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      const auto found = it->find(name);
      if (found != it->end()) return found->second;
    }
    return Value();
  }

  Value eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return e.literal;
      case Expr::Kind::kName:
        return lookup(e.name);
      case Expr::Kind::kList: {
        List items;
        for (const ExprPtr& a : e.args) items.push_back(eval(*a));
        return Value::make_list(std::move(items));
      }
      case Expr::Kind::kDict: {
        Value d = Value::make_dict();
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          const Value key = eval(*e.args[k]);
          if (key.kind != Value::Kind::kString)
            fail("dict keys must be strings here, not {}", type_name(key));
          d.dict->set(key.s, eval(*e.args[k + 1]));
        }
        return d;
      }
      case Expr::Kind::kAttr:
        return attribute(eval(*e.args[0]), e.name);
      case Expr::Kind::kItem:
        return item(eval(*e.args[0]), eval(*e.args[1]));
      case Expr::Kind::kSlice: {
        auto opt = [&](size_t k) { return e.args[k] ? eval(*e.args[k]) : Value(); };
        return slice(eval(*e.args[0]), opt(1), opt(2), opt(3));
      }
      case Expr::Kind::kCall: {
        const Value callee = eval(*e.args[0]);
        if (callee.undefined()) fail("'{}' is undefined", describe(*e.args[0]));
        auto [args, kwargs] = eval_args(e, 1);
        return call(callee, args, kwargs);
      }
      case Expr::Kind::kFilter: {
        const Value v = eval(*e.args[0]);
        auto [args, kwargs] = eval_args(e, 1);
        return filter(*this, e.name, v, args, kwargs);
      }
      case Expr::Kind::kTest: {
        const Value v = eval(*e.args[0]);
        auto [args, kwargs] = eval_args(e, 1);
        return Value::boolean(test(e.name, v, args) != e.negated);
      }
      case Expr::Kind::kNeg: {
        const Value v = eval(*e.args[0]);
        if (!v.is_number()) fail("bad operand type for unary -: '{}'", type_name(v));
        return v.kind == Value::Kind::kFloat ? Value::real(-v.f) : Value::integer(-v.as_int());
      }
      case Expr::Kind::kBinary:
        return binary_op(e.name, eval(*e.args[0]), eval(*e.args[1]));
      case Expr::Kind::kCompare: {
        const Value a = eval(*e.args[0]);
        const Value b = eval(*e.args[1]);
        if (e.name == "==") return Value::boolean(equal(a, b));
        if (e.name == "!=") return Value::boolean(!equal(a, b));
        if (e.name == "<") return Value::boolean(less(a, b));
        if (e.name == ">") return Value::boolean(less(b, a));
        if (e.name == "<=") return Value::boolean(!less(b, a));
        if (e.name == ">=") return Value::boolean(!less(a, b));
        if (e.name == "in") return Value::boolean(contains(b, a));
        return Value::boolean(!contains(b, a));
      }
      case Expr::Kind::kAnd: {
        Value a = eval(*e.args[0]);
        return truthy(a) ? eval(*e.args[1]) : a;
      }
      case Expr::Kind::kOr: {
        Value a = eval(*e.args[0]);
        return truthy(a) ? a : eval(*e.args[1]);
      }
      case Expr::Kind::kNot:
        return Value::boolean(!truthy(eval(*e.args[0])));
      case Expr::Kind::kCond:
        if (truthy(eval(*e.args[0]))) return eval(*e.args[1]);
        return e.args[2] ? eval(*e.args[2]) : Value();
    }
    return Value();
  }

  std::pair<Args, Kwargs> eval_args(const Expr& e, size_t first) {
    Args args;
    Kwargs kwargs;
    for (size_t k = first; k < e.args.size(); ++k) args.push_back(eval(*e.args[k]));
    for (const auto& [key, value] : e.kwargs) kwargs.emplace_back(key, eval(*value));
    return {std::move(args), std::move(kwargs)};
  }

  static std::string describe(const Expr& e) {
    if (e.kind == Expr::Kind::kName) return e.name;
    if (e.kind == Expr::Kind::kAttr) return describe(*e.args[0]) + "." + e.name;
    return "value";
  }

  std::vector<std::map<std::string, Value>> scopes_;
  int line_ = 1;
};

Value filter(Renderer& r, const std::string& name, const Value& v, Args& args, Kwargs& kwargs) {
  if (name == "length" || name == "count") return Value::integer(length(v));
  if (name == "trim")
    return Value::string(py_strip(str(v), arg(args, kwargs, 0, "chars"), true, true));
  if (name == "tojson") {
    const Value& indent = arg(args, kwargs, 0, "indent");
    std::string out;
    dump_json(v,
              indent.undefined() || indent.kind == Value::Kind::kNone
                  ? -1
                  : static_cast<int>(indent.as_int()),
              0, out);
    return Value::string(std::move(out));
  }
  if (name == "string") return Value::string(str(v));
  if (name == "safe" || name == "e" || name == "escape") {
    if (name != "safe") fail("filter '{}' is not supported (no autoescaping here)", name);
    return v;
  }
  if (name == "lower" || name == "upper")
    return Value::string(change_case(str(v), name == "upper"));
  if (name == "capitalize") return Value::string(title_case(str(v), true));
  if (name == "title") return Value::string(title_case(str(v), false));
  if (name == "default" || name == "d") {
    const bool boolean = truthy(arg(args, kwargs, 1, "boolean"));
    if (v.undefined() || (boolean && !truthy(v))) {
      const Value& d = arg(args, kwargs, 0, "default_value");
      return d.undefined() ? Value::string("") : d;
    }
    return v;
  }
  if (name == "join") {
    const Value& sep = arg(args, kwargs, 0, "d");
    const Value& attr = arg(args, kwargs, 1, "attribute");
    std::string out;
    const List items = iterate(v);
    for (size_t k = 0; k < items.size(); ++k)
      out += (k ? str(sep) : "") + str(attr.undefined() ? items[k] : item(items[k], attr));
    return Value::string(std::move(out));
  }
  if (name == "first" || name == "last") {
    const List items = iterate(v);
    if (items.empty()) return Value();
    return name == "first" ? items.front() : items.back();
  }
  if (name == "list") return Value::make_list(iterate(v));
  if (name == "reverse") {
    if (v.kind == Value::Kind::kString) return slice(v, Value(), Value(), Value::integer(-1));
    List items = iterate(v);
    std::reverse(items.begin(), items.end());
    return Value::make_list(std::move(items));
  }
  if (name == "replace") {
    const Value& count = arg(args, kwargs, 2, "count");
    return Value::string(py_replace(str(v), str(arg(args, kwargs, 0, "old")),
                                    str(arg(args, kwargs, 1, "new")),
                                    count.undefined() ? -1 : count.as_int()));
  }
  if (name == "int") {
    if (v.is_number()) return Value::integer(v.as_int());
    try {
      return Value::integer(std::stoll(py_strip(str(v), Value(), true, true)));
    } catch (const std::exception&) {
      const Value& d = arg(args, kwargs, 0, "default");
      return d.undefined() ? Value::integer(0) : d;
    }
  }
  if (name == "float") {
    if (v.is_number()) return Value::real(v.as_double());
    try {
      return Value::real(std::stod(py_strip(str(v), Value(), true, true)));
    } catch (const std::exception&) {
      return Value::real(0);
    }
  }
  if (name == "abs") {
    if (!v.is_number()) fail("bad operand type for abs(): '{}'", type_name(v));
    return v.kind == Value::Kind::kFloat ? Value::real(std::fabs(v.f))
                                         : Value::integer(std::llabs(v.as_int()));
  }
  if (name == "items") {
    if (v.kind != Value::Kind::kDict) fail("filter 'items' needs a mapping, not {}", type_name(v));
    Args none;
    Kwargs no_kwargs;
    return r.call(method(v, "items"), none, no_kwargs);
  }
  if (name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
    const bool by_attr = name == "selectattr" || name == "rejectattr";
    const bool keep_if = name == "selectattr" || name == "select";
    const size_t test_at = by_attr ? 1 : 0;
    List out;
    for (const Value& x : iterate(v)) {
      const Value subject = by_attr ? item(x, arg(args, {}, 0, "")) : x;
      bool hit;
      if (args.size() <= test_at) {
        hit = truthy(subject);
      } else {
        const Args test_args(args.begin() + static_cast<long>(test_at) + 1, args.end());
        hit = test(str(args[test_at]), subject, test_args);
      }
      if (hit == keep_if) out.push_back(x);
    }
    return Value::make_list(std::move(out));
  }
  if (name == "map") {
    const Value& attr = arg({}, kwargs, 0, "attribute");
    List out;
    for (const Value& x : iterate(v)) {
      if (!attr.undefined()) {
        out.push_back(item(x, attr));
      } else {
        if (args.empty()) fail("map needs a filter name or attribute=");
        Args rest(args.begin() + 1, args.end());
        out.push_back(filter(r, str(args[0]), x, rest, kwargs));
      }
    }
    return Value::make_list(std::move(out));
  }
  fail("no filter named '{}'", name);
}

}  // namespace

struct Template::Impl {
  Body body;
};

Template Template::parse(std::string_view source) {
  auto impl = std::make_shared<Impl>();
  impl->body = Parser(lex(source)).parse_all();
  return Template(std::move(impl));
}

std::string Template::render(const nlohmann::ordered_json& context) const {
  MLA_REQUIRE(context.is_object(), "template context: expected an object");
  Renderer renderer;
  renderer.set_context(context);
  std::string out;
  try {
    renderer.exec(impl_->body, out);
  } catch (const Raised& r) {
    MLA_THROW(kInvalidArgument, "{}", r.message);
  } catch (const RenderError& e) {
    MLA_THROW(kInvalidArgument, "line {}: {}", renderer.line(), e.message);
  }
  return out;
}

Template::Template(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

}  // namespace mla::jinja
