#include "kernels/tensor.h"

#include <cstdlib>
#include <cstring>

namespace mla {

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Tensor Tensor::empty(Shape shape, DType dtype) {
  for (int64_t d : shape) MLA_REQUIRE(d >= 0, "negative dimension in shape {}", shape_str(shape));
  const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (p == nullptr) {
    MLA_THROW(kResourceExhausted, "cannot allocate {} bytes for tensor {}", bytes,
              shape_str(shape));
  }
  Tensor t;
  t.owner_ = std::shared_ptr<void>(p, std::free);
  t.data_ = p;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype) {
  Tensor t = empty(std::move(shape), dtype);
  std::memset(t.data_, 0, t.nbytes());
  return t;
}

Tensor Tensor::from_vector(Shape shape, const std::vector<float>& values) {
  MLA_REQUIRE(shape_numel(shape) == static_cast<int64_t>(values.size()),
              "shape {} does not hold {} values", shape_str(shape), values.size());
  Tensor t = empty(std::move(shape));
  std::memcpy(t.data_, values.data(), values.size() * sizeof(float));
  return t;
}

std::string to_string(Device d) { return d == Device::kCuda ? "cuda" : "cpu"; }

Device device_from_string(const std::string& s) {
  if (s == "cpu") return Device::kCpu;
  if (s == "cuda") return Device::kCuda;
  MLA_THROW(kInvalidArgument, "device must be cpu or cuda, got `{}`", s);
}

Tensor Tensor::borrow(std::shared_ptr<void> owner, void* data, Shape shape, DType dtype,
                      Device device) {
  Tensor t;
  t.owner_ = std::move(owner);
  t.data_ = data;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  return t;
}

float* Tensor::f32() const {
  MLA_CHECK(dtype_ == DType::kF32, "tensor {} is {}, not F32", shape_str(shape_),
            dtype_name(dtype_));
  return static_cast<float*>(data_);
}

Tensor Tensor::view(Shape shape) const {
  MLA_CHECK(shape_numel(shape) == numel(), "cannot view {} as {}", shape_str(shape_),
            shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  MLA_CHECK(ndim() >= 1 && 0 <= begin && begin <= end && end <= shape_[0],
            "bad row slice [{}, {}) of {}", begin, end, shape_str(shape_));
  const size_t row_bytes = shape_[0] == 0 ? 0 : nbytes() / shape_[0];
  Tensor t = *this;
  t.data_ = static_cast<char*>(data_) + begin * row_bytes;
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::clone() const {
  MLA_CHECK(device_ == Device::kCpu, "clone() is host-only");
  Tensor t = empty(shape_, dtype_);
  std::memcpy(t.data_, data_, nbytes());
  return t;
}

}  // namespace mla
