#include "rpc/http_server.h"

#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <array>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cerrno>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/error.h"

namespace mla {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

constexpr size_t kMaxHeaderBytes = 16 << 10;

std::string error_body(const std::string& message, const char* type) {
  // The OpenAI error object, for what the server refuses before any handler sees it.
  std::string escaped;
  for (const char c : message) {
    if (c == '"' || c == '\\') escaped += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) escaped += c;
  }
  return fmt::format(
      R"({{"error": {{"message": "{}", "type": "{}", "param": null, "code": null}}}})", escaped,
      type);
}

}  // namespace

std::string HttpRequest::header(const std::string& name) const {
  const auto it = headers.find(name);
  return it == headers.end() ? std::string() : it->second;
}

class HttpSession;

struct HttpServer::Impl : std::enable_shared_from_this<HttpServer::Impl> {
  HttpServerOptions options;
  HttpHandler handler;
  net::io_context ioc;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  tcp::acceptor acceptor{ioc};
  std::vector<std::thread> threads;
  std::atomic<size_t> connections{0};
  std::mutex mu;
  bool stopped = false;                              // guarded by mu
  std::vector<std::weak_ptr<HttpSession>> sessions;  // guarded by mu

  void accept();
  bool is_stopped() {
    std::lock_guard lock(mu);
    return stopped;
  }
};

// One connection: reads requests one after another and writes their answers in order.
// Everything runs on the connection's strand.
class HttpSession : public std::enable_shared_from_this<HttpSession> {
 public:
  HttpSession(tcp::socket socket, std::shared_ptr<HttpServer::Impl> server)
      : server_(std::move(server)), stream_(std::move(socket)) {
    ++server_->connections;
    // Streamed chunks are small and must go out at once, not wait for the client's ACK.
    beast::error_code ec;
    stream_.socket().set_option(tcp::no_delay(true), ec);
  }
  ~HttpSession() { --server_->connections; }

  void start() { read(); }

  // Posts `f` onto the strand unless the server has stopped.
  template <typename F>
  void post(F&& f) {
    if (server_->is_stopped()) return;
    net::post(stream_.get_executor(), std::forward<F>(f));
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    // The op being written stays until its write completes (the write reads its buffers);
    // written() drops it.
    const size_t keep = writing_ && !queue_.empty() ? 1 : 0;
    for (size_t i = keep; i < queue_.size(); ++i)
      if (queue_[i].done) queue_[i].done(false);
    queue_.erase(queue_.begin() + static_cast<long>(keep), queue_.end());
    if (exchange_open_ && on_close_) {
      auto cb = std::move(on_close_);
      on_close_ = nullptr;
      cb();
    }
    exchange_open_ = false;
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.close();
  }

  // --- what the exchange asks for (on the strand) ---

  void respond(uint64_t exchange, int status, const std::string& content_type, std::string body,
               const std::map<std::string, std::string>& headers) {
    if (!current(exchange) || answered_) return;
    answered_ = true;
    auto res =
        std::make_shared<http::response<http::string_body>>(static_cast<http::status>(status), 11);
    res->set(http::field::content_type, content_type);
    for (const auto& [k, v] : headers) res->set(k, v);
    res->keep_alive(keep_alive_);
    res->body() = std::move(body);
    res->prepare_payload();
    queue_.push_back(Op{.kind = Op::kWhole, .whole = std::move(res)});
    pump();
  }

  void start_stream(uint64_t exchange, int status, const std::string& content_type,
                    const std::map<std::string, std::string>& headers) {
    if (!current(exchange) || answered_) return;
    answered_ = true;
    auto header =
        std::make_shared<http::response<http::empty_body>>(static_cast<http::status>(status), 11);
    header->set(http::field::content_type, content_type);
    header->set(http::field::cache_control, "no-cache");
    for (const auto& [k, v] : headers) header->set(k, v);
    header->keep_alive(keep_alive_);
    header->chunked(true);
    queue_.push_back(Op{.kind = Op::kHeader, .header = std::move(header)});
    pump();
  }

