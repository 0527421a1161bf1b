// A warp's rows of a chunk as float accumulators in registers (RowTile<N>: 16 rows x N columns), and the chunk's
// score matrix seen by a warp on one side of the diagonal (Scores<Lower>): the products that fill them, masks,
// row sums, and the scores times a matrix in shared memory.
#pragma once

#include "chunk/shared_tiles.cuh"

#include <cmath>
#include <type_traits>

namespace flowformer::chunk::FF_SIMT_BUILD {

// A warp's 16 rows x N columns of float accumulators: acc[n tile][element] (rows g, g + 8; cols 2t, 2t + 1).
template <int N>
struct RowTile {
  float acc[N / 8][4];

  FF_DEVICE void zero() {
    FF_UNROLL
    for (int n = 0; n < N / 8; ++n) {
      FF_UNROLL
      for (int e = 0; e < 4; ++e) {
        acc[n][e] = 0.f;
      }
    }
  }

  // += A Y for the k rows k0 .. k0 + 15: a the A fragment of the warp's rows there, Y the columns n0 ..
  // n0 + N - 1 of the k x n (KByN) or n x k matrix y (N an odd number of n8 tiles: k x n only).
  template <bool KByN, typename T, typename YMatrix>
  FF_DEVICE void add_step(const Lane& l, const Fragment<T>& a, const YMatrix& y, int k0, int n0 = 0) {
    FF_UNROLL
    for (int np = 0; np < N / 16; ++np) {
      Fragment<T> b;
      y.template b_fragments<KByN>(b, l, k0, n0 + np * 16);
      mma_pair<T>(acc[2 * np], acc[2 * np + 1], a, b);
    }
    if constexpr (N % 16 == 8) {
      static_assert(KByN, "a lone n8 tile of a k x n matrix");
      Fragment<T> b;
      y.b_fragment(b, l, k0, n0 + N - 8);
      mma_single<T>(acc[N / 8 - 1], a, b);
    }
  }

  // += X Y over K, X the warp's rows of an m x k matrix, Y as in add_step.
  template <typename T, int K, bool KByN, typename XMatrix, typename YMatrix>
  FF_DEVICE void add_product(const Lane& l, const XMatrix& x, const YMatrix& y, int n0 = 0) {
    for (int k0 = 0; k0 < K; k0 += 16) {
      Fragment<T> a;
      x.template a_fragment<true>(a, l, l.warp * 16, k0);
      add_step<KByN>(l, a, y, k0, n0);
    }
  }

  // A power of two that brings the tile within T's range before times() rounds it: 1 for bf16 (float's range);
  // for half 2^(14 - e) once the largest |x| reaches 2^14 (< 2^e).
  template <typename T>
  FF_DEVICE float fit() const {
    if constexpr (std::is_same_v<T, simt::half>) {
      float largest = 0.f;
      FF_UNROLL
      for (int n = 0; n < N / 8; ++n) {
        FF_UNROLL
        for (int e = 0; e < 4; ++e) {
          largest = fmaxf(largest, fabsf(acc[n][e]));
        }
      }
      largest = warp_max(largest);
      if (largest >= 16384.f && largest <= 3.0e38f) {
        int exponent = 0;
        frexpf(largest, &exponent);
        return ldexpf(1.f, 14 - exponent);
      }
    }
    return 1.f;
  }

  // out += scale S Y, S this tile as the scores of the warp's rows against a chunk's keys, over its key tiles np
  // (keys 16 np .. 16 np + 15) where used(np); Y the columns n0 .. n0 + M - 1 of a 64 x m matrix (keys x columns)
  // in shared memory. The scaled scores are rounded to T as A fragments (float: as they are).
  template <typename T, int M, typename YMatrix, typename Used>
  FF_DEVICE void times(const Lane& l, const YMatrix& y, float scale, RowTile<M>& out, int n0, const Used& used) const {
    static_assert(N == kChunkRows, "scores: a chunk's keys");
    FF_UNROLL
    for (int np = 0; np < 4; ++np) {
      if (used(np)) {
        Fragment<T> a;
        FF_UNROLL
        for (int half = 0; half < 2; ++half) {
          const float(&c)[4] = acc[2 * np + half];
          a.set_pair(2 * half, c[0] * scale, c[1] * scale);
          a.set_pair(2 * half + 1, c[2] * scale, c[3] * scale);
        }
        FF_UNROLL
        for (int vp = 0; vp < M / 16; ++vp) {  // whole pairs of n tiles (a lone n8 tile past them is left alone)
          Fragment<T> b;
          y.template b_fragments<true>(b, l, np * 16, n0 + vp * 16);
          mma_pair<T>(out.acc[2 * vp], out.acc[2 * vp + 1], a, b);
        }
      }
    }
  }

