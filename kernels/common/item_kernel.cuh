// The one CUDA kernel of the portable item code (portable.h): thread i of the grid runs item i.
// Launched by CudaExecutor (csrc/common/cuda_executor.cuh).
#pragma once

#include <cstdint>

namespace flowformer::portable {

constexpr int kItemsPerBlock = 256;

template <typename Item>
__global__ void __launch_bounds__(kItemsPerBlock) run_items(int64_t items, Item item) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kItemsPerBlock + threadIdx.x;
  if (i < items) {
    item(i);
  }
}

}  // namespace flowformer::portable
