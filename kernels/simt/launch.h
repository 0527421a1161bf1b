// Launching a kernel from either build. nvcc: <<<grid, block, shared bytes, stream>>> (raising the dynamic
// shared-memory limit past 48 KiB when asked), every launch checked. Host: the SIMT emulator runs it
// synchronously and returns its statistics.
#pragma once

#include "simt/types.h"

#include <cstddef>
#include <utility>

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#else
#include "simt/emulator.h"
#endif

namespace flowformer::simt {

#if defined(__CUDACC__)
using Stream = cudaStream_t;
#else
struct Stream {};  // emulated launches are synchronous
#endif

struct LaunchConfig {
  Dim3 grid;
  Dim3 block;
  std::size_t shared_bytes = 0;  // dynamic shared memory
  Stream stream{};
};

#if defined(__CUDACC__)

inline void check_cuda(cudaError_t status, const char* kernel, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("flowformer: ") + what + " of kernel " + kernel + " failed: " +
                             cudaGetErrorString(status));
  }
}

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  if (config.shared_bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(config.shared_bytes)),
               name, "raising the shared-memory limit");
  }
  kernel<<<config.grid, config.block, config.shared_bytes, config.stream>>>(std::forward<Args>(args)...);
  check_cuda(cudaGetLastError(), name, "the launch");
}

#else

template <typename... Params, typename... Args>
LaunchStats launch(const char* name, void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  const auto body = [&] { kernel(args...); };
  return launch_emulated(
      name, config.grid, config.block, config.shared_bytes,
      [](const void* context) { (*static_cast<const decltype(body)*>(context))(); }, &body);
}

#endif

}  // namespace flowformer::simt