  FF_DEVICE void scale(float factor) {
    FF_UNROLL
    for (int n = 0; n < N / 8; ++n) {
      FF_UNROLL
      for (int e = 0; e < 4; ++e) {
        acc[n][e] *= factor;
      }
    }
  }

  // dot[i] = scale <row, y's row> over columns [0, Columns) for the warp's rows g (i = 0) and g + 8 (i = 1), y the
  // chunk's rows in shared memory: a product's rows dotted with another input's, in every lane.
  template <int Columns = N, typename YMatrix>
  FF_DEVICE void row_dots_with(const Lane& l, const YMatrix& y, float scale, float (&dot)[2]) const {
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      dot[i] = 0.f;
      FF_UNROLL
      for (int n = 0; n < Columns / 8; ++n) {
        const auto [y0, y1] = y.get_pair(l.row(2 * i), n * 8 + 2 * l.t);
        dot[i] += acc[n][2 * i] * scale * y0 + acc[n][2 * i + 1] * scale * y1;
      }
      dot[i] += __shfl_xor_sync(0xffffffffu, dot[i], 1);
      dot[i] += __shfl_xor_sync(0xffffffffu, dot[i], 2);
    }
  }

  // The row sums of the warp's rows g (sum[0]) and g + 8 (sum[1]) of columns [0, N), in every lane.
  FF_DEVICE void row_sums(float (&sum)[2]) const {
    FF_UNROLL
    for (int n = 0; n < N / 8; ++n) {
      FF_UNROLL
      for (int e = 0; e < 4; ++e) {
        sum[e / 2] += acc[n][e];
      }
    }
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {  // the four lanes of a row hold its columns 2t, 2t + 1 of each n tile
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 1);
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 2);
    }
  }
};

// The inclusive prefix sums over a warp's 16 rows of a value per row (row g + 8 i at x[i], the same in the 4
// lanes of a row group, as accumulators hold rows): a scan over the row groups by shuffles.
FF_DEVICE void warp_row_prefix(const Lane& l, float (&x)[2]) {
  FF_UNROLL
  for (int offset = 4; offset < 32; offset *= 2) {  // row groups g - 1, g - 2, g - 4
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const float before = __shfl_up_sync(0xffffffffu, x[i], offset);
      if (l.lane >= offset) {
        x[i] += before;
      }
    }
  }
  x[1] += __shfl_sync(0xffffffffu, x[0], 28 + l.t);  // rows 8 .. after rows 0 .. 7 (row group 7)
}

// The inclusive suffix sums over a warp's 16 rows, in the layout of warp_row_prefix: the same scan from the end.
FF_DEVICE void warp_row_suffix(const Lane& l, float (&x)[2]) {
  FF_UNROLL
  for (int offset = 4; offset < 32; offset *= 2) {  // row groups g + 1, g + 2, g + 4
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const float after = __shfl_down_sync(0xffffffffu, x[i], offset);
      if (l.lane + offset < 32) {
        x[i] += after;
      }
    }
  }
  x[0] += __shfl_sync(0xffffffffu, x[1], l.t);  // rows 0 .. 7 before rows 8 .. (row group 0)
}

// The chunk's 64 x 64 score matrix seen by one warp: its rows against the keys of the 16-wide key tiles on
// one side of the diagonal (Lower: keys j <= row, tiles up to the warp's; upper: j >= row, from the warp's).
template <bool Lower>
struct Scores {
  RowTile<kChunkRows> s;

  FF_DEVICE static bool tile_used(int np, int warp) { return Lower ? np <= warp : np >= warp; }
  FF_DEVICE static bool kept(int row, int key) { return Lower ? key <= row : key >= row; }

