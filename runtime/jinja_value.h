// The values a Jinja template handles, with Python's semantics, and the builtins that act on
// them: internal to runtime/jinja.cpp (jinja.h is the interface). A render's errors are
// RenderError (Template::render adds the line) or Raised (raise_exception's own words).
#pragma once

#include <fmt/format.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mla::jinja {

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

inline Value Value::make_dict(bool is_namespace) {
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

// --- Python's semantics (jinja_value.cpp) ---

const char* type_name(const Value& v);
bool truthy(const Value& v);
std::string float_repr(double d);  // Python's repr of a float
std::string str(const Value& v);   // what {{ v }} prints
std::string repr(const Value& v);
bool equal(const Value& a, const Value& b);
bool less(const Value& a, const Value& b);              // fails for types Python cannot order
std::vector<size_t> char_starts(const std::string& s);  // strings index by characters
std::vector<uint32_t> code_points(const std::string& s);
std::string from_code_points(const std::vector<uint32_t>& cps);
bool py_space(uint32_t c);  // str.isspace for one character
int64_t length(const Value& v);
List iterate(const Value& v);  // what a for loop or a filter goes over
Value from_json(const nlohmann::ordered_json& j);
// json.dumps(v, ensure_ascii=False, indent=indent) as transformers' tojson filter calls it.
void dump_json(const Value& v, int indent, int depth, std::string& out);
Value attribute(const Value& obj, const std::string& name);  // obj.name
Value item(const Value& obj, const Value& key);              // obj[key]
Value slice(const Value& obj, const Value& lo, const Value& hi, const Value& step);
Value binary_op(const std::string& op, const Value& a, const Value& b);  // + - * / // % ** ~
bool contains(const Value& container, const Value& x);                   // x in container

// --- methods, tests and filters (jinja_builtins.cpp) ---

// Argument `index`, or the keyword `key`, or undefined.
const Value& arg(const Args& args, const Kwargs& kwargs, size_t index, std::string_view key);
// A string's or dict's method `name` bound to `self` (undefined when it has none).
Value method(const Value& self, const std::string& name);
// `v is name(args)`.
bool test(const std::string& name, const Value& v, const Args& args);
// `v | name(args, kwargs)`.
Value filter(const std::string& name, const Value& v, Args& args, Kwargs& kwargs);

}  // namespace mla::jinja
