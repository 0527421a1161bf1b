// simt::shared_ptr<T>: a pointer to shared memory in kernel code. nvcc: T*; host: a checked SharedPtr.
#pragma once

#if defined(__CUDACC__)
namespace flowformer::simt {
template <typename T>
using shared_ptr = T*;
}  // namespace flowformer::simt
#else
#include "simt/host_api.h"
namespace flowformer::simt {
template <typename T>
using shared_ptr = SharedPtr<T>;
}  // namespace flowformer::simt
#endif
