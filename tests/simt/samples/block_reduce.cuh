// Per block: the sum of its chunk of x, and the count of its positive elements. Each thread sums a strided
// part; warps reduce with __shfl_down_sync (and count with __ballot_sync), warp results meet in shared
// memory, and warp 0 reduces those. Fixed order: the result does not depend on the schedule.
#pragma once

#include "simt/simt.h"

namespace flowformer::simt_samples::FF_SIMT_BUILD {

struct ReduceParams {
  const float* x;
  int64_t n, chunk;  // block b sums x[b * chunk, min((b + 1) * chunk, n))
  float* sums;
  int* positives;
};

template <int Threads>
__global__ void __launch_bounds__(Threads) block_reduce(ReduceParams p) {
  static_assert(Threads % 32 == 0 && Threads <= 1024, "whole warps");
  constexpr int kWarps = Threads / 32;
  FF_SHARED(float, warp_sums, kWarps);
  FF_SHARED(int, warp_counts, kWarps);
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int64_t begin = int64_t(blockIdx.x) * p.chunk, end = begin + p.chunk < p.n ? begin + p.chunk : p.n;
  float sum = 0.f;
  int count = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += Threads) {
    const float v = p.x[i];
    sum += v;
    count += __popc(__ballot_sync(0xffffffffu, v > 0.f)) * (lane == 0);
  }
  // every lane takes the same number of loop trips only when the chunk is a multiple of Threads; the
  // ballot above needs that (the caller guarantees it), the shuffles below do not
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_down_sync(0xffffffffu, sum, offset);
    count += __shfl_down_sync(0xffffffffu, count, offset);
  }
  if (lane == 0) {
    warp_sums[warp] = sum;
    warp_counts[warp] = count;
  }
  __syncthreads();
  if (warp == 0) {
    sum = lane < kWarps ? float(warp_sums[lane]) : 0.f;
    count = lane < kWarps ? int(warp_counts[lane]) : 0;
    for (int offset = 16; offset > 0; offset /= 2) {
      sum += __shfl_down_sync(0xffffffffu, sum, offset);
      count += __shfl_down_sync(0xffffffffu, count, offset);
    }
    if (lane == 0) {
      p.sums[blockIdx.x] = sum;
      p.positives[blockIdx.x] = count;
    }
  }
}

template <int Threads>
auto run_block_reduce(const ReduceParams& p, simt::Stream stream = {}) {
  const unsigned blocks = unsigned((p.n + p.chunk - 1) / p.chunk);
  return simt::launch("block_reduce", block_reduce<Threads>, {simt::Dim3(blocks), simt::Dim3(Threads), 0, stream}, p);
}

}  // namespace flowformer::simt_samples::FF_SIMT_BUILD