  void write(uint64_t exchange, std::string data, std::function<void(bool)> done) {
    if (!current(exchange) || closed_) {
      if (done) done(false);
      return;
    }
    queue_.push_back(Op{.kind = Op::kChunk,
                        .data = std::make_shared<std::string>(std::move(data)),
                        .done = std::move(done)});
    pump();
  }

  void finish(uint64_t exchange) {
    if (!current(exchange) || closed_) return;
    queue_.push_back(Op{.kind = Op::kLast});
    pump();
  }

  void set_on_close(uint64_t exchange, std::function<void()> cb) {
    if (exchange != exchange_id_ || closed_ || !exchange_open_) {
      if (exchange == exchange_id_ && closed_) cb();
      return;
    }
    on_close_ = std::move(cb);
  }

 private:
  struct Op {
    enum Kind { kWhole, kHeader, kChunk, kLast } kind;
    std::shared_ptr<http::response<http::string_body>> whole = {};
    std::shared_ptr<http::response<http::empty_body>> header = {};
    std::shared_ptr<std::string> data = {};
    std::function<void(bool)> done = {};
  };

  bool current(uint64_t exchange) const { return exchange == exchange_id_ && exchange_open_; }

  void read() {
    parser_.emplace();
    parser_->body_limit(server_->options.max_body_bytes);
    parser_->header_limit(kMaxHeaderBytes);
    stream_.expires_after(std::chrono::milliseconds(server_->options.idle_timeout_ms));
    http::async_read(
        stream_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->on_read(ec); });
  }

  void on_read(beast::error_code ec) {
    if (closed_) return;
    if (ec == http::error::body_limit) {
      refuse(413, fmt::format("request body over the limit of {} bytes",
                              server_->options.max_body_bytes));
      return;
    }
    if (ec == http::error::header_limit) {
      refuse(431, "request headers over 16 KiB");
      return;
    }
    if (ec && ec.category() == http::make_error_code(http::error::bad_version).category() &&
        ec != http::error::end_of_stream && ec != http::error::partial_message) {
      refuse(400, "malformed HTTP request: " + ec.message());
      return;
    }
    if (ec) {
      close();
      return;
    }
    http::request<http::string_body> req = parser_->release();
    keep_alive_ = req.keep_alive();
    HttpRequest request;
    request.method = std::string(req.method_string());
    request.target = std::string(req.target());
    for (const auto& field : req) {
      std::string name(field.name_string());
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      request.headers[name] = std::string(field.value());
    }
    request.body = std::move(req.body());
    ++exchange_id_;
    exchange_open_ = true;
    answered_ = false;
    on_close_ = nullptr;
    stream_.expires_never();
    watch_for_close();
    auto exchange = make_exchange();
    try {
      server_->handler(std::move(request), exchange);
    } catch (const std::exception& e) {
      spdlog::warn("http: handler failed: {}", e.what());
      respond(exchange_id_, 500, "application/json", error_body(e.what(), "internal_error"), {});
    }
  }

  // A client that leaves while its answer is pending: the socket turns readable and a peek
  // finds the end of the stream (or an error). Data instead is a pipelined request, read after
  // this answer; nothing (a read took what woke the wait) means wait again.
  void watch_for_close() {
    if (watching_) return;
    watching_ = true;
    stream_.socket().async_wait(
        tcp::socket::wait_read,
        net::bind_executor(stream_.get_executor(),
                           [self = shared_from_this()](beast::error_code ec) {
                             self->watching_ = false;
                             if (self->closed_ || ec == net::error::operation_aborted) return;
                             char byte;
                             const ssize_t n = ec ? -1
                                                  : ::recv(self->stream_.socket().native_handle(),
                                                           &byte, 1, MSG_PEEK | MSG_DONTWAIT);
                             if (n > 0) return;
                             if (n < 0 && !ec && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                               self->watch_for_close();
                               return;
                             }
                             if (self->exchange_open_) self->close();
                           }));
  }

  void refuse(int status, const std::string& message) {
    keep_alive_ = false;
    linger_ = true;
    ++exchange_id_;
    exchange_open_ = true;
    answered_ = false;
    respond(exchange_id_, status, "application/json", error_body(message, "invalid_request_error"),
            {});
  }

  std::shared_ptr<HttpExchange> make_exchange();

  // After refusing a request whose body is still coming: stop sending, and read and drop
  // what the client sends for up to 2 s before closing, so that closing with unread data
  // (which resets the connection) does not destroy the refusal before the client reads it.
  void linger() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
    stream_.expires_after(std::chrono::seconds(2));
    if (!drain_) drain_ = std::make_shared<std::array<char, 8192>>();
    stream_.async_read_some(net::buffer(*drain_),
                            [self = shared_from_this()](beast::error_code e, size_t) {
                              if (e)
                                self->close();
                              else
                                self->linger();
                            });
  }

  void pump() {
    if (writing_ || queue_.empty() || closed_) return;
    writing_ = true;
    stream_.expires_after(std::chrono::milliseconds(server_->options.write_timeout_ms));
    auto self = shared_from_this();
    Op& op = queue_.front();
    auto on_written = [self](beast::error_code ec, size_t) { self->written(ec); };
    switch (op.kind) {
      case Op::kWhole:
        http::async_write(stream_, *op.whole, on_written);
        break;
      case Op::kHeader: {
        auto serializer = std::make_shared<http::response_serializer<http::empty_body>>(*op.header);
        http::async_write_header(stream_, *serializer,
                                 [self, serializer](beast::error_code ec, size_t n) {
                                   self->written(ec);
                                   (void)n;
                                 });
        break;
      }
      case Op::kChunk:
        net::async_write(stream_, http::make_chunk(net::buffer(*op.data)), on_written);
        break;
      case Op::kLast:
        net::async_write(stream_, http::make_chunk_last(), on_written);
        break;
    }
  }

  void written(beast::error_code ec) {
    writing_ = false;
    if (closed_) {
      for (Op& op : queue_)
        if (op.done) op.done(false);
      queue_.clear();
      return;
    }
    stream_.expires_never();
    if (ec) {
      close();
      return;
    }
    Op op = std::move(queue_.front());
    queue_.pop_front();
    if (op.done) op.done(true);
    if (op.kind == Op::kWhole || op.kind == Op::kLast) {
      exchange_open_ = false;
      on_close_ = nullptr;
      if (!keep_alive_) {
        if (linger_)
          linger();
        else
          close();
        return;
      }
      read();
    }
    pump();
  }

  std::shared_ptr<HttpServer::Impl> server_;  // first: the io_context outlives the socket
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  bool keep_alive_ = true;
  uint64_t exchange_id_ = 0;
  bool exchange_open_ = false;  // a request is waiting for (the rest of) its answer
  bool answered_ = false;       // respond() or start() was called for it
  bool closed_ = false;
  bool writing_ = false;
  bool watching_ = false;
  bool linger_ = false;  // close after the answer by linger()
  std::shared_ptr<std::array<char, 8192>> drain_;
  std::function<void()> on_close_;
  std::deque<Op> queue_;
};

