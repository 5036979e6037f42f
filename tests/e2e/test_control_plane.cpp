// The control plane against an outsider, on a real cluster: every attack that once worked
// (a fake worker taking real traffic, a hijacked worker id, forged heartbeats, draining every
// worker, a worker that advertises a context of 1, unbounded registrations, calling a worker
// directly) is refused, and the cluster goes on serving the golden tokens. Also the
// operator's side: `mlaserve admin drain|undrain|workers`, TLS, and listeners that refuse a
// port in use.
#include <filesystem>

#include "tests/e2e/cluster_fixture.h"

namespace mla::e2e {
namespace {

template <typename Service>
std::unique_ptr<typename Service::Stub> stub_at(const std::string& address) {
  return Service::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

// A call context with a deadline and, when given, the secret.
std::unique_ptr<grpc::ClientContext> context(const char* secret = nullptr) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + 10s);
  if (secret) ctx->AddMetadata("authorization", std::string("Bearer ") + secret);
  return ctx;
}

class ControlPlaneTest : public ClusterTest {
 protected:
  // The golden prompts still get their golden tokens, and both groups are alive.
  void expect_service_intact() {
    const auto list = wait_for_alive(kGroups, 5s);
    ASSERT_TRUE(list.has_value()) << "not both workers alive";
    for (const v1::WorkerStatus& w : list->workers()) {
      EXPECT_THAT(worker_ids_, testing::Contains(w.worker_id())) << "a stranger is registered";
    }
    for (size_t i = 0; i < golden().prompts.size(); ++i) {
      const v1::GenerateRequest r = make_request(golden().prompts[i], 8);
      const Stream s = run_stream(client(), r);
      expect_complete(s, r, golden().greedy[i], "golden prompt " + std::to_string(i));
      for (const std::string& w : s.result.worker_ids)
        EXPECT_THAT(worker_ids_, testing::Contains(w));
    }
  }
};

TEST_F(ControlPlaneTest, EveryAttackIsRefusedAndTheClusterKeepsServing) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kOneJob));
  auto control = stub_at<v1::Control>(control_address());
  const std::string victim = worker_ids_[0];

  // The control RPCs are not on the client plane at all.
  {
    auto on_client_plane = stub_at<v1::Control>(address());
    v1::RegisterWorkerRequest r;
    r.set_worker_id("fake");
    r.set_address("127.0.0.1:1");
    v1::RegisterWorkerResponse response;
    EXPECT_EQ(
        on_client_plane->RegisterWorker(context(kControlSecret).get(), r, &response).error_code(),
        grpc::StatusCode::UNIMPLEMENTED);
  }

  // 1. A fake worker registering to take real traffic; 2. a real worker's id re-registered
  // elsewhere; 5. a worker advertising max_context 1: without the secret all are refused.
  v1::ModelInfo model = wait_for_alive(kGroups, 5s)->workers(0).model();
  struct Registration {
    const char* what;
    std::string id;
    std::string address;
    int32_t max_context;
  };
  const std::vector<Registration> registrations = {
      {"fake worker", "fake-worker", "127.0.0.1:1", model.max_context()},
      {"hijack", victim, "127.0.0.1:2", model.max_context()},
      {"context of 1", "tiny-context", "127.0.0.1:3", 1},
  };
  for (const Registration& reg : registrations) {
    SCOPED_TRACE(reg.what);
    v1::RegisterWorkerRequest r;
    r.set_worker_id(reg.id);
    r.set_address(reg.address);
    *r.mutable_model() = model;
    r.mutable_model()->set_max_context(reg.max_context);
    v1::RegisterWorkerResponse response;
    for (const char* secret : {static_cast<const char*>(nullptr), "a-wrong-secret-guessed"}) {
      EXPECT_EQ(control->RegisterWorker(context(secret).get(), r, &response).error_code(),
                grpc::StatusCode::UNAUTHENTICATED);
    }
    // With the secret (an insider, or a misconfigured worker) an id still cannot move and
    // the cluster's model cannot change.
    if (reg.id == victim || reg.max_context == 1) {
      const grpc::Status inside =
          control->RegisterWorker(context(kControlSecret).get(), r, &response);
      if (reg.id == victim) {
        EXPECT_EQ(inside.error_code(), grpc::StatusCode::PERMISSION_DENIED)
            << inside.error_message();
      } else {
        EXPECT_EQ(inside.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
        EXPECT_THAT(inside.error_message(), HasSubstr("model.max_context"));
      }
    }
  }

  // 3. A forged heartbeat steering load: refused without the secret; with it but without the
  // registration's session, not taken.
  {
    v1::HeartbeatRequest hb;
    hb.set_worker_id(victim);
    hb.mutable_load()->set_free_pages(0);
    hb.mutable_load()->set_waiting(1000000);
    v1::HeartbeatResponse response;
    EXPECT_EQ(control->Heartbeat(context().get(), hb, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    ASSERT_TRUE(control->Heartbeat(context(kControlSecret).get(), hb, &response).ok());
    EXPECT_FALSE(response.known());
    const v1::ListWorkersResponse after = client().list_workers();
    for (const v1::WorkerStatus& w : after.workers()) {
      if (w.worker_id() == victim) {
        EXPECT_LT(w.load().waiting(), 1000000);
      }
    }
  }

  // 4. Draining every worker: refused without the secret.
  for (const std::string& id : worker_ids_) {
    v1::DrainRequest drain;
    drain.set_worker_id(id);
    v1::DrainResponse response;
    EXPECT_EQ(control->Drain(context().get(), drain, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(
        control->Drain(context("a-wrong-secret-guessed").get(), drain, &response).error_code(),
        grpc::StatusCode::UNAUTHENTICATED);
  }

  // 6. 60 registrations with 100 KB ids: refused (no secret; and too long with it); the
  // table does not grow and ListWorkers stays small.
  for (int i = 0; i < 60; ++i) {
    v1::RegisterWorkerRequest r;
    r.set_worker_id(std::string(100 * 1024, static_cast<char>('a' + i % 26)));
    r.set_address("127.0.0.1:" + std::to_string(1000 + i));
    *r.mutable_model() = model;
    v1::RegisterWorkerResponse response;
    EXPECT_EQ(control->RegisterWorker(context().get(), r, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    if (i == 0) {
      EXPECT_EQ(control->RegisterWorker(context(kControlSecret).get(), r, &response).error_code(),
                grpc::StatusCode::INVALID_ARGUMENT);
    }
  }
  const v1::ListWorkersResponse listed = client().list_workers();
  EXPECT_EQ(listed.workers_size(), kGroups);
  EXPECT_LT(listed.ByteSizeLong(), 4096u);

  // 7. A worker called directly, around the coordinator.
  {
    auto worker = stub_at<v1::Worker>(victim);
    const v1::GenerateRequest r = make_request(golden().prompts[0], 8);
    auto call = context();
    auto reader = worker->Generate(call.get(), r);
    v1::GenerateResponse m;
    EXPECT_FALSE(reader->Read(&m));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }

  // The refusals were logged by the coordinator.
  EXPECT_THAT(coordinator_->log_tail(64 * 1024), HasSubstr("control secret"));
  ASSERT_NO_FATAL_FAILURE(expect_service_intact());
}

TEST_F(ControlPlaneTest, AdminDrainsAndUndrainsWorkersThroughTheCommand) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kOneJob));
  // Without the secret (another one) the command fails and nothing changes.
  const CommandResult refused = admin({"drain", worker_ids_[0]}, "not-the-clusters-secret");
  EXPECT_NE(refused.exit, "exit 0");
  EXPECT_THAT(refused.output, HasSubstr("UNAUTHENTICATED"));

  // Draining every worker stops the service; undrain brings it back.
  for (const std::string& id : worker_ids_) {
    const CommandResult drained = admin({"drain", id}, kControlSecret);
    EXPECT_EQ(drained.exit, "exit 0") << drained.output;
    EXPECT_THAT(drained.output, HasSubstr("draining"));
  }
  const CommandResult listed = admin({"workers"}, kControlSecret);
  EXPECT_EQ(listed.exit, "exit 0") << listed.output;
  EXPECT_THAT(listed.output, HasSubstr("draining"));
  const Failure none = failure_of([&] { client().generate(make_request(golden().prompts[0], 4)); });
  EXPECT_EQ(none.code, ErrorCode::kUnavailable) << none.message;
  EXPECT_FALSE(client().health().serving());
  for (const std::string& id : worker_ids_) {
    const CommandResult undrained = admin({"undrain", id}, kControlSecret);
    EXPECT_EQ(undrained.exit, "exit 0") << undrained.output;
  }
  ASSERT_TRUE(wait_for_alive(kGroups, 5s).has_value()) << "the workers did not come back";
  ASSERT_NO_FATAL_FAILURE(expect_service_intact());
  const CommandResult unknown = admin({"drain", "no-such-worker"}, kControlSecret);
  EXPECT_NE(unknown.exit, "exit 0");
  EXPECT_THAT(unknown.output, HasSubstr("no-such-worker"));
}

// The readiness of the coordinator follows its workers (grpc.health is checked in
// test_health.cpp without workers; here with them, through the client plane's Health).
TEST_F(ControlPlaneTest, ReadyWithWorkersNotReadyWhenAllAreGone) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs));
  EXPECT_TRUE(client().health().serving());
  for (WorkerJob& job : jobs_) job.process->kill_tree();
  const auto end = Clock::now() + 5s;
  while (client().health().serving() && Clock::now() < end) std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(client().health().serving());
  EXPECT_EQ(client().health().workers_alive(), 0);
}

