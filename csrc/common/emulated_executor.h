// Runs the items of a portable kernel through the SIMT emulator: the CUDA kernel run_items
// (kernels/common/item_kernel.cuh) compiled for the host, one emulated CUDA thread per item, blocks on
// torch's intra-op threads. The test mode FLOWFORMER_EMULATE_CUDA=1 runs the CUDA backends' algorithms
// with it on CPU tensors. Include it after the ATen headers: simt.h defines the CUDA names as macros.
#pragma once

#include "common/cpu_vec.h"

#include <ATen/Parallel.h>

#include <cstdint>

#include "common/item_kernel.cuh"

namespace flowformer::portable {

// The item compiled as nvcc compiles device code: with fused multiply-adds (x86-64-v3 and v4 clones, as
// the host executor's), so that the emulated kernel rounds as the GPU does.
template <typename Item>
FLOWFORMER_CPU_CLONES __attribute__((flatten)) void run_item_fused(const Item& item, int64_t i) {
  item(i);
}

template <typename Item>
struct FusedItem {
  Item item;
  void operator()(int64_t i) const { run_item_fused(item, i); }
};

struct EmulatedExecutor {
  static constexpr int kLanes = 1;  // as CudaExecutor: one thread per channel

  template <typename Item>
  void operator()(int64_t items, const Item& item) const {
    simt::Options options = simt::current_options();
    options.host_threads = at::get_num_threads();
    const simt::OptionsScope scope(options);
    emulated::launch_items(items, FusedItem<Item>{item}, simt::Stream{});
  }
};

}  // namespace flowformer::portable
