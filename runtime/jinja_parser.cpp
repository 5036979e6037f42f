#include "runtime/jinja_parser.h"

#include <algorithm>
#include <cctype>

#include "kernels/error.h"
#include "runtime/utf8.h"

namespace mla::jinja {
namespace {

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

}  // namespace

Body parse_template(std::string_view source) { return Parser(lex(source)).parse_all(); }

}  // namespace mla::jinja
