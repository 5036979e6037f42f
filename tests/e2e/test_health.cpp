// The coordinator process answers the standard grpc.health.v1 service and the mlaserve
// Health RPC, and exits cleanly (status 0, port released) on SIGTERM.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
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

// grpc.health.v1.Health/Check with an empty request; returns the response's status field
// (1 = SERVING, 2 = NOT_SERVING) decoded from its protobuf bytes, or -1 on an RPC error.
int health_check(const std::string& address) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::TemplatedGenericStub<grpc::ByteBuffer, grpc::ByteBuffer> stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::ByteBuffer request, response;
  grpc::Slice empty("", 0);
  request = grpc::ByteBuffer(&empty, 1);
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

TEST(CoordinatorProcess, AnswersGrpcHealthAndExitsCleanlyOnSigterm) {
  const std::string address = "127.0.0.1:" + std::to_string(free_port());
  std::vector<std::string> args = {MLASERVE_BIN, "--log-level", "warn", "coordinator",
                                   "--address", address};
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
  const auto health = client.health();
  EXPECT_FALSE(health.serving()) << "no worker registered yet";
  EXPECT_EQ(health.workers_alive(), 0);

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
