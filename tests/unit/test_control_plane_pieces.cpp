// The pieces of the control plane on their own: the deployment file's serving sections, the
// shared secret (sources, length, constant-time check over a real call), TLS credential
// files, and the model identity hash.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "kernels/error.h"
#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "rpc/model_identity.h"
#include "rpc/shared_secret.h"
#include "rpc/tls_credentials.h"
#include "runtime/deploy_config.h"
#include "tests/support/golden.h"

namespace mla {
namespace {

using test::code_of;

class TempDir {
 public:
  TempDir()
      : path_(std::filesystem::temp_directory_path() /
              ("mla_control_plane_" + std::to_string(::getpid()))) {
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name, const std::string& text) const {
    const std::string p = (path_ / name).string();
    std::ofstream(p) << text;
    return p;
  }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

TEST(ServingConfig, DefaultsAndEveryServingField) {
  const DeployConfig defaults = DeployConfig::parse("model: /m\n", "defaults");
  EXPECT_EQ(defaults.coordinator.control_address, "127.0.0.1:50052");
  EXPECT_EQ(defaults.coordinator.forget_dead_after_s, 60);
  EXPECT_EQ(defaults.coordinator.drain_timeout_s, 30);
  EXPECT_EQ(defaults.coordinator.stream_write_timeout_s, 30);
  EXPECT_EQ(defaults.workers.group, 0);
  EXPECT_EQ(defaults.workers.drain_timeout_s, 30);
  EXPECT_TRUE(defaults.control.secret_file.empty());
  EXPECT_FALSE(defaults.tls.enabled());
  EXPECT_EQ(defaults.coordinator_control_addresses(), std::vector<std::string>{"127.0.0.1:50052"});

  const DeployConfig c = DeployConfig::parse(
      "model: /m\n"
      "coordinator: {control_address: 0.0.0.0:7000, forget_dead_after_s: 5, drain_timeout_s: 0,"
      " stream_write_timeout_s: 2}\n"
      "workers: {group: 3, coordinators: [a:1, b:2], drain_timeout_s: 9}\n"
      "control: {secret_file: /etc/s}\n"
      "tls: {cert_file: c.pem, key_file: k.pem, ca_file: ca.pem, require_client_cert: true}\n",
      "all");
  EXPECT_EQ(c.coordinator.control_address, "0.0.0.0:7000");
  EXPECT_EQ(c.coordinator.forget_dead_after_s, 5);
  EXPECT_EQ(c.coordinator.drain_timeout_s, 0);
  EXPECT_EQ(c.coordinator.stream_write_timeout_s, 2);
  EXPECT_EQ(c.workers.group, 3);
  EXPECT_EQ(c.coordinator_control_addresses(), (std::vector<std::string>{"a:1", "b:2"}));
  EXPECT_EQ(c.workers.drain_timeout_s, 9);
  EXPECT_EQ(c.control.secret_file, "/etc/s");
  EXPECT_TRUE(c.tls.enabled());
  EXPECT_TRUE(c.tls.require_client_cert);
}

TEST(ServingConfig, BadServingValuesNameTheField) {
  struct Case {
    const char* yaml;
    const char* field;
  };
  for (const Case& c : {Case{"workers: {group: -1}", "workers.group"},
                        Case{"coordinator: {forget_dead_after_s: 0}", "forget_dead_after_s"},
                        Case{"coordinator: {drain_timeout_s: -1}", "coordinator.drain_timeout_s"},
                        Case{"coordinator: {stream_write_timeout_s: 0}", "stream_write_timeout_s"},
                        Case{"workers: {drain_timeout_s: -2}", "workers.drain_timeout_s"},
                        Case{"tls: {cert_file: a.pem}", "tls.key_file"},
                        Case{"tls: {require_client_cert: true}", "require_client_cert"},
                        Case{"control: {secret: x}", "control.secret"},
                        Case{"workers: {coordinators: 5}", "workers.coordinators"}}) {
    SCOPED_TRACE(c.yaml);
    std::string message;
    EXPECT_EQ(
        code_of([&] { DeployConfig::parse(std::string("model: /m\n") + c.yaml, "t"); }, &message),
        ErrorCode::kInvalidArgument);
    EXPECT_NE(message.find(c.field), std::string::npos) << message;
  }
}

TEST(SharedSecret, ComesFromTheEnvironmentOrAFileAndMustBeLongEnough) {
  TempDir dir;
  ::unsetenv(kSecretEnvVar);
  std::string message;
  EXPECT_EQ(code_of([&] { SharedSecret::load(""); }, &message), ErrorCode::kFailedPrecondition);
  EXPECT_NE(message.find(kSecretEnvVar), std::string::npos);
  EXPECT_NE(message.find("control.secret_file"), std::string::npos);
  EXPECT_EQ(code_of([&] { SharedSecret::load(dir.path() + "/missing"); }, &message),
            ErrorCode::kNotFound);
  EXPECT_NE(message.find("missing"), std::string::npos);
  EXPECT_EQ(code_of([&] { SharedSecret::load(dir.file("short", "too-short\n")); }, &message),
            ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("short"), std::string::npos);
  EXPECT_NO_THROW(SharedSecret::load(dir.file("good", "0123456789abcdef0123\n")));
  ::setenv(kSecretEnvVar, "short", 1);
  EXPECT_EQ(code_of([&] { SharedSecret::load(""); }, &message), ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find(kSecretEnvVar), std::string::npos);
  ::unsetenv(kSecretEnvVar);
}

// The check over a real call: only the exact secret, as a bearer token, passes.
TEST(SharedSecret, ChecksTheCallsMetadata) {
  const SharedSecret secret("the-right-secret-value");
  struct Service final : public mlaserve::v1::Control::Service {
    explicit Service(const SharedSecret& s) : secret(s) {}
    grpc::Status ListWorkers(grpc::ServerContext* ctx, const mlaserve::v1::ListWorkersRequest*,
                             mlaserve::v1::ListWorkersResponse*) override {
      return secret.check(*ctx, "ListWorkers");
    }
    const SharedSecret& secret;
  } service(secret);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  auto server = builder.BuildAndStart();
  auto stub = mlaserve::v1::Control::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  auto call = [&](const std::function<void(grpc::ClientContext&)>& prepare) {
    grpc::ClientContext ctx;
    prepare(ctx);
    mlaserve::v1::ListWorkersResponse response;
    return stub->ListWorkers(&ctx, {}, &response).error_code();
  };
  EXPECT_EQ(call([&](auto& ctx) { secret.attach(ctx); }), grpc::StatusCode::OK);
  EXPECT_EQ(call([](auto&) {}), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(
      call([](auto& ctx) { ctx.AddMetadata("authorization", "Bearer the-right-secret-valuX"); }),
      grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call([](auto& ctx) { ctx.AddMetadata("authorization", "the-right-secret-value"); }),
            grpc::StatusCode::UNAUTHENTICATED);
  server->Shutdown();
}

TEST(TlsCredentials, PlaintextWithoutFilesAndClearErrorsForBadOnes) {
  TempDir dir;
  EXPECT_NE(server_credentials(TlsConfig{}), nullptr);
  EXPECT_NE(channel_credentials(TlsConfig{}), nullptr);
  std::string message;
  TlsConfig missing{.cert_file = dir.path() + "/nope.pem", .key_file = dir.path() + "/nope.key"};
  EXPECT_EQ(code_of([&] { server_credentials(missing); }, &message), ErrorCode::kNotFound);
  EXPECT_NE(message.find("tls.key_file"), std::string::npos) << message;
  TlsConfig not_pem{.cert_file = dir.file("c.pem", "hello"), .key_file = dir.file("k.pem", "x")};
  EXPECT_EQ(code_of([&] { server_credentials(not_pem); }, &message), ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("not a PEM file"), std::string::npos);
  TlsConfig directory{.ca_file = dir.path()};
  EXPECT_EQ(code_of([&] { channel_credentials(directory); }, &message),
            ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("directory"), std::string::npos);
}

TEST(ModelIdentity, HashesTheCanonicalConfig) {
  TempDir dir;
  std::filesystem::create_directories(dir.path() + "/a");
  std::filesystem::create_directories(dir.path() + "/b");
  std::filesystem::create_directories(dir.path() + "/c");
  std::ofstream(dir.path() + "/a/config.json") << R"({"vocab_size": 10, "model_type": "x"})";
  std::ofstream(dir.path() + "/b/config.json")
      << "{\n  \"model_type\": \"x\",\n  \"vocab_size\": 10\n}\n";
  std::ofstream(dir.path() + "/c/config.json") << R"({"vocab_size": 11, "model_type": "x"})";
  const std::string a = model_config_hash(dir.path() + "/a");
  EXPECT_EQ(a.size(), 64u);
  EXPECT_EQ(a, model_config_hash(dir.path() + "/b"));  // formatting and key order do not count
  EXPECT_NE(a, model_config_hash(dir.path() + "/c"));
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(code_of([&] { model_config_hash(dir.path() + "/missing"); }), ErrorCode::kNotFound);
  std::filesystem::create_directories(dir.path() + "/bad");
  std::ofstream(dir.path() + "/bad/config.json") << "{not json";
  EXPECT_EQ(code_of([&] { model_config_hash(dir.path() + "/bad"); }), ErrorCode::kInvalidArgument);
}

}  // namespace
}  // namespace mla
