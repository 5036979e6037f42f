// Checks on the paths a user names (a model directory, a deployment file), so that a wrong
// one fails with a message naming it and its role instead of a misleading error further on:
// a directory opens as a stream that reads nothing, and a file given as a model directory
// makes every file inside it "missing".
#pragma once

#include <string>
#include <string_view>

namespace mla {

// Throws unless `path` is an existing directory: kNotFound if nothing is there,
// kInvalidArgument if it is something else, kFailedPrecondition if it cannot be examined
// (e.g. permissions). `role` starts the message, e.g. "model directory" gives "model
// directory /m does not exist".
void require_directory(const std::string& path, std::string_view role);

// The same for a file: kInvalidArgument if `path` is a directory. Pipes and devices pass
// (`--config <(generate-yaml)`).
void require_file(const std::string& path, std::string_view role);

}  // namespace mla
