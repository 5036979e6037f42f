// The coordinator process answers the standard grpc.health.v1 service (liveness for the
// server as a whole, readiness for "mlaserve.v1.Coordinator"), /livez and /readyz over HTTP,
// and the mlaserve Health RPC, and exits cleanly (status 0, port released) on SIGTERM.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "rpc/client.h"

extern char** environ;

namespace mla {
namespace {

int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// grpc.health.v1.Health/Check for `service` ("" = the server as a whole); returns the
// response's status field (1 = SERVING, 2 = NOT_SERVING) decoded from its protobuf bytes, or
// -1 on an RPC error.
int health_check(const std::string& address, const std::string& service = "") {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::TemplatedGenericStub<grpc::ByteBuffer, grpc::ByteBuffer> stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::ByteBuffer request, response;
  // HealthCheckRequest { string service = 1; }: tag 0x0a, length, bytes.
  std::string bytes_in;
  if (!service.empty()) {
    bytes_in = std::string(1, '\x0a') + static_cast<char>(service.size()) + service;
  }
  grpc::Slice slice(bytes_in.data(), bytes_in.size());
  request = grpc::ByteBuffer(&slice, 1);
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   std::lock_guard lock(mu);
                   status = s;
                   done = true;
                   cv.notify_one();
                 });
  std::unique_lock lock(mu);
  cv.wait(lock, [&] { return done; });
  if (!status.ok()) return -1;
  std::vector<grpc::Slice> slices;
  response.Dump(&slices);
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // HealthCheckResponse { ServingStatus status = 1; }: tag 0x08 then the varint.
  return bytes.size() == 2 && bytes[0] == 0x08 ? bytes[1] : -1;
}

// `bytes` sent as the request of `method` (a raw call: no protobuf on this side); its status.
grpc::Status raw_call(const std::string& address, const std::string& method,
                      const std::string& bytes) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::TemplatedGenericStub<grpc::ByteBuffer, grpc::ByteBuffer> stub(channel);
  struct Reactor final : grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
    void OnReadDone(bool ok) override {
      if (ok) StartRead(&response);
    }
    void OnDone(const grpc::Status& s) override {
      std::lock_guard lock(mu);
      status = s;
      done = true;
      cv.notify_one();
    }
    grpc::ByteBuffer request, response;
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    grpc::Status status;
  } reactor;
  grpc::Slice slice(bytes.data(), bytes.size());
  reactor.request = grpc::ByteBuffer(&slice, 1);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  stub.PrepareBidiStreamingCall(&ctx, method, grpc::StubOptions(), &reactor);
  reactor.StartWriteLast(&reactor.request, grpc::WriteOptions());
  reactor.StartRead(&reactor.response);
  reactor.StartCall();
  std::unique_lock lock(reactor.mu);
  reactor.cv.wait(lock, [&] { return reactor.done; });
  return reactor.status;
}

int http_status(int port, const char* path) {
  httplib::Client http("127.0.0.1", port);
  http.set_connection_timeout(2);
  const auto res = http.Get(path);
  return res ? res->status : -1;
}

TEST(CoordinatorProcess, IsLiveButNotReadyWithoutWorkersAndExitsCleanlyOnSigterm) {
  const std::string address = "127.0.0.1:" + std::to_string(free_port());
  const int metrics_port = free_port();
  ::setenv("MLASERVE_CONTROL_SECRET", "health-test-control-secret", 1);
  std::vector<std::string> args = {MLASERVE_BIN,
                                   "--log-level",
                                   "warn",
                                   "coordinator",
                                   "--address",
                                   address,
                                   "--control-address",
                                   "127.0.0.1:" + std::to_string(free_port()),
                                   "--metrics-port",
                                   std::to_string(metrics_port)};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  ASSERT_EQ(posix_spawn(&pid, MLASERVE_BIN, nullptr, nullptr, argv.data(), environ), 0);

  Client client(address);
  int serving = -1;
  for (int i = 0; i < 100 && serving != 1; ++i) {
    serving = health_check(address);
    if (serving != 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(serving, 1) << "grpc.health.v1 did not report SERVING";
  // Ready needs a live worker: none is registered.
  EXPECT_EQ(health_check(address, "mlaserve.v1.Coordinator"), 2);
  const auto health = client.health();
  EXPECT_FALSE(health.serving()) << "no worker registered yet";
  EXPECT_EQ(health.workers_alive(), 0);
  EXPECT_EQ(http_status(metrics_port, "/livez"), 200);
  EXPECT_EQ(http_status(metrics_port, "/readyz"), 503);
  EXPECT_EQ(http_status(metrics_port, "/healthz"), 503);

  // Bytes that are not a request: INVALID_ARGUMENT saying so, not INTERNAL.
  const std::string garbage = "\xff\xff\xff\xff\xff\x01\x02";
  for (const char* what : {"Generate", "Cancel"}) {
    SCOPED_TRACE(what);
    const grpc::Status status =
        raw_call(address, std::string("/mlaserve.v1.Coordinator/") + what, garbage);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_NE(status.error_message().find(std::string("is not a valid mlaserve.v1.") + what),
              std::string::npos)
        << status.error_message();
  }
  EXPECT_FALSE(client.cancel("nothing-runs"));  // a well-formed Cancel still works

  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int wstatus = 0;
  pid_t done = 0;
  for (int i = 0; i < 100 && done == 0; ++i) {
    done = waitpid(pid, &wstatus, WNOHANG);
    if (done == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (done == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &wstatus, 0);
    FAIL() << "coordinator did not exit within 5 s of SIGTERM";
  }
  ASSERT_TRUE(WIFEXITED(wstatus));
  EXPECT_EQ(WEXITSTATUS(wstatus), 0);
  EXPECT_EQ(health_check(address), -1) << "port still answering after exit";
}

}  // namespace
}  // namespace mla
