// HttpServer: a small HTTP/1.1 server (Boost.Beast over Asio) under the coordinator's
// OpenAI-compatible API (rpc/openai_api.h). A fixed pool of threads serves any number of
// connections: nothing blocks a thread while a response waits for tokens. A response is
// either whole (respond) or streamed with chunked transfer encoding (start, write ..., finish),
// where each write says when it has gone out, so the producer sends the next piece only then
// (backpressure: a slow client slows its own stream, not the server's memory).
//
// Contracts:
// - Requests: bodies over max_body_bytes get 413, headers over 16 KiB or malformed requests
//   400 (each as an OpenAI error object), and the connection closes; otherwise the handler is
//   called once per request, on a server thread, and must not block.
// - The handler answers through its HttpExchange exactly once: respond(), or start() and then
//   write()s and finish(). These may be called from any thread; the exchange keeps the
//   connection alive until it is answered or the client is gone.
// - on_close(cb): cb runs once, on a server thread, if the client goes away (closes, resets,
//   or stops reading for write_timeout) before the answer is complete; writes after that
//   complete with ok = false.
// - Connections are kept alive between requests (HTTP/1.1), and closed after idle_timeout.
//
// Thread safety: all methods may be called from any thread. Lifetime: stop() (or the
// destructor) closes every connection and joins the threads; exchanges still held elsewhere
// then do nothing when called.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

namespace mla {

struct HttpRequest {
  std::string method;                          // "GET", "POST", ...
  std::string target;                          // the path and query, e.g. "/v1/models"
  std::map<std::string, std::string> headers;  // names in lower case
  std::string body;

  // The header's value, or "" when absent (`name` in lower case).
  std::string header(const std::string& name) const;
};

class HttpExchange {
 public:
  virtual ~HttpExchange() = default;
  // A whole response. `headers`: extra header lines (name -> value).
  virtual void respond(int status, const std::string& content_type, std::string body,
                       std::map<std::string, std::string> headers = {}) = 0;
  // Starts a chunked response; `headers` as in respond().
  virtual void start(int status, const std::string& content_type,
                     std::map<std::string, std::string> headers = {}) = 0;
  // Sends one chunk; `done(ok)` runs on a server thread once it has been written (ok true) or
  // cannot be (the client is gone: ok false).
  virtual void write(std::string data, std::function<void(bool ok)> done) = 0;
  // Ends a chunked response.
  virtual void finish() = 0;
  // See the contract above; a callback set after the client left runs at once.
  virtual void on_close(std::function<void()> cb) = 0;
};

using HttpHandler = std::function<void(HttpRequest, std::shared_ptr<HttpExchange>)>;

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  int32_t port = 0;                  // 0: any free port (see port())
  int32_t threads = 2;               // Default: 2.
  size_t max_body_bytes = 4 << 20;   // Default: 4 MiB.
  int32_t idle_timeout_ms = 60000;   // a connection waiting for a request. Default: 60 s.
  int32_t write_timeout_ms = 30000;  // a client not taking a write. Default: 30 s.
};

class HttpServer {
 public:
  // Listens at once; throws kUnavailable when the address cannot be bound.
  HttpServer(HttpServerOptions options, HttpHandler handler);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int32_t port() const;
  // Open connections (for tests and the metrics).
  size_t connections() const;
  void stop();

  struct Impl;  // the io_context, the acceptor and the open connections (http_server.cpp)

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace mla
