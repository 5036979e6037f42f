#include "rpc/control_service.h"

#include "rpc/generate_request.h"
#include "rpc/status.h"

namespace mla {

namespace v1 = mlaserve::v1;

CoordinatorService::Peer peer_of(const grpc::ServerContext& context) {
  CoordinatorService::Peer peer;
  std::string host = context.peer();
  if (const size_t scheme = host.find(':'); scheme != std::string::npos) {
    host = host.substr(scheme + 1);  // drop "ipv4:" / "ipv6:" / "unix:"
  }
  if (const size_t port = host.rfind(':'); port != std::string::npos && host.front() != '/') {
    host = host.substr(0, port);
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  peer.host = host;
  if (const auto auth = context.auth_context(); auth && auth->IsPeerAuthenticated()) {
    for (const grpc::string_ref& id : auth->GetPeerIdentity()) {
      peer.identity += (peer.identity.empty() ? "" : ",") + std::string(id.data(), id.size());
    }
  }
  return peer;
}

grpc::Status ControlService::RegisterWorker(grpc::ServerContext* context,
                                            const v1::RegisterWorkerRequest* request,
                                            v1::RegisterWorkerResponse* response) {
  if (grpc::Status auth = secret_.check(*context, "RegisterWorker"); !auth.ok()) return auth;
  return coordinator_.register_worker(peer_of(*context), *request, response);
}

grpc::Status ControlService::Heartbeat(grpc::ServerContext* context,
                                       const v1::HeartbeatRequest* request,
                                       v1::HeartbeatResponse* response) {
  if (grpc::Status auth = secret_.check(*context, "Heartbeat"); !auth.ok()) return auth;
  return coordinator_.heartbeat(*request, response);
}

grpc::Status ControlService::Drain(grpc::ServerContext* context, const v1::DrainRequest* request,
                                   v1::DrainResponse* response) {
  if (grpc::Status auth = secret_.check(*context, "Drain"); !auth.ok()) return auth;
  return coordinator_.drain(*request, response);
}

grpc::Status ControlService::Migrate(grpc::ServerContext* context,
                                     const v1::MigrateRequest* request,
                                     v1::MigrateResponse* response) {
  if (grpc::Status auth = secret_.check(*context, "Migrate"); !auth.ok()) return auth;
  try {
    check_request_id(request->request_id());
  } catch (const Error& e) {
    return to_grpc_status(e);
  }
  return coordinator_.migrate(*request, response);
}

grpc::Status ControlService::Undrain(grpc::ServerContext* context,
                                     const v1::UndrainRequest* request,
                                     v1::UndrainResponse* response) {
  if (grpc::Status auth = secret_.check(*context, "Undrain"); !auth.ok()) return auth;
  return coordinator_.undrain(*request, response);
}

grpc::Status ControlService::ListWorkers(grpc::ServerContext* context,
                                         const v1::ListWorkersRequest*,
                                         v1::ListWorkersResponse* response) {
  if (grpc::Status auth = secret_.check(*context, "ListWorkers"); !auth.ok()) return auth;
  coordinator_.list_workers(response);
  return grpc::Status::OK;
}

}  // namespace mla
