// A Jinja template's syntax tree and its parser: internal to runtime/jinja.cpp (jinja.h is
// the interface). The source is lexed into text, output ({{ }}) and statement ({% %})
// segments, with Jinja's whitespace control, trim_blocks and lstrip_blocks applied, and
// parsed by recursive descent with Jinja's precedence.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "runtime/jinja_value.h"

namespace mla::jinja {

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

// The syntax tree of `source`. Throws kInvalidArgument ("line N: ...") for what the template
// engine does not support.
Body parse_template(std::string_view source);

}  // namespace mla::jinja
