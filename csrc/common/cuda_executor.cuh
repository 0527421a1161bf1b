// Runs the items of a portable kernel (kernels/common/portable.h) on the GPU: one thread per item
// (run_items, kernels/common/item_kernel.cuh), on the current stream of the current device (the caller
// holds a device guard), every launch checked.
#pragma once

#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "common/item_kernel.cuh"

namespace flowformer::portable {

struct CudaExecutor {
  static constexpr int kLanes = 1;  // channels per item (ChannelBlock): one thread per channel

  template <typename Item>
  void operator()(int64_t items, const Item& item) const {
    cuda::launch_items(items, item, c10::cuda::getCurrentCUDAStream());
  }
};

}  // namespace flowformer::portable
