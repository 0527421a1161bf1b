// Runs the items of a portable kernel (kernels/common/portable.h) on the host: a parallel loop over item
// indices, compiled for x86-64-v4, x86-64-v3 and a baseline (chosen by the running CPU's features,
// common/cpu_vec.h) so that items over channel lanes vectorise: the AFT CPU backend. (The test mode
// FLOWFORMER_EMULATE_CUDA=1 runs the CUDA item kernel instead: emulated_executor.h.)
#pragma once

#include "common/cpu_vec.h"

#include <ATen/Parallel.h>

#include <cstdint>

namespace flowformer::portable {

// flatten: the item is inlined into each clone, so that it is compiled for that clone's instruction set.
template <typename Item>
FLOWFORMER_CPU_CLONES __attribute__((flatten)) void run_host_items(const Item& item, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    item(i);
  }
}

struct HostExecutor {
  static constexpr int kLanes = 64;  // channels per item (ChannelBlock): 4 AVX-512 vectors of floats

  template <typename Item>
  void operator()(int64_t items, const Item& item) const {
    at::parallel_for(0, items, 4096, [&](int64_t begin, int64_t end) { run_host_items(item, begin, end); });
  }
};

}  // namespace flowformer::portable
