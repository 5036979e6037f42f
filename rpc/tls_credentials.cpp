#include "rpc/tls_credentials.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "kernels/error.h"

namespace mla {
namespace {

std::string read_pem(const std::string& path, const char* field) {
  if (path.empty()) return {};
  if (std::filesystem::is_directory(path)) {
    MLA_THROW(kInvalidArgument, "{} {}: is a directory, not a PEM file", field, path);
  }
  std::ifstream in(path);
  if (!in) MLA_THROW(kNotFound, "{} {}: cannot be read", field, path);
  std::stringstream text;
  text << in.rdbuf();
  const std::string pem = text.str();
  if (pem.find("-----BEGIN ") == std::string::npos) {
    MLA_THROW(kInvalidArgument, "{} {}: not a PEM file", field, path);
  }
  return pem;
}

}  // namespace

std::shared_ptr<grpc::ServerCredentials> server_credentials(const TlsConfig& tls) {
  if (!tls.enabled()) return grpc::InsecureServerCredentials();
  MLA_REQUIRE(!tls.cert_file.empty() && !tls.key_file.empty(),
              "tls: a listener needs tls.cert_file and tls.key_file");
  grpc::SslServerCredentialsOptions options(
      tls.require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                              : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_root_certs = read_pem(tls.ca_file, "tls.ca_file");
  options.pem_key_cert_pairs.push_back(
      {read_pem(tls.key_file, "tls.key_file"), read_pem(tls.cert_file, "tls.cert_file")});
  return grpc::SslServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> channel_credentials(const TlsConfig& tls) {
  if (!tls.enabled()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = read_pem(tls.ca_file, "tls.ca_file");
  if (tls.require_client_cert) {
    options.pem_private_key = read_pem(tls.key_file, "tls.key_file");
    options.pem_cert_chain = read_pem(tls.cert_file, "tls.cert_file");
  }
  return grpc::SslCredentials(options);
}

}  // namespace mla
