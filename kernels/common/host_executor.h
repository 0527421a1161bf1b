// Runs the items of a portable kernel (portable.h) on the host: a parallel loop over item indices.
// Used by the CPU backend in emulation mode (FLOWFORMER_EMULATE_CUDA=1) to test the CUDA algorithm.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace flowformer::portable {

struct HostExecutor {
  template <typename Item>
  void operator()(int64_t items, const Item& item) const {
    at::parallel_for(0, items, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        item(i);
      }
    });
  }
};

}  // namespace flowformer::portable
