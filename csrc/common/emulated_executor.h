// Runs the items of a portable kernel through the SIMT emulator: the CUDA kernel run_items
// (kernels/common/item_kernel.cuh) compiled for the host, one emulated CUDA thread per item, blocks on
// torch's intra-op threads. The test mode FLOWFORMER_EMULATE_CUDA=1 runs the CUDA backends' algorithms
// with it on CPU tensors. Include it after the ATen headers: simt.h defines the CUDA names as macros.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "common/item_kernel.cuh"

namespace flowformer::portable {

struct EmulatedExecutor {
  static constexpr int kLanes = 1;  // as CudaExecutor: one thread per channel

  template <typename Item>
  void operator()(int64_t items, const Item& item) const {
    simt::Options options = simt::current_options();
    options.host_threads = at::get_num_threads();
    const simt::OptionsScope scope(options);
    emulated::launch_items(items, item, simt::Stream{});
  }
};

}  // namespace flowformer::portable
