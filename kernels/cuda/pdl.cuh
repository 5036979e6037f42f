// Programmatic dependent launch (sm_90): a kernel launched with launch_dependent may start while
// the previous kernel on its stream still runs. It must call wait_for_prerequisite() before it
// reads anything an earlier kernel wrote (and before it exits), since that wait is what orders
// it after the earlier kernels; work that reads only weights can go before the wait. A kernel
// that calls allow_dependent_launch() lets a dependent next kernel launch before it finishes
// (without the call that happens as its blocks exit), whether it was itself launched as a
// dependent or not; wait_for_prerequisite() is a no-op in a kernel launched the ordinary way.
// Graph capture keeps the dependency type. Include from .cu files only.
#pragma once

#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"

namespace mla::cuda {

__device__ __forceinline__ void allow_dependent_launch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

__device__ __forceinline__ void wait_for_prerequisite() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

// Launches kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent of
// the previous kernel on the stream when `dependent` (else an ordinary launch). Throws
// kInternal when the launch fails, so launchers need no cudaGetLastError after it.
template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, int smem,
                      cudaStream_t stream, bool dependent, const Args&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = dependent ? &attribute : nullptr;
  config.numAttrs = dependent ? 1 : 0;
  MLA_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
}

}  // namespace mla::cuda
