#include "runtime/jinja_value.h"

#include <algorithm>
#include <charconv>
#include <cmath>

#include "runtime/utf8.h"

namespace mla::jinja {

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

}  // namespace mla::jinja
