// ControlService: mlaserve.v1.Control, the coordinator's control plane (workers register and
// heartbeat; operators drain, undrain and list workers). It authenticates every call with the
// deployment's shared secret (rpc/shared_secret.h) and hands the work to the coordinator's
// registry (CoordinatorService::register_worker and friends). Served on its own listener,
// apart from the client plane, so that clients never reach it.
//
// Thread-safe; the coordinator and the secret must outlive it.
#pragma once

#include "mlaserve/v1/mlaserve.grpc.pb.h"
#include "rpc/coordinator_service.h"
#include "rpc/shared_secret.h"

namespace mla {

class ControlService final : public mlaserve::v1::Control::Service {
 public:
  ControlService(CoordinatorService& coordinator, const SharedSecret& secret)
      : coordinator_(coordinator), secret_(secret) {}

  grpc::Status RegisterWorker(grpc::ServerContext* context,
                              const mlaserve::v1::RegisterWorkerRequest* request,
                              mlaserve::v1::RegisterWorkerResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext* context,
                         const mlaserve::v1::HeartbeatRequest* request,
                         mlaserve::v1::HeartbeatResponse* response) override;
  grpc::Status Drain(grpc::ServerContext* context, const mlaserve::v1::DrainRequest* request,
                     mlaserve::v1::DrainResponse* response) override;
  grpc::Status Undrain(grpc::ServerContext* context, const mlaserve::v1::UndrainRequest* request,
                       mlaserve::v1::UndrainResponse* response) override;
  grpc::Status ListWorkers(grpc::ServerContext* context,
                           const mlaserve::v1::ListWorkersRequest* request,
                           mlaserve::v1::ListWorkersResponse* response) override;
  grpc::Status Migrate(grpc::ServerContext* context, const mlaserve::v1::MigrateRequest* request,
                       mlaserve::v1::MigrateResponse* response) override;

 private:
  CoordinatorService& coordinator_;
  const SharedSecret& secret_;
};

// The caller of a server call: its host, from ServerContext::peer() ("ipv4:10.0.0.5:41234"
// -> "10.0.0.5", "ipv6:[::1]:41234" -> "::1"), and its TLS certificate's identity when it
// presented one.
CoordinatorService::Peer peer_of(const grpc::ServerContext& context);

}  // namespace mla
