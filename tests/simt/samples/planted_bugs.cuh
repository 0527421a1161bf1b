// Kernels with one planted bug each, for the emulator's tests: each must be caught (host build only).
#pragma once

#include "simt/simt.h"

namespace flowformer::simt_samples::FF_SIMT_BUILD {

// Half of the block skips the barrier and exits.
__global__ void barrier_in_branch(float* out) {
  FF_SHARED(float, s, 64);
  s[threadIdx.x] = float(threadIdx.x);
  if (threadIdx.x < 16) {
    __syncthreads();
  }
  out[threadIdx.x] = s[threadIdx.x];
}

// Both halves reach a barrier, but not the same one.
__global__ void barriers_at_two_sites(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// Even threads fill their element; every thread reads its neighbour's.
__global__ void uninitialised_read(float* out) {
  FF_SHARED(float, s, 64);
  if (threadIdx.x % 2 == 0) {
    s[threadIdx.x] = 1.f;
  }
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x ^ 1u];
}

// One element past the end of the array.
__global__ void out_of_bounds(float* out) {
  FF_SHARED(float, s, 32);
  s[threadIdx.x + 1] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// ldmatrix rows must start on 16-byte boundaries: these start 2 bytes off.
__global__ void misaligned_ldmatrix(uint32_t* out) {
  FF_SHARED(simt::bf16, s, 8 * 8 + 8);
  for (int i = int(threadIdx.x); i < 72; i += 32) {
    s[i] = simt::bf16(float(i));
  }
  __syncthreads();
  uint32_t r[1];
  simt::ldmatrix<1, false>(r, s + 1 + int(threadIdx.x % 8) * 8);
  out[threadIdx.x] = r[0];
}

// A float read from a 2-byte aligned address.
__global__ void misaligned_word(float* out) {
  FF_SHARED(simt::bf16, s, 64);
  s[threadIdx.x] = simt::bf16(1.f);
  __syncthreads();
  out[threadIdx.x] = (s + 1).as<float>()[0];
}

// Lanes 16-31 never reach the shuffle their mask names.
__global__ void partial_shuffle(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) {
    v = __shfl_down_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// The copy is read before cp.async.wait_group.
__global__ void read_before_wait(const float* in, float* out) {
  FF_SHARED(float, s, 128);
  simt::cp_async_16(s + 4 * int(threadIdx.x), in + 4 * threadIdx.x);
  simt::cp_async_commit();
  out[threadIdx.x] = s[4 * threadIdx.x];
  simt::cp_async_wait<0>();
}

// An mma.m16n8k8 tf32 operand that was not rounded to tf32 (1 + 2^-20 keeps a bit below tf32's mantissa).
__global__ void unrounded_tf32_operand(float* out) {
  const float a[4] = {1.f + 0x1p-20f, 0.f, 0.f, 0.f}, b[2] = {1.f, 0.f}, c[4] = {};
  float d[4];
  simt::mma_m16n8k8_tf32(d, a, b, c);
  out[threadIdx.x] = d[0];
}

}  // namespace flowformer::simt_samples::FF_SIMT_BUILD
