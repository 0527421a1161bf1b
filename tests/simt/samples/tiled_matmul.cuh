// C = A B in float (row-major M x K times K x N): one Tile x Tile tile of C per block, one element per
// thread; each step stages a Tile x Tile tile of A and of B in shared memory between two barriers.
// kSkipSecondBarrier plants a bug: the next step overwrites the tiles while other threads still read them.
#pragma once

#include "simt/simt.h"

namespace flowformer::simt_samples::FF_SIMT_BUILD {

struct MatmulParams {
  const float* a;
  const float* b;
  float* c;
  int m, n, k;
};

template <int Tile, bool kSkipSecondBarrier>
__global__ void tiled_matmul(MatmulParams p) {
  FF_SHARED(float, a_tile, Tile * Tile);
  FF_SHARED(float, b_tile, Tile * Tile);
  const int tx = int(threadIdx.x), ty = int(threadIdx.y);
  const int row = int(blockIdx.y) * Tile + ty, col = int(blockIdx.x) * Tile + tx;
  float sum = 0.f;
  for (int k0 = 0; k0 < p.k; k0 += Tile) {
    a_tile[ty * Tile + tx] = row < p.m && k0 + tx < p.k ? p.a[int64_t(row) * p.k + k0 + tx] : 0.f;
    b_tile[ty * Tile + tx] = k0 + ty < p.k && col < p.n ? p.b[int64_t(k0 + ty) * p.n + col] : 0.f;
    __syncthreads();
    for (int kk = 0; kk < Tile; ++kk) {
      sum += a_tile[ty * Tile + kk] * b_tile[kk * Tile + tx];
    }
    if (!kSkipSecondBarrier) {
      __syncthreads();
    }
  }
  if (row < p.m && col < p.n) {
    p.c[int64_t(row) * p.n + col] = sum;
  }
}

template <int Tile, bool kSkipSecondBarrier = false>
auto run_tiled_matmul(const MatmulParams& p, simt::Stream stream = {}) {
  const simt::Dim3 grid(unsigned((p.n + Tile - 1) / Tile), unsigned((p.m + Tile - 1) / Tile));
  return simt::launch("tiled_matmul", tiled_matmul<Tile, kSkipSecondBarrier>,
                      {grid, simt::Dim3(Tile, Tile), 0, stream}, p);
}

}  // namespace flowformer::simt_samples::FF_SIMT_BUILD
