// C = A B on tensor cores: A (M x K) and B (K x N) row-major in bf16 or half, C (M x N) float.
// A block of 4 warps computes a 64 x 64 tile of C, each warp a 32 x 32 quarter as 2 x 4 mma.m16n8k16
// tiles with float accumulators. K advances 32 at a time through two shared-memory stages: cp.async
// loads step s + 1 while the warps multiply step s (A fragments by ldmatrix.x4, B fragments by
// ldmatrix.x4.trans from the row-major B tile). Needs K % 8 == 0 and N % 8 == 0 (16-byte rows); rows and
// columns past M, N, K are zero-filled. kSwapFragments plants a bug: a[1] and a[2] exchanged.
#pragma once

#include "simt/simt.h"

namespace flowformer::simt_samples::FF_SIMT_BUILD {

template <typename T>
struct GemmParams {
  const T* a;
  const T* b;
  float* c;
  int m, n, k;
};

struct GemmTile {
  static constexpr int kM = 64, kN = 64, kK = 32, kThreads = 128;
  static constexpr int kLdA = kK + 8, kLdB = kN + 8;  // padded rows: 80 and 144 bytes, 16-byte aligned
  static constexpr int kStageA = kM * kLdA, kStageB = kK * kLdB;
};

// Stages the A rows [m0, m0 + 64) x [k0, k0 + 32) and B rows [k0, k0 + 32) x [n0, n0 + 64) with cp.async.
template <typename T>
FF_DEVICE void gemm_load_stage(const GemmParams<T>& p, simt::shared_ptr<T> a_stage, simt::shared_ptr<T> b_stage,
                               int m0, int n0, int k0) {
  using G = GemmTile;
  for (int chunk = int(threadIdx.x); chunk < G::kM * G::kK / 8; chunk += G::kThreads) {
    const int r = chunk / (G::kK / 8), c = chunk % (G::kK / 8) * 8;
    const bool inside = m0 + r < p.m && k0 + c < p.k;
    simt::cp_async_16(a_stage + r * G::kLdA + c, inside ? p.a + int64_t(m0 + r) * p.k + k0 + c : p.a, inside);
  }
  for (int chunk = int(threadIdx.x); chunk < G::kK * G::kN / 8; chunk += G::kThreads) {
    const int r = chunk / (G::kN / 8), c = chunk % (G::kN / 8) * 8;
    const bool inside = k0 + r < p.k && n0 + c < p.n;
    simt::cp_async_16(b_stage + r * G::kLdB + c, inside ? p.b + int64_t(k0 + r) * p.n + n0 + c : p.b, inside);
  }
}

template <typename T, bool kSwapFragments>
__global__ void __launch_bounds__(GemmTile::kThreads) mma_gemm(GemmParams<T> p) {
  using G = GemmTile;
  FF_SHARED(T, a_tiles, 2 * G::kStageA);
  FF_SHARED(T, b_tiles, 2 * G::kStageB);
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int m0 = int(blockIdx.y) * G::kM, n0 = int(blockIdx.x) * G::kN;
  const int warp_m = warp / 2 * 32, warp_n = warp % 2 * 32;
  // ldmatrix row addresses: lane 8 j + i gives row i of matrix j
  const int lane_row = lane % 8 + (lane / 8) % 2 * 8, lane_col = lane / 16 * 8;
  float acc[2][4][4] = {};
  const int steps = (p.k + G::kK - 1) / G::kK;
  gemm_load_stage(p, a_tiles, b_tiles, m0, n0, 0);
  simt::cp_async_commit();
  for (int step = 0; step < steps; ++step) {
    const int stage = step % 2;
    if (step + 1 < steps) {
      gemm_load_stage(p, a_tiles + (1 - stage) * G::kStageA, b_tiles + (1 - stage) * G::kStageB, m0, n0,
                      (step + 1) * G::kK);
    }
    simt::cp_async_commit();
    simt::cp_async_wait<1>();  // this step's group has landed; the next one may still be in flight
    __syncthreads();
    const simt::shared_ptr<T> a_stage = a_tiles + stage * G::kStageA, b_stage = b_tiles + stage * G::kStageB;
    for (int kk = 0; kk < G::kK; kk += 16) {
      uint32_t a[2][4], b[4][2];
      for (int mi = 0; mi < 2; ++mi) {
        simt::ldmatrix<4, false>(a[mi], a_stage + (warp_m + mi * 16 + lane_row) * G::kLdA + kk + lane_col);
        if (kSwapFragments) {
          const uint32_t swap = a[mi][1];
          a[mi][1] = a[mi][2];
          a[mi][2] = swap;
        }
      }
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t r[4];
        simt::ldmatrix<4, true>(r, b_stage + (kk + lane_row) * G::kLdB + warp_n + nj * 16 + lane_col);
        b[2 * nj][0] = r[0];
        b[2 * nj][1] = r[1];
        b[2 * nj + 1][0] = r[2];
        b[2 * nj + 1][1] = r[3];
      }
      for (int mi = 0; mi < 2; ++mi) {
        for (int ni = 0; ni < 4; ++ni) {
          simt::mma_m16n8k16<T>(acc[mi][ni], a[mi], b[ni], acc[mi][ni]);
        }
      }
    }
    __syncthreads();  // the stage is overwritten by the load two steps on
  }
  const int g = lane / 4, t = lane % 4;
  for (int mi = 0; mi < 2; ++mi) {
    for (int ni = 0; ni < 4; ++ni) {
      for (int q = 0; q < 4; ++q) {
        const int row = m0 + warp_m + mi * 16 + g + q / 2 * 8, col = n0 + warp_n + ni * 8 + 2 * t + q % 2;
        if (row < p.m && col < p.n) {
          p.c[int64_t(row) * p.n + col] = acc[mi][ni][q];
        }
      }
    }
  }
}

template <typename T, bool kSwapFragments = false>
auto run_mma_gemm(const GemmParams<T>& p, simt::Stream stream = {}) {
  const simt::Dim3 grid(unsigned((p.n + GemmTile::kN - 1) / GemmTile::kN),
                        unsigned((p.m + GemmTile::kM - 1) / GemmTile::kM));
  return simt::launch("mma_gemm", mma_gemm<T, kSwapFragments>, {grid, simt::Dim3(GemmTile::kThreads), 0, stream}, p);
}

}  // namespace flowformer::simt_samples::FF_SIMT_BUILD
