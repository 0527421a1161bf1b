// cp.async (16 bytes, global -> shared, bypassing L1: .cg) with commit and wait groups.
//   cp_async_16(dst, src, fill): copies 16 bytes; fill = false writes 16 zero bytes and reads nothing
//   cp_async_commit(): closes the group of copies issued since the last commit
//   cp_async_wait<N>(): waits until at most N committed groups of this thread are pending
// Both addresses must be 16-byte aligned. Copies are visible to the issuing thread after the wait, to the
// others after a barrier that follows it. Host: the copy happens at the wait; until then every access to
// its bytes is a hazard, and so is a thread that exits with copies never waited for.
#pragma once

#include "simt/shared_ptr.h"
#include "simt/types.h"

#if !defined(__CUDACC__)
#include <cstddef>
#include <source_location>
#endif

namespace flowformer::simt {

#if defined(__CUDACC__)

template <typename T>
__device__ __forceinline__ void cp_async_16(T* destination, const T* source, bool fill = true) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(destination));
  const int source_bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(source), "r"(source_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#else

namespace detail {
void cp_async_issue(Site site, SharedPtr<unsigned char> destination, const void* source, bool fill);
void cp_async_wait_groups(std::size_t pending_groups);
}  // namespace detail

template <typename T>
void cp_async_16(SharedPtr<T> destination, const T* source, bool fill = true,
                 std::source_location at = std::source_location::current()) {
  detail::cp_async_issue(Site{at.file_name(), int(at.line())}, destination.template as<unsigned char>(), source, fill);
}

void cp_async_commit();

template <int N>
void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes a count of groups");
  detail::cp_async_wait_groups(std::size_t(N));
}

#endif

}  // namespace flowformer::simt