// A self-signed CA and a certificate for 127.0.0.1, made with the openssl command.
void make_certificates(const std::string& dir) {
  const std::string script =
      "set -e; cd '" + dir +
      "'; openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=mlaserve-test-ca "
      "-keyout ca.key -out ca.pem 2>/dev/null; "
      "openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key "
      "-out server.csr 2>/dev/null; "
      "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext; "
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
      "-extfile san.ext -out server.pem 2>/dev/null";
  ASSERT_EQ(std::system(("bash -c \"" + script + "\"").c_str()), 0) << "openssl failed";
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// A cluster whose every listener and channel is TLS (mutual: every peer presents the
// certificate too); the golden prompts through a C++ client with the CA (and the
// certificate), and refusals for clients without them.
class TlsTest : public ControlPlaneTest, public testing::WithParamInterface<bool> {};

TEST_P(TlsTest, EveryListenerAndChannel) {
  const bool mutual = GetParam();
  ASSERT_NO_FATAL_FAILURE(make_certificates(dir_));
  const std::string config = dir_ + "/tls.yaml";
  std::ofstream(config) << "model: " << model_dir() << "\ntls:\n  cert_file: " << dir_
                        << "/server.pem\n  key_file: " << dir_ << "/server.key\n  ca_file: " << dir_
                        << "/ca.pem\n  require_client_cert: " << (mutual ? "true" : "false")
                        << "\n";
  coordinator_ = std::make_unique<Process>(
      std::vector<std::string>{MLASERVE_BIN, "coordinator", "--config", config, "--address",
                               address(), "--control-address", control_address()},
      dir_ + "/coordinator.log");
  ASSERT_TRUE(wait_for_listener(coordinator_port_, kStartupTimeout));
  start_workers(Layout::kOneJob, {"--config", config});

  grpc::SslCredentialsOptions ssl{.pem_root_certs = read_text(dir_ + "/ca.pem")};
  if (mutual) {
    ssl.pem_private_key = read_text(dir_ + "/server.key");
    ssl.pem_cert_chain = read_text(dir_ + "/server.pem");
  }
  ClientOptions tls;
  tls.credentials = grpc::SslCredentials(ssl);
  Client secure(address(), tls);
  ASSERT_TRUE(secure.wait_until_ready(kStartupTimeout)) << "no worker registered over TLS";
  const auto end = Clock::now() + 10s;
  while (secure.health().workers_alive() < kGroups && Clock::now() < end) {
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_EQ(secure.health().workers_alive(), kGroups);
  for (size_t i = 0; i < golden().prompts.size(); ++i) {
    const v1::GenerateRequest r = make_request(golden().prompts[i], 8);
    expect_complete(run_stream(secure, r), r, golden().greedy[i], "over TLS");
  }
  // `mlaserve bench` and `mlaserve client` take the tls section from the config.
  const CommandResult bench = run_command(
      {MLASERVE_BIN, "--log-level", "warn", "bench", "--config", config, "--address", address(),
       "--requests", "8", "--concurrency", "4", "--prompt-len", "4", "--max-tokens", "4"},
      dir_ + "/bench.log");
  EXPECT_EQ(bench.exit, "exit 0") << bench.output;
  EXPECT_THAT(bench.output, HasSubstr("ok=8 errors=0"));
  const CommandResult status = run_command({MLASERVE_BIN, "--log-level", "warn", "client",
                                            "--config", config, "--address", address(), "--status"},
                                           dir_ + "/status.log");
  EXPECT_EQ(status.exit, "exit 0") << status.output;
  EXPECT_THAT(status.output, HasSubstr("(2 alive)"));
  ClientOptions refused;
  refused.max_resumes = 0;
  refused.unary_deadline = 2s;
  // A plaintext client gets nowhere.
  Client plaintext(address(), refused);
  EXPECT_EQ(failure_of([&] { plaintext.health(); }).code, ErrorCode::kUnavailable);
  if (mutual) {
    // Nor does one without a certificate.
    refused.credentials = grpc::SslCredentials({.pem_root_certs = read_text(dir_ + "/ca.pem")});
    Client anonymous(address(), refused);
    EXPECT_EQ(failure_of([&] { anonymous.health(); }).code, ErrorCode::kUnavailable);
  } else {
    // The Python client with the CA.
    const CommandResult py = run_command(
        {"/usr/bin/python3", std::string(MLA_REPO_DIR) + "/rpc/python/mlaserve_client.py",
         "--address", address(), "--ca-file", dir_ + "/ca.pem", "--prompt-ids",
         join(golden().prompts[0]), "--max-tokens", "8", "--ignore-eos", "--proto-root",
         std::string(MLA_REPO_DIR) + "/rpc/proto", "--stubs-dir", dir_ + "/stubs"},
        dir_ + "/python.log");
    EXPECT_EQ(py.exit, "exit 0") << py.output;
    std::string golden_text;
    for (int32_t t : golden().greedy[0]) golden_text += std::to_string(t) + " ";
    EXPECT_THAT(py.output, HasSubstr(golden_text));
  }
  client_ = std::make_unique<Client>(address(), tls);  // for TearDown's checks
}

INSTANTIATE_TEST_SUITE_P(ControlPlane, TlsTest, testing::Bool(),
                         [](const testing::TestParamInfo<bool>& info) {
                           return std::string(info.param ? "Mutual" : "ServerOnly");
                         });

TEST_F(ControlPlaneTest, ListenersRefuseAPortInUseAndPortsOutOfRange) {
  ASSERT_NO_FATAL_FAILURE(start_coordinator());
  const CommandResult second =
      run_command({MLASERVE_BIN, "coordinator", "--address", address(), "--control-address",
                   "127.0.0.1:" + std::to_string(pick_ports(1))},
                  dir_ + "/second.log", {}, 20s);
  EXPECT_EQ(second.exit, "exit 1") << second.output;
  EXPECT_THAT(second.output, HasSubstr("address in use"));
  const CommandResult out_of_range = run_command(
      {MLASERVE_BIN, "coordinator", "--address", "127.0.0.1:99999"}, dir_ + "/range.log", {}, 20s);
  EXPECT_EQ(out_of_range.exit, "exit 1") << out_of_range.output;
  EXPECT_THAT(out_of_range.output, HasSubstr("127.0.0.1:99999"));
  const CommandResult no_secret = run_command(
      {MLASERVE_BIN, "coordinator", "--address", "127.0.0.1:" + std::to_string(pick_ports(1)),
       "--control-address", "127.0.0.1:" + std::to_string(pick_ports(1))},
      dir_ + "/nosecret.log", {"MLASERVE_CONTROL_SECRET="}, 20s);
  EXPECT_EQ(no_secret.exit, "exit 1") << no_secret.output;
  EXPECT_THAT(no_secret.output, HasSubstr("MLASERVE_CONTROL_SECRET"));
  // The first coordinator was not disturbed.
  EXPECT_TRUE(coordinator_->running());
  EXPECT_FALSE(client().health().serving());
}

}  // namespace
}  // namespace mla::e2e
