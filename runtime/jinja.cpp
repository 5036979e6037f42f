#include "runtime/jinja.h"

#include <ctime>
#include <map>

#include "kernels/error.h"
#include "runtime/jinja_parser.h"
#include "runtime/jinja_value.h"

namespace mla::jinja {
namespace {

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
        return filter(e.name, v, args, kwargs);
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

}  // namespace

struct Template::Impl {
  Body body;
};

Template Template::parse(std::string_view source) {
  auto impl = std::make_shared<Impl>();
  impl->body = parse_template(source);
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
