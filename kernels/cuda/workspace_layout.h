// WorkspaceLayout: carves one device workspace into parts at byte offsets, each part starting
// on a kWorkspaceAlign boundary (what every kernel's workspace promises its parts). Host-side
// arithmetic only; a value type.
#pragma once

#include <cstddef>

namespace mla::cuda {

inline constexpr size_t kWorkspaceAlign = 256;

class WorkspaceLayout {
 public:
  // The offset of the next part of `bytes` bytes.
  size_t take(size_t bytes) {
    const size_t offset = at_;
    at_ += (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
    return offset;
  }
  // The bytes every part taken so far needs.
  size_t bytes() const { return at_; }

 private:
  size_t at_ = 0;
};

}  // namespace mla::cuda
