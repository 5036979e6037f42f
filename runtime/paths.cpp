#include "runtime/paths.h"

#include <filesystem>
#include <system_error>

#include "kernels/error.h"

namespace mla {
namespace {

namespace fs = std::filesystem;

// The type of what `path` names; throws for a missing path or one that cannot be examined.
fs::file_type existing_type(const std::string& path, std::string_view role) {
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (status.type() == fs::file_type::not_found) {
    MLA_THROW(kNotFound, "{} {} does not exist", role, path);
  }
  if (ec) MLA_THROW(kFailedPrecondition, "cannot access {} {}: {}", role, path, ec.message());
  return status.type();
}

}  // namespace

void require_directory(const std::string& path, std::string_view role) {
  if (existing_type(path, role) != fs::file_type::directory) {
    MLA_THROW(kInvalidArgument, "{} {} is not a directory", role, path);
  }
}

void require_file(const std::string& path, std::string_view role) {
  if (existing_type(path, role) == fs::file_type::directory) {
    MLA_THROW(kInvalidArgument, "{} {} is a directory, not a file", role, path);
  }
}

}  // namespace mla
