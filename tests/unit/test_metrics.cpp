#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <atomic>
#include <limits>
#include <sstream>
#include <thread>
#include <vector>

#include "kernels/error.h"
#include "rpc/metrics.h"

namespace mla {
namespace {

using ::testing::HasSubstr;

TEST(Metrics, RendersCounterAndGaugeExactly) {
  MetricsRegistry registry;
  registry.counter("mlaserve_requests_total", "Finished requests.", {{"code", "OK"}}).inc(3);
  registry
      .counter("mlaserve_requests_total", "ignored: first help wins",
               {{"code", "INVALID_ARGUMENT"}})
      .inc();
  Gauge& g = registry.gauge("mlaserve_queue_depth", "Waiting requests.");
  g.set(5);
  g.dec(2);
  g.inc(0.5);
  EXPECT_EQ(registry.render(),
            "# HELP mlaserve_queue_depth Waiting requests.\n"
            "# TYPE mlaserve_queue_depth gauge\n"
            "mlaserve_queue_depth 3.5\n"
            "# HELP mlaserve_requests_total Finished requests.\n"
            "# TYPE mlaserve_requests_total counter\n"
            "mlaserve_requests_total{code=\"INVALID_ARGUMENT\"} 1\n"
            "mlaserve_requests_total{code=\"OK\"} 3\n");
}

TEST(Metrics, SameNameAndLabelsGiveTheSameObject) {
  MetricsRegistry registry;
  Counter& a = registry.counter("c_total", "h", {{"x", "1"}});
  Counter& b = registry.counter("c_total", "h", {{"x", "1"}});
  Counter& c = registry.counter("c_total", "h", {{"x", "2"}});
  EXPECT_EQ(&a, &b);
  EXPECT_NE(&a, &c);
}

TEST(Metrics, RendersHistogramCumulativeWithInf) {
  MetricsRegistry registry;
  Histogram& h = registry.histogram("lat_seconds", "Latency.", {0.1, 0.5, 1}, {{"w", "a"}});
  h.observe(0.05);  // bucket 0.1
  h.observe(0.1);   // upper bound is inclusive: bucket 0.1
  h.observe(0.3);   // 0.5
  h.observe(2);     // +Inf
  h.observe(7);     // +Inf
  EXPECT_EQ(h.count(), 5u);
  EXPECT_EQ(registry.render(),
            "# HELP lat_seconds Latency.\n"
            "# TYPE lat_seconds histogram\n"
            "lat_seconds_bucket{w=\"a\",le=\"0.1\"} 2\n"
            "lat_seconds_bucket{w=\"a\",le=\"0.5\"} 3\n"
            "lat_seconds_bucket{w=\"a\",le=\"1\"} 3\n"
            "lat_seconds_bucket{w=\"a\",le=\"+Inf\"} 5\n"
            "lat_seconds_sum{w=\"a\"} 9.45\n"
            "lat_seconds_count{w=\"a\"} 5\n");
}

TEST(Metrics, RendersUnlabelledHistogram) {
  MetricsRegistry registry;
  registry.histogram("h", "H.", {1});
  EXPECT_EQ(registry.render(),
            "# HELP h H.\n"
            "# TYPE h histogram\n"
            "h_bucket{le=\"1\"} 0\n"
            "h_bucket{le=\"+Inf\"} 0\n"
            "h_sum 0\n"
            "h_count 0\n");
}

TEST(Metrics, EscapesLabelValuesAndHelp) {
  MetricsRegistry registry;
  registry.gauge("g", "a \\ back\nslash", {{"path", "C:\\dir \"q\"\nnext"}}).set(1);
  EXPECT_EQ(registry.render(),
            "# HELP g a \\\\ back\\nslash\n"
            "# TYPE g gauge\n"
            "g{path=\"C:\\\\dir \\\"q\\\"\\nnext\"} 1\n");
}

TEST(Metrics, FormatsSpecialValues) {
  MetricsRegistry registry;
  registry.gauge("a", "").set(std::numeric_limits<double>::infinity());
  registry.gauge("b", "").set(-std::numeric_limits<double>::infinity());
  registry.gauge("c", "").set(std::numeric_limits<double>::quiet_NaN());
  registry.gauge("d", "").set(1e-5);
  const std::string text = registry.render();
  EXPECT_THAT(text, HasSubstr("\na +Inf\n"));
  EXPECT_THAT(text, HasSubstr("\nb -Inf\n"));
  EXPECT_THAT(text, HasSubstr("\nc NaN\n"));
  EXPECT_THAT(text, HasSubstr("\nd 1e-05\n"));
}

TEST(Metrics, RejectsBadNamesTypesAndBounds) {
  MetricsRegistry registry;
  registry.counter("x_total", "h");
  auto code_of = [](auto&& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return e.code();
    }
    return ErrorCode::kInternal;
  };
  EXPECT_EQ(code_of([&] { registry.gauge("x_total", "h"); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { registry.counter("1bad", "h"); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] {
              registry.counter("ok", "h", {{"bad-label", "v"}});
            }),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { registry.histogram("h", "h", {1, 1}); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { registry.histogram("h", "h", {}); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] {
              registry.histogram("h", "h", {1}, {{"le", "x"}});
            }),
            ErrorCode::kInvalidArgument);
  registry.histogram("h2", "h", {1, 2});
  EXPECT_EQ(code_of([&] { registry.histogram("h2", "h", {1, 3}); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { registry.counter("x_total", "h").inc(-1); }),
            ErrorCode::kInvalidArgument);
  // Failed registrations leave nothing behind.
  EXPECT_THAT(registry.render(), ::testing::Not(HasSubstr("# TYPE h histogram")));
}

TEST(Metrics, ConcurrentUpdatesSumCorrectly) {
  MetricsRegistry registry;
  constexpr int kThreads = 8;
  constexpr int kIters = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&registry, t] {
      // Looking metrics up concurrently is part of what is tested.
      Counter& c = registry.counter("c_total", "c");
      Gauge& g = registry.gauge("g", "g");
      Histogram& h = registry.histogram("h", "h", {0.5, 1.5});
      for (int i = 0; i < kIters; ++i) {
        c.inc();
        g.inc(2);
        g.dec();
        h.observe(t % 2 == 0 ? 1.0 : 2.0);
        if (i % 5000 == 0) (void)registry.render();
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(registry.counter("c_total", "c").value(), kThreads * kIters);
  EXPECT_EQ(registry.gauge("g", "g").value(), kThreads * kIters);
  Histogram& h = registry.histogram("h", "h", {0.5, 1.5});
  EXPECT_EQ(h.count(), static_cast<uint64_t>(kThreads * kIters));
  EXPECT_EQ(h.cumulative_counts(),
            (std::vector<uint64_t>{0, kThreads / 2 * kIters, kThreads * kIters}));
  EXPECT_EQ(h.sum(), kThreads / 2 * kIters * 1.0 + kThreads / 2 * kIters * 2.0);
}

TEST(Metrics, StandardSetsUseDocumentedNames) {
  MetricsRegistry registry;
  RequestMetrics req(registry, {{"worker", "w0"}});
  CacheMetrics cache(registry, {{"worker", "w0"}});
  req.requests_total("OK").inc();
  req.tokens_generated.inc(7);
  req.ttft_seconds.observe(0.02);
  req.inter_token_latency_seconds.observe(0.003);
  req.in_flight.set(2);
  req.queue_depth.set(1);
  cache.pages_used.set(10);
  cache.pages_total.set(64);
  const std::string text = registry.render();
  EXPECT_THAT(text, HasSubstr("mlaserve_requests_total{code=\"OK\",worker=\"w0\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("mlaserve_tokens_generated_total{worker=\"w0\"} 7\n"));
  EXPECT_THAT(text, HasSubstr("mlaserve_ttft_seconds_bucket{worker=\"w0\",le=\"0.025\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("mlaserve_inter_token_latency_seconds_count{worker=\"w0\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("mlaserve_requests_in_flight{worker=\"w0\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("mlaserve_requests_waiting{worker=\"w0\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("mlaserve_cache_pages_used{worker=\"w0\"} 10\n"));
  EXPECT_THAT(text, HasSubstr("mlaserve_cache_pages_capacity{worker=\"w0\"} 64\n"));
  // Only counters end in _total.
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("# TYPE ", 0) != 0) continue;
    const bool total = line.find("_total ") != std::string::npos;
    EXPECT_EQ(total, line.ends_with(" counter")) << line;
  }
  // A second set in the same registry (same labels) shares the metrics.
  RequestMetrics again(registry, {{"worker", "w0"}});
  EXPECT_EQ(&again.tokens_generated, &req.tokens_generated);
}

TEST(MetricsServer, ServesMetricsAndHealthOverLoopback) {
  MetricsRegistry registry;
  registry.counter("mlaserve_tokens_generated_total", "Tokens.").inc(42);
  std::atomic<bool> ready{true};
  MetricsServer server(registry, "127.0.0.1", 0, [&ready] { return ready.load(); });
  ASSERT_GT(server.port(), 0);

  httplib::Client http("127.0.0.1", server.port());
  http.set_connection_timeout(5);
  auto res = http.Get("/metrics");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_EQ(res->body, registry.render());
  EXPECT_THAT(res->body, HasSubstr("mlaserve_tokens_generated_total 42\n"));

  // Readiness follows the callback (/healthz is its older name); liveness does not.
  for (const char* path : {"/readyz", "/healthz"}) {
    ready = true;
    res = http.Get(path);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200) << path;
    EXPECT_EQ(res->body, "ready\n");
    ready = false;
    res = http.Get(path);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 503) << path;
    EXPECT_EQ(res->body, "not ready\n");
  }
  res = http.Get("/livez");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->body, "ok\n");

  res = http.Get("/other");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);

  server.stop();
  server.stop();  // idempotent
  httplib::Client after("127.0.0.1", server.port());
  after.set_connection_timeout(1);
  EXPECT_FALSE(after.Get("/metrics"));
}

TEST(MetricsServer, BusyPortIsUnavailable) {
  MetricsRegistry registry;
  MetricsServer first(registry, "127.0.0.1", 0);
  try {
    MetricsServer second(registry, "127.0.0.1", first.port());
    FAIL() << "bound a port already in use";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnavailable);
    EXPECT_THAT(e.what(), HasSubstr(std::to_string(first.port())));
  }
}

TEST(MetricsServer, StartsAndStopsRepeatedly) {
  MetricsRegistry registry;
  for (int i = 0; i < 20; ++i) {
    MetricsServer server(registry, "127.0.0.1", 0);
  }
}

}  // namespace
}  // namespace mla
