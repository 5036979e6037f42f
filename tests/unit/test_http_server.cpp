// HttpServer (rpc/http_server.h) on loopback: whole responses on a kept-alive connection,
// chunked streams whose writes complete one by one, the handler told when its client leaves,
// refusals before any handler (413), many clients that close the moment their answer has come
// (the server must not touch a response it is still writing), and stop() with clients open.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <string>
#include <thread>

#include "rpc/http_server.h"

namespace mla {
namespace {

using namespace std::chrono_literals;

// A raw TCP connection to the server, for what httplib will not do (close mid-answer).
int connect_to(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  return fd;
}

TEST(HttpServer, AnswersWholeRequestsOnAKeptAliveConnection) {
  HttpServer server({}, [](HttpRequest r, std::shared_ptr<HttpExchange> e) {
    e->respond(200, "text/plain", r.method + " " + r.target + " " + r.body + " " + r.header("x-a"));
  });
  httplib::Client client("127.0.0.1", server.port());
  client.set_keep_alive(true);
  client.set_tcp_nodelay(true);
  for (int i = 0; i < 50; ++i) {
    const auto res =
        client.Post("/p?q=1", httplib::Headers{{"X-A", "v"}}, std::to_string(i), "text/plain");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
    EXPECT_EQ(res->body, "POST /p?q=1 " + std::to_string(i) + " v");
  }
  EXPECT_EQ(server.connections(), 1u) << "one connection for all 50 requests";
}

TEST(HttpServer, StreamsChunksEachAfterThePreviousWasWritten) {
  HttpServer server({}, [](HttpRequest, std::shared_ptr<HttpExchange> e) {
    e->start(200, "text/event-stream");
    // Each chunk only once the previous one has gone out.
    auto step = std::make_shared<std::function<void(int)>>();
    *step = [e, step](int i) {
      if (i == 5) {
        e->finish();
        *step = nullptr;  // breaks the cycle
        return;
      }
      e->write("data: " + std::to_string(i) + "\n\n", [step, i](bool ok) {
        if (ok && *step) (*step)(i + 1);
      });
    };
    (*step)(0);
  });
  httplib::Client client("127.0.0.1", server.port());
  const auto res = client.Get("/s");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/event-stream");
  EXPECT_EQ(res->body, "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n");
}

TEST(HttpServer, TellsTheHandlerWhenItsClientLeaves) {
  std::promise<void> left;
  std::shared_ptr<HttpExchange> held;
  HttpServer server({}, [&](HttpRequest, std::shared_ptr<HttpExchange> e) {
    held = e;  // answered never: the client leaves first
    e->on_close([&left] { left.set_value(); });
  });
  const int fd = connect_to(server.port());
  const std::string req = "GET /wait HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(::write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
  std::this_thread::sleep_for(100ms);
  ::close(fd);
  EXPECT_EQ(left.get_future().wait_for(5s), std::future_status::ready);
  bool written = true;
  std::promise<void> done;
  held->write("late", [&](bool ok) {
    written = ok;
    done.set_value();
  });
  ASSERT_EQ(done.get_future().wait_for(5s), std::future_status::ready);
  EXPECT_FALSE(written) << "a write after the client left completes with ok = false";
}

TEST(HttpServer, RefusesABodyOverTheLimitBeforeAnyHandler) {
  HttpServerOptions o;
  o.max_body_bytes = 1024;
  std::atomic<int> handled{0};
  HttpServer server(o, [&](HttpRequest, std::shared_ptr<HttpExchange> e) {
    ++handled;
    e->respond(200, "text/plain", "ok");
  });
  httplib::Client client("127.0.0.1", server.port());
  const auto res = client.Post("/big", std::string(5000, 'x'), "text/plain");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 413);
  EXPECT_NE(res->body.find("\"error\""), std::string::npos) << res->body;
  EXPECT_EQ(handled, 0);
  httplib::Client again("127.0.0.1", server.port());
  EXPECT_EQ(again.Post("/small", "x", "text/plain")->status, 200);
}

TEST(HttpServer, SurvivesClientsThatCloseAsSoonAsTheyHaveTheirAnswer) {
  HttpServer server({}, [](HttpRequest, std::shared_ptr<HttpExchange> e) {
    e->respond(400, "application/json", std::string(300, 'e'));
  });
  for (int i = 0; i < 500; ++i) {
    const int fd = connect_to(server.port());
    const std::string req = "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
    ASSERT_EQ(::write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
    char buf[64];
    ASSERT_GT(::read(fd, buf, sizeof buf), 0);
    ::close(fd);  // before the server's write completion has run
  }
  httplib::Client client("127.0.0.1", server.port());
  const auto res = client.Get("/still");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
}

TEST(HttpServer, StopsWithClientsStillConnected) {
  auto server = std::make_unique<HttpServer>(
      HttpServerOptions{}, [](HttpRequest, std::shared_ptr<HttpExchange>) {});  // never answers
  const int fd = connect_to(server->port());
  const std::string req = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(::write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
  std::this_thread::sleep_for(50ms);
  const auto start = std::chrono::steady_clock::now();
  server.reset();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
  char buf[16];
  EXPECT_EQ(::read(fd, buf, sizeof buf), 0) << "the connection was closed";
  ::close(fd);
}

}  // namespace
}  // namespace mla
