// Tensor: a typed, shaped view of memory on one device.
//
// A Tensor shares ownership of its storage (copies are cheap views of the same bytes).
// Storage is either allocated here (64-byte aligned host memory, or device memory in the
// CUDA backend) or borrowed from an owner kept alive by the storage's shared_ptr (e.g. a
// memory-mapped checkpoint). Row-major, contiguous unless created by a strided view.
// Not thread-safe for concurrent writes to the same bytes; separate tensors are independent.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/error.h"

namespace mla {

enum class Device : uint8_t { kCpu, kCuda };
std::string to_string(Device d);                  // "cpu", "cuda"
Device device_from_string(const std::string& s);  // throws kInvalidArgument for other names

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& shape);  // "[2, 3, 4]"
int64_t shape_numel(const Shape& shape);

class Tensor {
 public:
  Tensor() = default;

  // Uninitialised host tensor.
  static Tensor empty(Shape shape, DType dtype = DType::kF32);
  static Tensor zeros(Shape shape, DType dtype = DType::kF32);
  // fp32 tensor with the given values (shape must match their count).
  static Tensor from_vector(Shape shape, const std::vector<float>& values);
  // Borrows `data`; `owner` keeps it alive for as long as any view exists.
  static Tensor borrow(std::shared_ptr<void> owner, void* data, Shape shape, DType dtype,
                       Device device = Device::kCpu);

  bool defined() const { return data_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }

  void* raw() const { return data_; }
  template <typename T>
  T* data() const {
    return static_cast<T*>(data_);
  }
  // Typed fp32 access with a dtype check; most CPU code wants this.
  float* f32() const;

  // Same bytes, new shape (numel must match).
  Tensor view(Shape shape) const;
  // Rows [begin, end) of the first dimension.
  Tensor slice_rows(int64_t begin, int64_t end) const;
  // Deep copy on the host.
  Tensor clone() const;

 private:
  std::shared_ptr<void> owner_;
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::kF32;
  Device device_ = Device::kCpu;
};

}  // namespace mla
