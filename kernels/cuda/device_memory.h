// Device memory for the CUDA backend: tensors allocated with cudaMalloc (freed when the last
// view goes), host <-> device copies, and fp32 host tensors uploaded as bf16.
// Allocation and copies here synchronise (they run at load time or outside the step loop);
// the step loop itself only enqueues.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/tensor.h"

namespace mla::cuda {

// Uninitialised device tensor on the current device. Throws kResourceExhausted naming the
// size when the device lacks the memory.
Tensor device_empty(Shape shape, DType dtype);
// A host tensor (fp32 or bf16) copied to the device as bf16 (round to nearest even).
Tensor upload_bf16(const Tensor& host);
// A host fp32 tensor copied to the device as fp32.
Tensor upload_f32(const Tensor& host);

// Fills `bytes` of device memory with random never-zero bf16 values (about normal, sigma 1;
// zeros would flatter memory-bound kernels): a 64 MiB host block, generated from `seed` and
// uploaded at every offset, since generating gigabytes on the host would dominate a
// benchmark's set-up.
void fill_random_bf16(void* dst, size_t bytes, uint64_t seed);
// Fills `rows` packed fp8 latent rows (kernels/cpu/fp8_latent.h, d_c + d_r values: normal,
// sigma 1, quantised by cpu::quantize_latent_fp8) at `dst`, likewise from a host block of rows
// uploaded at every offset.
void fill_random_fp8_latent(void* dst, int64_t rows, int64_t d_c, int64_t d_r, uint64_t seed);

void copy_to_device(void* dst, const void* src, size_t bytes);
void copy_to_host(void* dst, const void* src, size_t bytes);
void copy_on_device(void* dst, const void* src, size_t bytes);
// Enqueues a device-to-device copy on `stream` (a cudaStream_t) without waiting; graph-capturable.
void copy_on_device_async(void* dst, const void* src, size_t bytes, void* stream);
// Waits until `stream` (a cudaStream_t) has finished its work.
void synchronize(void* stream);
// `rows` rows of `row_bytes` each, between buffers whose rows start `*_pitch` bytes apart (one
// cudaMemcpy2D).
void copy_rows_to_device(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                         size_t row_bytes, size_t rows);
void copy_rows_to_host(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                       size_t row_bytes, size_t rows);

// Free and total memory of the current device, in bytes.
struct MemoryInfo {
  size_t free = 0, total = 0;
};
MemoryInfo memory_info();

// Number of streaming multiprocessors of the current device.
int num_sms();
// Size of the current device's L2 cache, in bytes.
int64_t l2_cache_bytes();

// Makes `device` current for this thread.
void set_device(int device);
// The calling thread's current device.
int current_device();

// Makes `device` current for the calling thread while the guard lives, then restores the
// device that was current. CUDA's current device is per thread: objects that hold memory on
// one device and are called from several threads (the worker's step loop, RPC handlers) set
// it with a guard instead of relying on the caller's thread.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

}  // namespace mla::cuda