namespace {

class Exchange : public HttpExchange {
 public:
  Exchange(std::shared_ptr<HttpSession> session, uint64_t id)
      : session_(std::move(session)), id_(id) {}

  void respond(int status, const std::string& content_type, std::string body,
               std::map<std::string, std::string> headers) override {
    session_->post([s = session_, id = id_, status, content_type, body = std::move(body),
                    headers = std::move(headers)]() mutable {
      s->respond(id, status, content_type, std::move(body), headers);
    });
  }
  void start(int status, const std::string& content_type,
             std::map<std::string, std::string> headers) override {
    session_->post([s = session_, id = id_, status, content_type, headers = std::move(headers)] {
      s->start_stream(id, status, content_type, headers);
    });
  }
  void write(std::string data, std::function<void(bool)> done) override {
    session_->post(
        [s = session_, id = id_, data = std::move(data), done = std::move(done)]() mutable {
          s->write(id, std::move(data), std::move(done));
        });
  }
  void finish() override {
    session_->post([s = session_, id = id_] { s->finish(id); });
  }
  void on_close(std::function<void()> cb) override {
    session_->post([s = session_, id = id_, cb = std::move(cb)]() mutable {
      s->set_on_close(id, std::move(cb));
    });
  }

 private:
  std::shared_ptr<HttpSession> session_;
  uint64_t id_;
};

}  // namespace

