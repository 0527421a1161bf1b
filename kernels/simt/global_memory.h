// Direct loads and stores of global memory in kernel code, so that the emulator can count them (counters.h):
//   T x = load_global(p);   store_global(p, x);
// nvcc: plain *p; host: the same, counted per warp-level instruction when the launch counts.
#pragma once

#if defined(__CUDACC__)

namespace flowformer::simt {

template <typename T>
__device__ __forceinline__ T load_global(const T* p) {
  return *p;
}

template <typename T, typename U>
__device__ __forceinline__ void store_global(T* p, const U& value) {
  *p = static_cast<T>(value);
}

}  // namespace flowformer::simt

#else

#include "simt/host_api.h"

#include <source_location>

namespace flowformer::simt {

template <typename T>
T load_global(const T* p, std::source_location at = std::source_location::current()) {
  detail::count_global(Site{at.file_name(), int(at.line())}, p, sizeof(T), false);
  return *p;
}

template <typename T, typename U>
void store_global(T* p, const U& value, std::source_location at = std::source_location::current()) {
  detail::count_global(Site{at.file_name(), int(at.line())}, p, sizeof(T), true);
  *p = static_cast<T>(value);
}

}  // namespace flowformer::simt

#endif
