// gRPC credentials from the deployment's `tls:` section (runtime/deploy_config.h): TLS on
// every listener and channel when it names files, plaintext when it names none. The PEM
// files are read when the credentials are made; a missing or unreadable file is an
// mla::Error(kNotFound) naming the field and the path.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>

#include "runtime/deploy_config.h"

namespace mla {

// For a listener: the certificate and key (tls.cert_file, tls.key_file are required when TLS
// is on), and with tls.require_client_cert, clients must present a certificate signed by
// tls.ca_file.
std::shared_ptr<grpc::ServerCredentials> server_credentials(const TlsConfig& tls);

// For a channel: servers are verified against tls.ca_file (the system's roots when it is
// empty); with tls.require_client_cert, the channel presents tls.cert_file and tls.key_file.
std::shared_ptr<grpc::ChannelCredentials> channel_credentials(const TlsConfig& tls);

}  // namespace mla
