// Jinja: the part of the Jinja2 template language that Hugging Face chat templates are written
// in, rendered as transformers renders them (an ImmutableSandboxedEnvironment with
// trim_blocks and lstrip_blocks, the loopcontrols extension, Python semantics for values, and
// transformers' own `tojson` filter: json.dumps with ensure_ascii=False, keys in their order).
// runtime/chat_template.h uses it; tests compare its output with transformers' on the
// published DeepSeek templates (tests/data/tokenizers/*/chat_cases.json).
//
// Supported:
//   {{ expr }}, {% if/elif/else/endif %}, {% for a[, b] in expr [if cond] %}...{% else %}
//   {% endfor %} (loop.index, index0, revindex, revindex0, first, last, length, previtem,
//   nextitem), {% set x = expr %}, {% set ns.attr = expr %}, {% set x %}...{% endset %},
//   {% break %}, {% continue %}, {% macro name(args) %}...{% endmacro %}, {% generation %},
//   {# comments #}, whitespace control (-, +), trim_blocks and lstrip_blocks.
//   Expressions: literals (strings with Python escapes, ints, floats, true/false/none in
//   either case, lists, tuples as lists, dicts), names, a.b, a[b], slices a[i:j:k], calls
//   with keyword arguments, x if c else y, or/and/not, == != < > <= >= in, not in, + - * / //
//   % ** ~, unary -, filters (x | f(args)) and tests (x is [not] t).
//   Globals: raise_exception(msg), namespace(k=v...), range(...), strftime_now(fmt).
//   Filters: length/count, trim, tojson(indent), string, lower, upper, capitalize, title,
//   default/d, join, first, last, list, reverse, replace, int, float, abs, items,
//   selectattr/rejectattr/select/reject (with a test), map(attribute=)/map(filter), safe, e.
//   Tests: defined, undefined, none, string, number, integer, float, boolean, mapping,
//   iterable, sequence, callable, true, false, odd, even, divisibleby, equalto/eq/==, ne,
//   in, sameas.
//   String methods: split, rsplit, strip, lstrip, rstrip, startswith, endswith, upper, lower,
//   replace, find, count, join, title, capitalize; dict methods: items, keys, values, get.
// Anything else is refused: unknown syntax when parsing, unknown filters, tests and methods
// when rendering, with the template's line.
//
// Scoping as in Jinja2: a for loop's body and a macro have their own scope (what they set is
// gone after each iteration and after the loop); namespace() objects carry state out.
// Undefined values (missing variables, keys and attributes) print as nothing and are false;
// reading an attribute of one is an error.
//
// Immutable after parsing; render() is thread-safe.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace mla::jinja {

class Template {
 public:
  // Throws kInvalidArgument ("line N: ...") for syntax outside the supported part.
  static Template parse(std::string_view source);

  // Renders with the variables of `context` (a JSON object; its objects keep their key order).
  // Throws kInvalidArgument ("line N: ...") for an error while rendering, and with the
  // template's own message for raise_exception().
  std::string render(const nlohmann::ordered_json& context) const;

  ~Template();
  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;

 private:
  struct Impl;
  explicit Template(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

}  // namespace mla::jinja