std::shared_ptr<HttpExchange> HttpSession::make_exchange() {
  return std::make_shared<Exchange>(shared_from_this(), exchange_id_);
}

void HttpServer::Impl::accept() {
  acceptor.async_accept(
      net::make_strand(ioc), [self = shared_from_this()](beast::error_code ec, tcp::socket socket) {
        if (ec) {
          if (ec != net::error::operation_aborted)
            spdlog::warn("http: accept failed: {}", ec.message());
          if (!self->acceptor.is_open()) return;
        } else {
          auto session = std::make_shared<HttpSession>(std::move(socket), self);
          {
            std::lock_guard lock(self->mu);
            if (self->stopped) return;
            std::erase_if(self->sessions, [](const auto& w) { return w.expired(); });
            self->sessions.push_back(session);
          }
          session->start();
        }
        self->accept();
      });
}

HttpServer::HttpServer(HttpServerOptions options, HttpHandler handler)
    : impl_(std::make_shared<Impl>()) {
  MLA_REQUIRE(options.threads >= 1, "http threads: must be >= 1, got {}", options.threads);
  impl_->options = std::move(options);
  impl_->handler = std::move(handler);
  beast::error_code ec;
  const auto address = net::ip::make_address(impl_->options.host, ec);
  if (ec)
    MLA_THROW(kInvalidArgument, "http address: '{}' is not an IP address", impl_->options.host);
  const tcp::endpoint endpoint(address, static_cast<uint16_t>(impl_->options.port));
  impl_->acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl_->acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) impl_->acceptor.bind(endpoint, ec);
  if (!ec) impl_->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    MLA_THROW(kUnavailable, "http: cannot listen on {}:{}: {}", impl_->options.host,
              impl_->options.port, ec.message());
  }
  impl_->work.emplace(impl_->ioc.get_executor());
  impl_->accept();
  for (int i = 0; i < impl_->options.threads; ++i) {
    impl_->threads.emplace_back([impl = impl_.get()] { impl->ioc.run(); });
  }
}

HttpServer::~HttpServer() { stop(); }

int32_t HttpServer::port() const { return impl_->acceptor.local_endpoint().port(); }

size_t HttpServer::connections() const { return impl_->connections; }

void HttpServer::stop() {
  std::vector<std::shared_ptr<HttpSession>> open;
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->stopped) return;
    for (auto& w : impl_->sessions)
      if (auto s = w.lock()) open.push_back(std::move(s));
    impl_->sessions.clear();
  }
  // Close every connection on its strand, then let the threads run out of work.
  net::post(impl_->ioc, [impl = impl_] {
    beast::error_code ec;
    impl->acceptor.close(ec);
  });
  for (auto& s : open) s->post([s] { s->close(); });
  open.clear();
  {
    std::lock_guard lock(impl_->mu);
    impl_->stopped = true;
  }
  impl_->work.reset();
  for (auto& t : impl_->threads) t.join();
  impl_->threads.clear();
}

}  // namespace mla
