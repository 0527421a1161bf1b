// simt::shared_ptr<T>: a pointer to shared memory in kernel code. nvcc: T*; host: a checked SharedPtr.
#pragma once

#if defined(__CUDACC__)
namespace flowformer::simt {
template <typename T>
using shared_ptr = T*;
// The same bytes as another type (a vector access: U of 8 or 16 bytes).
template <typename U, typename T>
__device__ __forceinline__ U* shared_cast(T* p) {
  return reinterpret_cast<U*>(p);
}
}  // namespace flowformer::simt
#else
#include "simt/host_api.h"
namespace flowformer::simt {
template <typename T>
using shared_ptr = SharedPtr<T>;
template <typename U, typename T>
SharedPtr<U> shared_cast(const SharedPtr<T>& p) {
  return p.template as<U>();
}
}  // namespace flowformer::simt
#endif
