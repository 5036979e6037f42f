// Stopping without losing work, on a real cluster: two coordinators with one killed under
// load (the clients resume on the other), a SIGTERMed worker that drains (its requests finish
// where they run, or fail over at the drain deadline), and a SIGTERMed coordinator that
// finishes its open streams (or stops at once on a second signal).
#include <signal.h>

#include <fstream>

#include "tests/e2e/cluster_fixture.h"

namespace mla::e2e {
namespace {

TEST_F(ClusterTest, TwoCoordinatorsOneKilledMidStreamEveryStreamCompletesOnTheOther) {
  // A second coordinator; the workers register with both.
  const int second_port = pick_ports(1);
  const int second_control = pick_ports(1);
  const std::string second = "127.0.0.1:" + std::to_string(second_port);
  extra_control_addresses_.push_back("127.0.0.1:" + std::to_string(second_control));
  Process other({MLASERVE_BIN, "coordinator", "--address", second, "--control-address",
                 extra_control_addresses_[0]},
                dir_ + "/coordinator-second.log");
  ASSERT_TRUE(wait_for_listener(second_port, kStartupTimeout));
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kOneJob));
  Client both(std::vector<std::string>{address(), second});
  Client second_only(second);
  ASSERT_TRUE(second_only.wait_until_ready(10s));
  const auto end = Clock::now() + 10s;
  while (second_only.health().workers_alive() < kGroups && Clock::now() < end) {
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_EQ(second_only.health().workers_alive(), kGroups) << "the workers did not register twice";

  const Load load = long_requests(16, 200, 7);
  Clock::time_point killed_at;
  const std::vector<Stream> streams = run_load(both, load, [&] {
    killed_at = Clock::now();
    coordinator_->kill_tree();
  });
  std::cout << "all 16 streams done " << seconds_since(killed_at)
            << " s after the coordinator was killed\n";
  int resumed = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    expect_complete(streams[i], load.requests[i], load.expected[i], "stream " + std::to_string(i));
    if (streams[i].result.coordinators.size() > 1) {
      ++resumed;
      EXPECT_EQ(streams[i].result.coordinators.back(), second);
    }
  }
  EXPECT_GT(resumed, 0) << "no stream was still running on the killed coordinator";
  std::cout << resumed << " of 16 streams resumed on the second coordinator\n";
  coordinator_.reset();  // killed: nothing for TearDown to stop
  client_ = std::make_unique<Client>(second);
  EXPECT_TRUE(other.terminate(kStopGrace));
}

// Two groups, each its own job, whose workers drain for `drain_timeout_s` on SIGTERM. The
// coordinator lets a draining worker's requests finish where they run
// (coordinator.migrate_on_drain false; MigrationTest covers the moves).
class DrainTest : public ClusterTest {
 protected:
  // Starts the cluster; `leader_` is group 0's leader rank, `leaving_` its worker id.
  void start(const char* drain_timeout_s) {
    const std::string config = dir_ + "/coordinator.yaml";
    std::ofstream(config) << "coordinator:\n  migrate_on_drain: false\n";
    coordinator_extra_ = {"--config", config};
    ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kTwoJobs, {"--drain-timeout", drain_timeout_s}));
    leaving_ = worker_id_of(jobs_[0], 0);
    leader_ = mpi_rank_process(jobs_[0].process->pid(), 0, 5s);
    ASSERT_TRUE(leader_.has_value());
  }
  std::string leaving_;
  std::optional<ProcId> leader_;
};

TEST_F(DrainTest, SigtermOnAWorkerDrainsItsRequestsWhereTheyRun) {
  ASSERT_NO_FATAL_FAILURE(start("60"));
  const Load load = long_requests(12, 200, 11);
  const std::string& leaving = leaving_;
  const std::optional<ProcId>& leader = leader_;
  Clock::time_point signalled;
  std::optional<Stream> after_signal;
  const std::vector<Stream> streams = run_load(client(), load, [&] {
    signalled = Clock::now();
    ::kill(leader->pid, SIGTERM);
    // New requests go elsewhere once the coordinator hears of the drain.
    std::this_thread::sleep_for(1200ms);
    const v1::GenerateRequest r = make_request(golden().prompts[0], 8);
    after_signal = run_stream(client(), r);
    expect_complete(*after_signal, r, golden().greedy[0], "request during the drain");
  });
  int on_leaving = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    expect_complete(streams[i], load.requests[i], load.expected[i], "stream " + std::to_string(i));
    EXPECT_EQ(streams[i].result.worker_ids.size(), 1u) << "stream " << i << " moved";
    on_leaving += streams[i].result.worker_ids == std::vector<std::string>{leaving};
  }
  EXPECT_GT(on_leaving, 0) << "nothing ran on the drained worker";
  ASSERT_TRUE(after_signal.has_value());
  EXPECT_NE(after_signal->result.worker_ids, std::vector<std::string>{leaving});
  // Drained, the group stops by itself: every rank exits 0.
  ASSERT_TRUE(jobs_[0].process->wait_for_exit(kStopGrace));
  EXPECT_EQ(jobs_[0].process->exit_description(), "exit 0");
  std::cout << on_leaving << " streams finished on the draining worker; its job exited "
            << seconds_since(signalled) << " s after SIGTERM\n";
}

