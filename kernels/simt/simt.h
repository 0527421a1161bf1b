// The one header a kernel source includes: it compiles as CUDA with nvcc, and as an emulation with the
// host compiler (kernels/simt/README.md). In the host build the CUDA names a kernel uses (threadIdx,
// __syncthreads, __shfl_sync, ...) map onto the emulator, and shared memory is declared with FF_SHARED /
// FF_DYNAMIC_SHARED (plain __shared__ arrays under nvcc, checked pointers on the host). FF_SIMT_BUILD
// names the build (cuda or emulated): kernel families put their launch functions in that namespace, so
// that both builds link into one library.
#pragma once

#include "simt/async_copy.h"
#include "simt/fast_math.h"
#include "simt/global_memory.h"
#include "simt/launch.h"
#include "simt/shared_ptr.h"
#include "simt/tensor_core.h"
#include "simt/types.h"

#define FF_SIMT_PRAGMA(text) _Pragma(#text)

#if defined(__CUDACC__)

#define FF_SIMT_BUILD cuda
#define FF_DEVICE __device__ __forceinline__
#define FF_UNROLL _Pragma("unroll")
#define FF_UNROLL_BY(n) FF_SIMT_PRAGMA(unroll n)
#define FF_SHARED(T, name, count)                    \
  __shared__ __align__(16) T name##_storage_[count]; \
  ::flowformer::simt::shared_ptr<T> name = name##_storage_
#define FF_DYNAMIC_SHARED(T, name)                                    \
  extern __shared__ __align__(16) unsigned char ff_simt_dynamic_[]; \
  ::flowformer::simt::shared_ptr<T> name = reinterpret_cast<T*>(ff_simt_dynamic_)

#else

#include "simt/host_api.h"

#define FF_SIMT_BUILD emulated
#define FF_DEVICE inline
#define FF_UNROLL _Pragma("GCC unroll 64")
#define FF_UNROLL_BY(n) FF_SIMT_PRAGMA(GCC unroll n)
#define FF_SHARED(T, name, count) \
  ::flowformer::simt::shared_ptr<T> name = ::flowformer::simt::static_shared<T>(FF_SIMT_SITE, count)
#define FF_DYNAMIC_SHARED(T, name) ::flowformer::simt::shared_ptr<T> name = ::flowformer::simt::dynamic_shared<T>()

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx (::flowformer::simt::thread_idx())
#define blockIdx (::flowformer::simt::block_idx())
#define blockDim (::flowformer::simt::block_dim())
#define gridDim (::flowformer::simt::grid_dim())
#define warpSize 32
#define __popc(x) __builtin_popcount(x)
#define __syncthreads() ::flowformer::simt::syncthreads(FF_SIMT_SITE)
#define __syncwarp(...) ::flowformer::simt::syncwarp(FF_SIMT_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::flowformer::simt::shfl_sync(FF_SIMT_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) ::flowformer::simt::shfl_up_sync(FF_SIMT_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) ::flowformer::simt::shfl_down_sync(FF_SIMT_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::flowformer::simt::shfl_xor_sync(FF_SIMT_SITE, __VA_ARGS__)
#define __ballot_sync(...) ::flowformer::simt::ballot_sync(FF_SIMT_SITE, __VA_ARGS__)
#define __any_sync(...) ::flowformer::simt::any_sync(FF_SIMT_SITE, __VA_ARGS__)
#define __all_sync(...) ::flowformer::simt::all_sync(FF_SIMT_SITE, __VA_ARGS__)

#endif
