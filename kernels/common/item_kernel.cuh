// The one kernel of the portable item code (portable.h): thread i of the grid runs item i, 256 threads to
// a block. Both builds (kernels/simt): nvcc runs it on the GPU (CudaExecutor, csrc/common/cuda_executor.cuh),
// the SIMT emulator on the host (EmulatedExecutor, csrc/common/emulated_executor.h: the test mode
// FLOWFORMER_EMULATE_CUDA=1), so the CPU test suite runs the item kernels as the GPU runs them.
#pragma once

#include "simt/simt.h"

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace flowformer::portable::FF_SIMT_BUILD {

constexpr int kItemsPerBlock = 256;

template <typename Item>
__global__ void __launch_bounds__(kItemsPerBlock) run_items(int64_t items, Item item) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x;
  if (i < items) {
    item(i);
  }
}

template <typename Item>
void launch_items(int64_t items, const Item& item, simt::Stream stream) {
  if (items == 0) {
    return;
  }
  const int64_t blocks = (items + kItemsPerBlock - 1) / kItemsPerBlock;
  if (blocks > std::numeric_limits<int32_t>::max()) {
    throw std::length_error("flowformer: " + std::to_string(items) + " items exceed one CUDA launch");
  }
  simt::launch("run_items", run_items<Item>, {simt::Dim3(unsigned(blocks)), simt::Dim3(kItemsPerBlock), 0, stream},
               items, item);
}

}  // namespace flowformer::portable::FF_SIMT_BUILD