TEST_F(DrainTest, AWorkerDrainDeadlineFailsTheRestOverWithNothingLost) {
  ASSERT_NO_FATAL_FAILURE(start("0"));
  const Load load = long_requests(12, 200, 13);
  const std::vector<Stream> streams =
      run_load(client(), load, [&] { ::kill(leader_->pid, SIGTERM); });
  int moved = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    expect_complete(streams[i], load.requests[i], load.expected[i], "stream " + std::to_string(i));
    if (streams[i].result.worker_ids.size() > 1) {
      ++moved;
      EXPECT_EQ(streams[i].result.worker_ids.front(), leaving_) << "stream " << i;
    }
  }
  EXPECT_GT(moved, 0) << "no stream failed over at the drain deadline";
  ASSERT_TRUE(jobs_[0].process->wait_for_exit(kStopGrace));
  EXPECT_EQ(jobs_[0].process->exit_description(), "exit 0");
  std::cout << moved << " streams failed over from the stopping worker\n";
}

// A client that does not resume elsewhere: it sees what its one coordinator does.
ClientOptions single_coordinator() {
  ClientOptions options;
  options.max_resumes = 0;
  return options;
}

TEST_F(ClusterTest, SigtermOnTheCoordinatorFinishesOpenStreamsAndRefusesNewOnes) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kOneJob));
  const Load load = long_requests(8, 200, 17);
  Client single(address(), single_coordinator());
  Failure refused;
  Clock::time_point signalled;
  const std::vector<Stream> streams = run_load(single, load, [&] {
    signalled = Clock::now();
    coordinator_->signal(SIGTERM);
    // Not ready once it has taken the signal; then new requests are refused.
    const auto until = Clock::now() + 5s;
    while (single.health().serving() && Clock::now() < until) std::this_thread::sleep_for(5ms);
    refused = failure_of([&] { single.generate(make_request(golden().prompts[0], 4)); });
  });
  for (size_t i = 0; i < streams.size(); ++i) {
    expect_complete(streams[i], load.requests[i], load.expected[i], "stream " + std::to_string(i));
  }
  EXPECT_EQ(refused.code, ErrorCode::kUnavailable) << refused.message;
  EXPECT_THAT(refused.message, HasSubstr("stopping"));
  ASSERT_TRUE(coordinator_->wait_for_exit(kStopGrace));
  EXPECT_EQ(coordinator_->exit_description(), "exit 0");
  std::cout << "the coordinator exited " << seconds_since(signalled)
            << " s after SIGTERM, its 8 open streams complete\n";
  coordinator_.reset();
}

TEST_F(ClusterTest, ASecondSignalStopsTheCoordinatorAtOnce) {
  ASSERT_NO_FATAL_FAILURE(start_cluster(Layout::kOneJob));
  const Load load = long_requests(4, 210, 19);
  Client single(address(), single_coordinator());
  double exit_s = 0;
  const std::vector<Stream> streams = run_load(single, load, [&] {
    coordinator_->signal(SIGTERM);
    std::this_thread::sleep_for(20ms);
    const auto second = Clock::now();
    coordinator_->signal(SIGTERM);
    EXPECT_TRUE(coordinator_->wait_for_exit(kStopGrace));
    exit_s = seconds_since(second);
  });
  EXPECT_LT(exit_s, 1.0) << "the second signal did not stop the coordinator at once";
  EXPECT_EQ(coordinator_->exit_description(), "exit 0");
  int cut = 0;
  for (const Stream& s : streams) cut += !s.ok;
  std::cout << cut << " of 4 streams cut by the second signal; exit " << exit_s << " s after it\n";
  coordinator_.reset();
}

}  // namespace
}  // namespace mla::e2e
