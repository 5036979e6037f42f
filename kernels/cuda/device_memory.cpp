#include "kernels/cuda/device_memory.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/fp8_latent.h"
#include "kernels/cuda/cuda_check.h"

namespace mla::cuda {

Tensor device_empty(Shape shape, DType dtype) {
  const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  void* ptr = nullptr;
  if (bytes > 0) {
    const cudaError_t err = cudaMalloc(&ptr, bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error so later calls work
      MLA_THROW(kResourceExhausted, "cannot allocate {} bytes ({} {}) on the GPU: {}", bytes,
                shape_str(shape), dtype_name(dtype), cudaGetErrorString(err));
    }
  }
  std::shared_ptr<void> owner(ptr, [](void* p) {
    if (p != nullptr) cudaFree(p);
  });
  // A zero-sized tensor still needs a non-null data pointer to count as defined.
  static char empty_marker;
  return Tensor::borrow(owner, ptr != nullptr ? ptr : &empty_marker, std::move(shape), dtype,
                        Device::kCuda);
}

Tensor upload_bf16(const Tensor& host) {
  MLA_CHECK(host.device() == Device::kCpu, "upload_bf16 takes a host tensor");
  Tensor out = device_empty(host.shape(), DType::kBF16);
  if (host.dtype() == DType::kBF16) {
    copy_to_device(out.raw(), host.raw(), host.nbytes());
    return out;
  }
  const float* src = host.f32();
  std::vector<uint16_t> staged(host.numel());
  for (int64_t i = 0; i < host.numel(); ++i) staged[i] = f32_to_bf16(src[i]);
  copy_to_device(out.raw(), staged.data(), staged.size() * sizeof(uint16_t));
  return out;
}

Tensor upload_f32(const Tensor& host) {
  MLA_CHECK(host.device() == Device::kCpu && host.dtype() == DType::kF32,
            "upload_f32 takes a host fp32 tensor");
  Tensor out = device_empty(host.shape(), DType::kF32);
  copy_to_device(out.raw(), host.raw(), host.nbytes());
  return out;
}

void fill_random_bf16(void* dst, size_t bytes, uint64_t seed) {
  const size_t block = std::max<size_t>(std::min<size_t>(bytes, size_t{64} << 20) / 2, 1);
  std::vector<uint16_t> host(block);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  for (auto& v : host) {
    v = f32_to_bf16(normal(rng));
    if ((v & 0x7fff) == 0) v = 0x3f80;  // 1.0
  }
  char* out = static_cast<char*>(dst);
  for (size_t off = 0; off < bytes; off += block * 2) {
    MLA_CUDA_CHECK(cudaMemcpy(out + off, host.data(), std::min(block * 2, bytes - off),
                              cudaMemcpyHostToDevice));
  }
}

void fill_random_fp8_latent(void* dst, int64_t rows, int64_t d_c, int64_t d_r, uint64_t seed) {
  const cpu::Fp8LatentRow f{.d_c = d_c, .d_r = d_r};
  const int64_t block =
      std::max<int64_t>(std::min<int64_t>(rows, (int64_t{8} << 20) / f.bytes()), 1);
  std::vector<float> values(block * (d_c + d_r));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  for (float& v : values) v = normal(rng);
  std::vector<uint8_t> host(block * f.bytes());
  cpu::quantize_latent_fp8(f, values.data(), block, d_c + d_r, host.data());
  char* out = static_cast<char*>(dst);
  for (int64_t row = 0; row < rows; row += block) {
    MLA_CUDA_CHECK(cudaMemcpy(out + row * f.bytes(), host.data(),
                              std::min(block, rows - row) * f.bytes(), cudaMemcpyHostToDevice));
  }
}

void copy_to_device(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) MLA_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) MLA_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

void copy_on_device(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) MLA_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
}

void copy_on_device_async(void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes > 0) {
    MLA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice,
                                   static_cast<cudaStream_t>(stream)));
  }
}

void synchronize(void* stream) {
  MLA_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}

void copy_rows_to_device(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                         size_t row_bytes, size_t rows) {
  if (row_bytes == 0 || rows == 0) return;
  MLA_CUDA_CHECK(
      cudaMemcpy2D(dst, dst_pitch, src, src_pitch, row_bytes, rows, cudaMemcpyHostToDevice));
}

void copy_rows_to_host(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                       size_t row_bytes, size_t rows) {
  if (row_bytes == 0 || rows == 0) return;
  MLA_CUDA_CHECK(
      cudaMemcpy2D(dst, dst_pitch, src, src_pitch, row_bytes, rows, cudaMemcpyDeviceToHost));
}

MemoryInfo memory_info() {
  MemoryInfo info;
  MLA_CUDA_CHECK(cudaMemGetInfo(&info.free, &info.total));
  return info;
}

int num_sms() {
  int device = 0, sms = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&device));
  MLA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

int64_t l2_cache_bytes() {
  int device = 0, bytes = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&device));
  MLA_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, device));
  return bytes;
}

void set_device(int device) { MLA_CUDA_CHECK(cudaSetDevice(device)); }

int current_device() {
  int device = 0;
  MLA_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

DeviceGuard::DeviceGuard(int device) : previous_(current_device()) {
  if (device != previous_) {
    set_device(device);
    changed_ = true;
  }
}

DeviceGuard::~DeviceGuard() {
  if (changed_) cudaSetDevice(previous_);  // no throw from a destructor
}

int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // namespace mla::cuda
