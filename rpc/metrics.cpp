#include "rpc/metrics.h"

#include <fmt/format.h>
#include <httplib.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "kernels/error.h"

namespace mla {
namespace {

bool valid_metric_name(const std::string& name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

bool valid_label_name(const std::string& name) {
  if (name.empty() || name.rfind("__", 0) == 0) return false;  // "__" names are reserved
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

// Go's ParseFloat (what Prometheus uses) reads fmt's shortest round-trip form, but spells
// the special values its own way.
std::string format_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  return fmt::format("{}", v);
}

std::string escape_help(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string escape_label_value(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

// {a="1",b="2"}, with `le` last when given; empty when there are no labels at all.
std::string format_labels(const Labels& labels, const std::string* le = nullptr) {
  if (labels.empty() && le == nullptr) return "";
  std::string out = "{";
  bool first = true;
  for (const auto& [name, value] : labels) {
    if (!first) out += ',';
    first = false;
    out += name;
    out += "=\"";
    out += escape_label_value(value);
    out += '"';
  }
  if (le != nullptr) {
    if (!first) out += ',';
    out += "le=\"";
    out += *le;
    out += '"';
  }
  out += '}';
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Metric types

void Counter::inc(double v) {
  MLA_REQUIRE(v >= 0.0, "a counter only goes up: inc({})", v);
  value_.fetch_add(v, std::memory_order_relaxed);
}

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)) {
  MLA_REQUIRE(!bounds_.empty(), "a histogram needs at least one bucket bound");
  for (size_t i = 0; i < bounds_.size(); ++i) {
    MLA_REQUIRE(std::isfinite(bounds_[i]), "histogram bound {} is not finite", bounds_[i]);
    MLA_REQUIRE(i == 0 || bounds_[i] > bounds_[i - 1],
                "histogram bounds must increase strictly: {} follows {}", bounds_[i],
                bounds_[i - 1]);
  }
  buckets_ = std::make_unique<std::atomic<uint64_t>[]>(bounds_.size() + 1);
  for (size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0, std::memory_order_relaxed);
}

void Histogram::observe(double v) {
  // Prometheus buckets are upper-inclusive: the first bound >= v.
  const size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::cumulative_counts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  uint64_t total = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    total += buckets_[i].load(std::memory_order_relaxed);
    out[i] = total;
  }
  return out;
}

uint64_t Histogram::count() const { return cumulative_counts().back(); }

// ---------------------------------------------------------------------------------------
// Registry

const char* MetricsRegistry::type_name(Type type) {
  switch (type) {
    case Type::kCounter:
      return "counter";
    case Type::kGauge:
      return "gauge";
    case Type::kHistogram:
      return "histogram";
  }
  return "untyped";
}

MetricsRegistry::Family& MetricsRegistry::family(const std::string& name, const std::string& help,
                                                 Type type, const Labels& labels) {
  MLA_REQUIRE(valid_metric_name(name), "invalid metric name '{}'", name);
  for (const auto& [label, value] : labels) {
    MLA_REQUIRE(valid_label_name(label), "metric {}: invalid label name '{}'", name, label);
    MLA_REQUIRE(!(type == Type::kHistogram && label == "le"),
                "metric {}: histograms reserve the label 'le'", name);
  }
  auto [it, inserted] = families_.try_emplace(name);
  if (inserted) {
    it->second.type = type;
    it->second.help = help;
  }
  MLA_REQUIRE(it->second.type == type, "metric {} is already registered as a {}, not a {}", name,
              type_name(it->second.type), type_name(type));
  return it->second;
}

Counter& MetricsRegistry::counter(const std::string& name, const std::string& help,
                                  const Labels& labels) {
  std::lock_guard lock(mutex_);
  auto& slot = family(name, help, Type::kCounter, labels).counters[labels];
  if (!slot) slot = std::make_unique<Counter>();
  return *slot;
}

Gauge& MetricsRegistry::gauge(const std::string& name, const std::string& help,
                              const Labels& labels) {
  std::lock_guard lock(mutex_);
  auto& slot = family(name, help, Type::kGauge, labels).gauges[labels];
  if (!slot) slot = std::make_unique<Gauge>();
  return *slot;
}

Histogram& MetricsRegistry::histogram(const std::string& name, const std::string& help,
                                      const std::vector<double>& bounds, const Labels& labels) {
  // Validate before touching the registry, so a bad call leaves nothing behind.
  auto made = std::make_unique<Histogram>(bounds);
  std::lock_guard lock(mutex_);
  const bool is_new = families_.find(name) == families_.end();
  Family& fam = family(name, help, Type::kHistogram, labels);
  if (is_new) fam.bounds = bounds;
  MLA_REQUIRE(fam.bounds == bounds, "metric {} is already registered with other bucket bounds",
              name);
  auto& slot = fam.histograms[labels];
  if (!slot) slot = std::move(made);
  return *slot;
}

std::string MetricsRegistry::render() const {
  std::lock_guard lock(mutex_);
  std::string out;
  for (const auto& [name, fam] : families_) {
    out += fmt::format("# HELP {} {}\n", name, escape_help(fam.help));
    out += fmt::format("# TYPE {} {}\n", name, type_name(fam.type));
    for (const auto& [labels, c] : fam.counters) {
      out += fmt::format("{}{} {}\n", name, format_labels(labels), format_value(c->value()));
    }
    for (const auto& [labels, g] : fam.gauges) {
      out += fmt::format("{}{} {}\n", name, format_labels(labels), format_value(g->value()));
    }
    for (const auto& [labels, h] : fam.histograms) {
      // Read the buckets once, so _count agrees with the +Inf bucket.
      const std::vector<uint64_t> counts = h->cumulative_counts();
      for (size_t i = 0; i < counts.size(); ++i) {
        const std::string le = i < h->bounds().size() ? format_value(h->bounds()[i]) : "+Inf";
        out += fmt::format("{}_bucket{} {}\n", name, format_labels(labels, &le), counts[i]);
      }
      out += fmt::format("{}_sum{} {}\n", name, format_labels(labels), format_value(h->sum()));
      out += fmt::format("{}_count{} {}\n", name, format_labels(labels), counts.back());
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// HTTP server

MetricsServer::MetricsServer(const MetricsRegistry& registry, const std::string& host, int port,
                             std::function<bool()> ready)
    : host_(host), server_(std::make_unique<httplib::Server>()) {
  MLA_REQUIRE(port >= 0 && port <= 65535, "metrics port {} is out of range", port);
  // Scrapes are rare and small: two threads are plenty, and a short keep-alive keeps stop()
  // from waiting on an idle scraper connection.
  server_->new_task_queue = [] { return new httplib::ThreadPool(2); };
  server_->set_keep_alive_timeout(1);
  // httplib's default sets SO_REUSEPORT, which lets a second process bind the same port
  // and silently split the scrapes; SO_REUSEADDR alone still allows a quick restart.
  server_->set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  server_->Get("/metrics", [&registry](const httplib::Request&, httplib::Response& res) {
    res.set_content(registry.render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  // Liveness: the process answers. Readiness: it can serve (`ready`); /healthz is readiness
  // too, for probes written against it.
  server_->Get("/livez", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
  });
  auto readiness = [ready = std::move(ready)](const httplib::Request&, httplib::Response& res) {
    const bool ok = !ready || ready();
    res.status = ok ? 200 : 503;
    res.set_content(ok ? "ready\n" : "not ready\n", "text/plain");
  };
  server_->Get("/readyz", readiness);
  server_->Get("/healthz", readiness);

  if (port == 0) {
    port_ = server_->bind_to_any_port(host);
  } else {
    port_ = server_->bind_to_port(host, port) ? port : -1;
  }
  if (port_ < 0) {
    MLA_THROW(kUnavailable, "metrics server cannot bind {}:{}", host, port);
  }

  thread_ = std::thread([this] {
    server_->listen_after_bind();
    listen_returned_ = true;
  });
  // httplib's stop() is a no-op until the accept loop runs, so wait for it here: after the
  // constructor, stop() always ends the loop.
  while (!server_->is_running() && !listen_returned_) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  spdlog::info("metrics: serving http://{}:{}/metrics", host_, port_);
}

MetricsServer::~MetricsServer() { stop(); }

void MetricsServer::stop() {
  std::lock_guard lock(stop_mutex_);
  if (!thread_.joinable()) return;
  server_->stop();
  thread_.join();
}

// ---------------------------------------------------------------------------------------
// Standard metric sets

std::vector<double> ttft_buckets() {
  return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
}

std::vector<double> inter_token_latency_buckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28};
}

RequestMetrics::RequestMetrics(MetricsRegistry& registry, const Labels& labels)
    : tokens_generated(registry.counter("mlaserve_tokens_generated_total",
                                        "Tokens generated and sent to clients.", labels)),
      ttft_seconds(registry.histogram("mlaserve_ttft_seconds",
                                      "Time from a request's arrival to its first token.",
                                      ttft_buckets(), labels)),
      inter_token_latency_seconds(registry.histogram(
          "mlaserve_inter_token_latency_seconds", "Time between consecutive tokens of one request.",
          inter_token_latency_buckets(), labels)),
      in_flight(registry.gauge("mlaserve_requests_in_flight", "Requests accepted and not finished.",
                               labels)),
      queue_depth(
          registry.gauge("mlaserve_requests_waiting", "Requests waiting to be scheduled.", labels)),
      registry_(registry),
      labels_(labels) {}

Counter& RequestMetrics::requests_total(std::string_view code) {
  Labels labels = labels_;
  labels["code"] = std::string(code);
  return registry_.counter("mlaserve_requests_total",
                           "Finished Generate calls, by gRPC status code.", labels);
}

CacheMetrics::CacheMetrics(MetricsRegistry& registry, const Labels& labels)
    : pages_used(registry.gauge("mlaserve_cache_pages_used", "Latent-cache pages in use.", labels)),
      pages_total(
          registry.gauge("mlaserve_cache_pages_capacity", "Latent-cache pages in all.", labels)),
      prefix_lookup_tokens(
          registry.counter("mlaserve_prefix_cache_lookup_tokens_total",
                           "Prompt tokens in full pages looked up in the prefix cache.", labels)),
      prefix_hit_tokens(registry.counter("mlaserve_prefix_cache_hit_tokens_total",
                                         "Prompt tokens served from cached pages.", labels)),
      prefix_evicted_pages(registry.counter("mlaserve_prefix_cache_evicted_pages_total",
                                            "Cached pages evicted for room.", labels)),
      prefix_kept_pages(
          registry.gauge("mlaserve_prefix_cache_kept_pages", "Pages kept for reuse.", labels)) {}

void CacheMetrics::update_prefix(const PrefixStats& stats, int32_t kept) {
  prefix_lookup_tokens.inc(static_cast<double>(stats.lookup_tokens - seen_.lookup_tokens));
  prefix_hit_tokens.inc(static_cast<double>(stats.hit_tokens - seen_.hit_tokens));
  prefix_evicted_pages.inc(static_cast<double>(stats.evicted_pages - seen_.evicted_pages));
  prefix_kept_pages.set(kept);
  seen_ = stats;
}

std::vector<double> request_duration_buckets() {
  return {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
}

CoordinatorMetrics::CoordinatorMetrics(MetricsRegistry& registry)
    : RequestMetrics(registry),
      prompt_tokens(registry.counter("mlaserve_prompt_tokens_total",
                                     "Prompt tokens of the requests admitted.")),
      request_duration_seconds(registry.histogram(
          "mlaserve_request_duration_seconds",
          "Time from a request's arrival to the end of its stream.", request_duration_buckets())),
      time_per_output_token_seconds(registry.histogram(
          "mlaserve_time_per_output_token_seconds",
          "Per request: time from the first token to the last over the tokens after the first.",
          inter_token_latency_buckets())),
      workers_alive(registry.gauge("mlaserve_workers_alive",
                                   "Worker groups alive (heartbeating, not draining).")),
      failovers(registry.counter("mlaserve_failovers_total",
                                 "Requests moved to another worker after a worker failed.")),
      admission_rejections(
          registry.counter("mlaserve_admission_rejections_total",
                           "Requests refused with RESOURCE_EXHAUSTED at the admission limit.")),
      write_timeouts(
          registry.counter("mlaserve_stream_write_timeouts_total",
                           "Streams cancelled because their client stopped taking messages.")),
      migration_bytes(registry.counter("mlaserve_migration_bytes_total",
                                       "Latent cache bytes moved by live migrations.")),
      migration_stop_seconds(registry.histogram(
          "mlaserve_migration_stop_seconds",
          "Per migration: how long the request stood still at its source (the final stage).",
          inter_token_latency_buckets())),
      rebalances_total(
          registry.counter("mlaserve_rebalances_total",
                           "Migrations queued by rebalancing, off a worker short of cache pages.")),
      registry_(registry) {}

Counter& CoordinatorMetrics::migrations_total(std::string_view outcome) {
  return registry_.counter("mlaserve_migrations_total", "Live migrations by outcome.",
                           {{"outcome", std::string(outcome)}});
}

}  // namespace mla
