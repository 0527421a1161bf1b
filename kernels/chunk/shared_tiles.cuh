// Matrices of the chunked kernels in shared memory: SharedMatrix<T, Rows, Width> (rows padded by 8 elements, read
// by ldmatrix without bank conflicts; fragments as operands), ChunkTile<T, W> = a chunk's 64 rows x W columns,
// loaded by cp.async (load_rows), 16 bytes a thread at a time (Piece, ThreadPieces).
#pragma once

#include "chunk/fragments.cuh"

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace flowformer::chunk::FF_SIMT_BUILD {

// 16 bytes of a row, one vector access of shared memory: 8 16-bit elements or 4 floats.
template <typename T>
struct alignas(16) Piece {
  static constexpr int kCount = 16 / int(sizeof(T));
  T x[kCount];

  // Elements 2 j, 2 j + 1 from floats (16-bit: one conversion of the pair).
  FF_DEVICE void set_pair(int j, float x0, float x1) {
    if constexpr (sizeof(T) == 2) {
      const uint32_t two = simt::pack_floats<T>(x0, x1);
      std::memcpy(&x[2 * j], &two, sizeof two);
    } else {
      x[2 * j] = x0;
      x[2 * j + 1] = x1;
    }
  }
};
// Two neighbouring elements of a row, one access.
template <typename T>
struct alignas(2 * sizeof(T)) Two {
  T x0, x1;
};

// A matrix of T in shared memory with rows padded by 8 elements (16-bit: 16 bytes, aligned rows that ldmatrix
// reads without bank conflicts; float: 32 bytes, rows aligned for cp.async).
template <typename T, int Rows, int Width>
struct SharedMatrix {
  static constexpr int kLd = Width + 8, kSize = Rows * kLd;
  static constexpr bool kFloat = std::is_same_v<T, float>;
  simt::shared_ptr<T> data;

  FF_DEVICE simt::shared_ptr<T> at(int r, int c) const { return data + r * kLd + c; }
  FF_DEVICE float get(int r, int c) const {
    const T x = data[r * kLd + c];
    return float(x);
  }
  FF_DEVICE void set(int r, int c, float x) const { data[r * kLd + c] = T(x); }
  // The columns c .. c + Piece<T>::kCount - 1 of row r (c a multiple of the count).
  FF_DEVICE Piece<T> piece(int r, int c) const { return simt::shared_cast<Piece<T>>(at(r, c))[0]; }
  FF_DEVICE void set_piece(int r, int c, const Piece<T>& x) const { simt::shared_cast<Piece<T>>(at(r, c))[0] = x; }
  // The columns c, c + 1 of row r (c even), in one access.
  FF_DEVICE Two<float> get_pair(int r, int c) const {
    const Two<T> x = simt::shared_cast<Two<T>>(at(r, c))[0];
    return {float(x.x0), float(x.x1)};
  }
  FF_DEVICE void set_pair(int r, int c, float x0, float x1) const {
    if constexpr (kFloat) {
      simt::shared_cast<Two<T>>(at(r, c))[0] = Two<T>{x0, x1};
    } else {
      simt::shared_cast<uint32_t>(at(r, c))[0] = simt::pack_floats<T>(x0, x1);
    }
  }

  // Two B fragments (n tiles n0, n0 + 8; k rows k0 .. k0 + 15) of this matrix read as k x n (.trans), or
  // as its transpose (this matrix n x k).
  template <bool KByN>
  FF_DEVICE void b_fragments(Fragment<T>& b, const Lane& l, int k0, int n0) const {
    if constexpr (kFloat) {  // float 4 j + 2 i + e: n tile j (column g), k row 2t + 8 i + e
      FF_UNROLL
      for (int w = 0; w < 8; ++w) {
        const int k = k0 + 2 * l.t + 8 * (w / 2 % 2) + w % 2, n = n0 + 8 * (w / 4) + l.g;
        b.r[w] = KByN ? get(k, n) : get(n, k);
      }
    } else if constexpr (KByN) {
      simt::ldmatrix<4, true>(b.r, at(k0 + l.a_row, n0 + l.a_col));
    } else {
      simt::ldmatrix<4, false>(b.r, at(n0 + l.b_row, k0 + l.b_col));
    }
  }
  // The B fragment of one n tile (columns n0 .. n0 + 7, k rows k0 .. k0 + 15) of this matrix read as k x n.
  FF_DEVICE void b_fragment(Fragment<T>& b, const Lane& l, int k0, int n0) const {
    if constexpr (kFloat) {  // as b_fragments' n tile 0
      FF_UNROLL
      for (int w = 0; w < 4; ++w) {
        b.r[w] = get(k0 + 2 * l.t + 8 * (w / 2) + w % 2, n0 + l.g);
      }
    } else {
      uint32_t r[2];
      simt::ldmatrix<2, true>(r, at(k0 + l.lane % 16, n0));  // lanes 0-15 address the two matrices' rows
      b.r[0] = r[0];
      b.r[1] = r[1];
    }
  }
  // The A fragment of rows m0 .. m0 + 15 and columns k0 .. k0 + 15 (this matrix m x k), or of the transpose
  // (this matrix k x m: rows k0.., columns m0..).
  template <bool MByK>
  FF_DEVICE void a_fragment(Fragment<T>& a, const Lane& l, int m0, int k0) const {
    if constexpr (kFloat) {  // float 2 i + e: row g + 8 (i % 2), column 2t + 8 (i / 2) + e
      FF_UNROLL
      for (int w = 0; w < 8; ++w) {
        const int m = m0 + l.g + 8 * (w / 2 % 2), k = k0 + 2 * l.t + 8 * (w / 4) + w % 2;
        a.r[w] = MByK ? get(m, k) : get(k, m);
      }
    } else if constexpr (MByK) {
      simt::ldmatrix<4, false>(a.r, at(m0 + l.a_row, k0 + l.a_col));
    } else {
      simt::ldmatrix<4, true>(a.r, at(k0 + l.b_row, m0 + l.b_col));
    }
  }
};

template <typename T, int Width>
using ChunkTile = SharedMatrix<T, kChunkRows, Width>;

// The 16-byte pieces of a 64 x Width chunk tile of T dealt to this thread: piece i = threadIdx.x + j kThreads
// for j < kPerThread, all in the column column() (a row has at most kThreads pieces), rows first_row() +
// j kRowStep. A fixed trip count, unrolled by 4 pieces (wider unrolls spill registers at D = 256): no test of
// the thread's share.
template <typename T, int Width>
struct ThreadPieces {
  static constexpr int kCount = Piece<T>::kCount, kPerRow = Width / kCount, kPieces = kChunkRows * kPerRow;
  static constexpr int kPerThread = kPieces / kThreads, kRowStep = kThreads / kPerRow;
  static_assert(kPieces % kThreads == 0 && kThreads % kPerRow == 0, "whole pieces a thread");

  FF_DEVICE static int first_row() { return int(threadIdx.x) / kPerRow; }
  FF_DEVICE static int column() { return int(threadIdx.x) % kPerRow * kCount; }
  // body(row, column) for each of the thread's pieces.
  template <typename Body>
  FF_DEVICE static void each(const Body& body) {
    const int r0 = first_row(), c = column();
    FF_UNROLL_BY(4)
    for (int j = 0; j < kPerThread; ++j) {
      body(r0 + j * kRowStep, c);
    }
  }
};

// cp.async of the rows [first, first + 64) of a (length, Width) run of global rows into `tile`, 16 bytes a
// piece; rows past `length` are zero-filled.
template <typename T, int Width>
FF_DEVICE void load_rows(const ChunkTile<T, Width>& tile, const T* rows, int64_t row_stride, int64_t first,
                         int64_t length) {
  using Pieces = ThreadPieces<T, Width>;
  const T* source = rows + (first + Pieces::first_row()) * row_stride + Pieces::column();
  Pieces::each([&](int r, int c) {
    const bool inside = first + r < length;
    simt::cp_async_16(tile.at(r, c), inside ? source : rows, inside);
    source += Pieces::kRowStep * row_stride;
  });
}

}  // namespace flowformer::chunk::FF_SIMT_BUILD
