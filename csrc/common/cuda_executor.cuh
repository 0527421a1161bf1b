// Runs the items of a portable kernel (kernels/common/portable.h) on the GPU: one thread per item
// (run_items, kernels/common/item_kernel.cuh), on the current stream of the current device (the caller
// holds a device guard), every launch checked.
#pragma once

#include "common/item_kernel.cuh"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>

namespace flowformer::portable {

struct CudaExecutor {
  static constexpr int kLanes = 1;  // channels per item (ChannelBlock): one thread per channel

  template <typename Item>
  void operator()(int64_t items, const Item& item) const {
    if (items == 0) {
      return;
    }
    const int64_t blocks = (items + kItemsPerBlock - 1) / kItemsPerBlock;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "flowformer: ", items,
                " items exceed one CUDA launch");
    run_items<<<static_cast<unsigned>(blocks), kItemsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(items, item);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace flowformer::portable
