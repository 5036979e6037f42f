#include <locale.h>

#include <algorithm>
#include <clocale>
#include <cmath>
#include <cwctype>

#include "runtime/jinja_value.h"
#include "runtime/utf8.h"

namespace mla::jinja {

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

namespace {

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

}  // namespace

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

Value filter(const std::string& name, const Value& v, Args& args, Kwargs& kwargs) {
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
    return (*method(v, "items").fn)(none, no_kwargs);
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
        out.push_back(filter(str(args[0]), x, rest, kwargs));
      }
    }
    return Value::make_list(std::move(out));
  }
  fail("no filter named '{}'", name);
}

}  // namespace mla::jinja