  // The values x_j of a chunk's keys j (64 floats of shared memory) at this lane's score columns of the used key
  // tiles, x[n][e] = x_j for j = 8 n + 2t + e (0 in the tiles the warp does not use: not read).
  FF_DEVICE static void key_pairs(const Lane& l, simt::shared_ptr<float> values, float (&x)[kChunkRows / 8][2]) {
    FF_UNROLL
    for (int n = 0; n < kChunkRows / 8; ++n) {
      const Two<float> pair =
          tile_used(n / 2, l.warp) ? simt::shared_cast<Two<float>>(values + 8 * n + 2 * l.t)[0] : Two<float>{0.f, 0.f};
      x[n][0] = pair.x0;
      x[n][1] = pair.x1;
    }
  }

  // s += A Y^T for the k columns k0 .. k0 + 15 of the used key tiles: a the A fragment of the warp's rows there,
  // Y (keys) 64 x K in shared memory.
  template <typename T, typename YMatrix>
  FF_DEVICE void add_step(const Lane& l, const Fragment<T>& a, const YMatrix& y, int k0) {
    FF_UNROLL
    for (int np = 0; np < 4; ++np) {
      if (tile_used(np, l.warp)) {
        Fragment<T> b;
        y.template b_fragments<false>(b, l, k0, np * 16);
        mma_pair<T>(s.acc[2 * np], s.acc[2 * np + 1], a, b);
      }
    }
  }

  // s = X Y^T over K for the used key tiles, X (this warp's rows) and Y (keys) both 64 x K in shared memory.
  template <typename T, int K, typename XMatrix, typename YMatrix>
  FF_DEVICE void compute(const Lane& l, const XMatrix& x, const YMatrix& y) {
    s.zero();
    for (int k0 = 0; k0 < K; k0 += 16) {
      Fragment<T> a;
      x.template a_fragment<true>(a, l, l.warp * 16, k0);
      add_step(l, a, y, k0);
    }
  }

  // s[row][key] + add(row, key) on this side of the diagonal, 0 on the other.
  template <typename Add>
  FF_DEVICE void mask(const Lane& l, const Add& add) {
    FF_UNROLL
    for (int n = 0; n < kChunkRows / 8; ++n) {
      FF_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int row = l.row(e), key = n * 8 + l.col(e);
        s.acc[n][e] = kept(row, key) ? s.acc[n][e] + add(row, key) : 0.f;
      }
    }
  }

  // A power of two that brings the scores within T's range before times() rounds them (RowTile::fit).
  template <typename T>
  FF_DEVICE float fit() const {
    return s.template fit<T>();
  }

  // out += scale (masked scores) Y over the used key tiles (RowTile::times).
  template <typename T, int N, typename YMatrix>
  FF_DEVICE void times(const Lane& l, const YMatrix& y, float scale, RowTile<N>& out, int n0 = 0) const {
    s.template times<T>(l, y, scale, out, n0, [&](int np) { return tile_used(np, l.warp); });
  }

  // out[i] = sum over the keys j of s[row][j] x_j for this lane's rows (i = 0: g, 1: g + 8), in every lane of
  // the row group; x[n][e] = x_j for the lane's columns j = 8 n + 2t + e (key_pairs).
  FF_DEVICE void row_dots(const Lane& l, const float (&x)[kChunkRows / 8][2], float (&out)[2]) const {
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      float sum = 0.f;
      FF_UNROLL
      for (int n = 0; n < kChunkRows / 8; ++n) {
        if (tile_used(n / 2, l.warp)) {
          sum += s.acc[n][2 * i] * x[n][0] + s.acc[n][2 * i + 1] * x[n][1];
        }
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      out[i] = sum + __shfl_xor_sync(0xffffffffu, sum, 2);
    }
  }

  // The key columns scaled: column j = 8 n + 2t + e (this lane's) by factor[n][e].
  FF_DEVICE void scale_keys(const float (&factor)[kChunkRows / 8][2]) {
    FF_UNROLL
    for (int n = 0; n < kChunkRows / 8; ++n) {
      FF_UNROLL
      for (int e = 0; e < 4; ++e) {
        s.acc[n][e] *= factor[n][e % 2];
      }
    }
  }
};

}  // namespace flowformer::chunk::FF_SIMT_BUILD
