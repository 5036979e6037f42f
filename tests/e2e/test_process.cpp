// The e2e helpers' loopback ports: below the kernel's ephemeral range (so a process restarted on
// one, as the coordinator-restart tests do, cannot find it handed to another socket meanwhile)
// and free when picked.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>

#include "tests/e2e/process.h"

namespace mla::e2e {
namespace {

bool bindable(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  close(fd);
  return ok;
}

TEST(LoopbackPorts, ComeFromBelowTheEphemeralRangeAndAreFree) {
  int ephemeral_low = 32768;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> ephemeral_low;
  for (int trial = 0; trial < 20; ++trial) {
    const int first = free_loopback_ports(3);
    EXPECT_GE(first, 10000);
    EXPECT_LT(first + 2, ephemeral_low) << "a port inside the ephemeral range";
    for (int p = first; p < first + 3; ++p) EXPECT_TRUE(bindable(p)) << "port " << p;
  }
}

}  // namespace
}  // namespace mla::e2e
