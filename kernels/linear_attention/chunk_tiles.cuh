// Tiles of the fused chunked linear-attention kernels (causal_forward.cuh, causal_backward.cuh,
// segment_sums.cuh, state_output.cuh), as types:
// a block of 4 warps walks a sequence in chunks of 64 rows; warp w owns the chunk rows 16 w .. 16 w + 15.
//   ChunkTile<T, W>   64 rows x W columns of T (16-bit, or float) in shared memory, loaded by cp.async
//   RowTile<N>        a warp's 16 rows x N columns of float accumulators (m16n8 tiles)
//   StateTile<T, R, C> an R x C float matrix in registers spread over the warps (16 x 16 units), that adds
//                     x^T y over a chunk and publishes itself as 16-bit parts (half: hi + lo; bf16: hi; float: itself) for
//                     the next products
//   Fragment<T>       an operand of the m16n8k16 layout: 4 registers of 16-bit pairs, or 8 floats
// Products are mma.m16n8k16 with float accumulators, operands by ldmatrix from shared memory; float32 inputs
// multiply as three tf32 products per k8 half (mma_3xtf32), operands by plain loads.
#pragma once

#include "common/portable.h"
#include "linear_attention/fused_kernels.h"
#include "simt/simt.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD {

constexpr int kWarps = kForwardThreads / 32;
static_assert(kChunkRows == 16 * kWarps, "one m16 row tile per warp");

#if defined(__CUDACC__)
inline simt::Stream stream_of(void* stream) { return static_cast<cudaStream_t>(stream); }
#else
inline simt::Stream stream_of(void*) { return {}; }  // emulated launches are synchronous
#endif

// Where one block's sequence lies: batch, first row and length, from cu_seqlens or the batch index.
struct SequenceSpan {
  int64_t batch, first, length;

  FF_DEVICE static SequenceSpan of(const int64_t* cu_seqlens, int n, int64_t L) {
    if (cu_seqlens == nullptr) {
      return {n, 0, L};
    }
    return {0, cu_seqlens[n], cu_seqlens[n + 1] - cu_seqlens[n]};
  }
  // The first row of this sequence in a (B, H, L, .) input with (batch, head, row) strides.
  template <typename T>
  FF_DEVICE const T* rows(const void* x, const int64_t (&stride)[3], int head) const {
    return static_cast<const T*>(x) + batch * stride[0] + head * stride[1] + first * stride[2];
  }
  FF_DEVICE int64_t chunks() const { return (length + kChunkRows - 1) / kChunkRows; }
  // Segment g of `rows` rows (rows = 0: the whole span); past the end it is empty.
  FF_DEVICE SequenceSpan segment(int g, int64_t rows) const {
    if (rows == 0) {
      return *this;
    }
    const int64_t start = g * rows < length ? g * rows : length;
    return {batch, first + start, length - start < rows ? length - start : rows};
  }
};


// Lane addresses of ldmatrix.x4 (lane 8 j + i gives row i of matrix j):
//   a-order: matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15): an A fragment from
//            row-major m x k storage, or with .trans two B fragments (n tiles 0, 1) from k x n storage
//   b-order: matrices (0-7, 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15): two B fragments (n tiles 0, 1)
//            from n x k storage, or with .trans an A fragment from k x m storage
struct Lane {
  int warp, lane, g, t;  // g = lane / 4 (fragment row), t = lane % 4 (fragment column pair)
  int a_row, a_col, b_row, b_col;

  FF_DEVICE static Lane of(int thread) {
    const int lane = thread % 32;
    return {thread / 32, lane, lane / 4, lane % 4, lane % 8 + (lane / 8) % 2 * 8, lane / 16 * 8,
            lane % 8 + lane / 16 * 8, (lane / 8) % 2 * 8};
  }
  FF_DEVICE int row(int e) const { return warp * 16 + g + e / 2 * 8; }  // chunk row of accumulator element e
  FF_DEVICE int col(int e) const { return 2 * t + e % 2; }               // column within its n tile
};

// An operand of the m16n8k16 layout (simt/tensor_core.h): A (16 x 16), or B of two n tiles (register 2 j + i:
// n tile j, k rows 8 i ..). 16-bit T: four registers of element pairs; pair i of the float one is [2 i, 2 i + 1].
template <typename T>
struct Fragment {
  uint32_t r[4];
  FF_DEVICE void set_pair(int i, float x0, float x1) { r[i] = simt::pack_floats<T>(x0, x1); }
};
template <>
struct Fragment<float> {
  float r[8];
  FF_DEVICE void set_pair(int i, float x0, float x1) {
    r[2 * i] = x0;
    r[2 * i + 1] = x1;
  }
};

// d += A B over k16 for one n tile (b: its 4 floats, k rows 2t, 2t + 1, 2t + 8, 2t + 9), as m16n8k8 tf32 products
// over the k halves e (columns 2t + e and 2t + 8 + e of A: a tf32 thread's k slots t and t + 4; the order of k
// within a product does not matter). With x = hi + lo, hi = tf32(x), lo = tf32(x - hi) (22 of float's 24 bits),
// A B = hi hi + hi lo + lo hi, dropping lo lo (below 2^-21 of |A| |B|): about float32's accuracy, never plain tf32.
FF_DEVICE void mma_3xtf32(float (&d)[4], const float (&a)[8], const float* b) {
  const auto split = [](float x, float& hi, float& lo) {
    hi = simt::tf32_round(x);
    lo = simt::tf32_round(x - hi);
  };
  FF_UNROLL
  for (int e = 0; e < 2; ++e) {
    float a_hi[4], a_lo[4], b_hi[2], b_lo[2];
    FF_UNROLL
    for (int i = 0; i < 4; ++i) {
      split(a[2 * i + e], a_hi[i], a_lo[i]);
    }
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      split(b[2 * i + e], b_hi[i], b_lo[i]);
    }
    simt::mma_m16n8k8_tf32(d, a_lo, b_hi, d);  // the small terms first
    simt::mma_m16n8k8_tf32(d, a_hi, b_lo, d);
    simt::mma_m16n8k8_tf32(d, a_hi, b_hi, d);
  }
}

// d += A B for one n tile (b: registers 0, 1; float: 0 .. 3).
template <typename T>
FF_DEVICE void mma_single(float (&d)[4], const Fragment<T>& a, const Fragment<T>& b) {
  if constexpr (std::is_same_v<T, float>) {
    mma_3xtf32(d, a.r, b.r);
  } else {
    const uint32_t b0[2] = {b.r[0], b.r[1]};
    simt::mma_m16n8k16<T>(d, a.r, b0, d);
  }
}

// A B operand of ones: A times it puts A's row sums in every column.
template <typename T>
FF_DEVICE Fragment<T> ones_fragment() {
  Fragment<T> b;
  FF_UNROLL
  for (int i = 0; i < 4; ++i) {
    b.set_pair(i, 1.f, 1.f);
  }
  return b;
}

template <typename T>
FF_DEVICE void mma_pair(float (&d0)[4], float (&d1)[4], const Fragment<T>& a, const Fragment<T>& b) {
  if constexpr (std::is_same_v<T, float>) {
    mma_3xtf32(d0, a.r, b.r);
    mma_3xtf32(d1, a.r, b.r + 4);
  } else {
    const uint32_t b0[2] = {b.r[0], b.r[1]}, b1[2] = {b.r[2], b.r[3]};
    simt::mma_m16n8k16<T>(d0, a.r, b0, d0);
    simt::mma_m16n8k16<T>(d1, a.r, b1, d1);
  }
}

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

// The 16-byte pieces of a 64 x Width chunk tile of T dealt to this thread: piece i = threadIdx.x + j kForwardThreads
// for j < kPerThread, all in the column column() (a row has at most kForwardThreads pieces), rows first_row() +
// j kRowStep. A fixed trip count, unrolled by 4 pieces (wider unrolls spill registers at D = 256): no test of
// the thread's share.
template <typename T, int Width>
struct ThreadPieces {
  static constexpr int kCount = Piece<T>::kCount, kPerRow = Width / kCount, kPieces = kChunkRows * kPerRow;
  static constexpr int kPerThread = kPieces / kForwardThreads, kRowStep = kForwardThreads / kPerRow;
  static_assert(kPieces % kForwardThreads == 0 && kForwardThreads % kPerRow == 0, "whole pieces a thread");

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

// The exponential of the feature maps of T inputs: simt::fast_exp for 16-bit inputs (its 2^-22 relative error is
// far below their rounding), expf for float inputs.
template <typename T>
struct FeatureExp {
  FF_DEVICE float operator()(float x) const {
    if constexpr (std::is_same_v<T, float>) {
      return expf(x);
    } else {
      return simt::fast_exp(x);
    }
  }
};

// feature = phi(raw) for the chunk's rows, phi = F; rows at or past `valid`, and rows r where pad[r] (pad: the
// chunk's padding flags, or null) become 0 (padding contributes nothing). 16 bytes a thread at a time.
template <FeatureMap F, typename T, int Width>
FF_DEVICE void apply_feature_map(const ChunkTile<T, Width>& raw, const ChunkTile<T, Width>& feature, int64_t valid,
                                 const bool* pad) {
  ThreadPieces<T, Width>::each([&](int r, int c) {
    const bool kept = r < valid && (pad == nullptr || !simt::load_global(pad + r));
    const Piece<T> x = raw.piece(r, c);
    Piece<T> y;
    FF_UNROLL
    for (int j = 0; j < Piece<T>::kCount / 2; ++j) {
      const auto phi = [&](int i) {
        const float y = portable::feature<F>(float(x.x[i]), FeatureExp<T>{});  // then a select: no branch
        return kept ? y : 0.f;
      };
      y.set_pair(j, phi(2 * j), phi(2 * j + 1));
    }
    feature.set_piece(r, c, y);
  });
}
// The same with the feature map f chosen at run time (once, outside the loop).
template <typename T, int Width>
FF_DEVICE void apply_feature_map(FeatureMap f, const ChunkTile<T, Width>& raw, const ChunkTile<T, Width>& feature,
                                 int64_t valid, const bool* pad = nullptr) {
  portable::with_feature_map(f, [&](auto map) { apply_feature_map<decltype(map)::value>(raw, feature, valid, pad); });
}

// Rows r of `tile` where pad[r] (the chunk's padding flags) become 0, for rows before `valid`: padded values
// count for nothing whatever they hold (NaN times a zero feature would not).
template <typename T, int Width>
FF_DEVICE void zero_padded_rows(const ChunkTile<T, Width>& tile, const bool* pad, int64_t valid) {
  Piece<T> zero;
  FF_UNROLL
  for (int j = 0; j < Piece<T>::kCount / 2; ++j) {
    zero.set_pair(j, 0.f, 0.f);
  }
  ThreadPieces<T, Width>::each([&](int r, int c) {
    if (r < valid && simt::load_global(pad + r)) {
      tile.set_piece(r, c, zero);
    }
  });
}

// e with 2^e at or above the largest |x[r][c]| scale(r) over the chunk, or 0 (all zero): the exponent of the
// power of two that brings the rows x_r scale(r) within [-1, 1] for 16-bit products. Block-wide: a barrier;
// largest_s: kWarps floats of shared memory.
template <typename T, int Width, typename Scale>
FF_DEVICE int chunk_exponent(const ChunkTile<T, Width>& x, const Scale& scale, simt::shared_ptr<float> largest_s) {
  static_assert(kForwardThreads == 2 * kChunkRows, "two threads a row");
  const int r = int(threadIdx.x) / 2, part = int(threadIdx.x) % 2;  // warp w: rows 16 w .. 16 w + 15
  constexpr int kCount = Piece<T>::kCount;
  static_assert(Width / 2 % kCount == 0, "half a row in pieces");
  float largest = 0.f;
  for (int c = part * (Width / 2); c < (part + 1) * (Width / 2); c += kCount) {
    const Piece<T> p = x.piece(r, c);
    FF_UNROLL
    for (int j = 0; j < kCount; ++j) {
      largest = fmaxf(largest, fabsf(float(p.x[j])));
    }
  }
  largest *= scale(r);
  FF_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) {
    largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
  }
  if (threadIdx.x % 32 == 0) {
    largest_s[threadIdx.x / 32] = largest;
  }
  __syncthreads();
  FF_UNROLL
  for (int w = 0; w < kWarps; ++w) {
    const float m = largest_s[w];
    largest = fmaxf(largest, m);
  }
  int exponent = 0;
  frexpf(largest, &exponent);
  return exponent;
}

// x_r scale(r) 2^-e in place, e = chunk_exponent(x, scale): rows within [-1, 1] for 16-bit products (no overflow,
// no row's share lost to underflow). Returns e. Block-wide: ends with a barrier.
template <typename T, int Width, typename Scale>
FF_DEVICE int scale_rows_into_unit(const ChunkTile<T, Width>& x, const Scale& scale,
                                   simt::shared_ptr<float> largest_s) {
  const int e = chunk_exponent(x, scale, largest_s);  // its barrier: every read of x done
  const float down = ldexpf(1.f, -e);                 // a power of two: exact products
  ThreadPieces<T, Width>::each([&](int r, int c) {
    const float s = scale(r) * down;
    const Piece<T> p = x.piece(r, c);
    Piece<T> scaled;
    FF_UNROLL
    for (int j = 0; j < Piece<T>::kCount / 2; ++j) {
      scaled.set_pair(j, float(p.x[2 * j]) * s, float(p.x[2 * j + 1]) * s);
    }
    x.set_piece(r, c, scaled);
  });
  __syncthreads();
  return e;
}

// The gradient of a raw input x from that of its feature phi(x): grad phi'(x).
template <FeatureMap F, typename T>
FF_DEVICE float feature_gradient(float grad, float x) {
  return grad * portable::feature_derivative<F>(x, portable::feature<F>(x, FeatureExp<T>{}));
}

// Walks `chunks` chunks in order (or reversed): load(c, stage) issues the cp.async of chunk c into a stage,
// body(c, stage) runs once its tiles landed and are visible, while the next chunk's load. body ends with a
// barrier after its last read of the stage.
template <typename Load, typename Body>
FF_DEVICE void walk_chunks(int64_t chunks, bool reverse, const Load& load, const Body& body) {
  const auto chunk = [&](int64_t i) { return reverse ? chunks - 1 - i : i; };
  if (chunks > 0) {
    load(chunk(0), 0);
    simt::cp_async_commit();
  }
  for (int64_t i = 0; i < chunks; ++i) {
    const int stage = int(i % 2);
    if (i + 1 < chunks) {
      load(chunk(i + 1), 1 - stage);  // that stage's last readers passed the barrier that ended chunk i - 1
    }
    simt::cp_async_commit();
    simt::cp_async_wait<1>();
    __syncthreads();
    body(chunk(i), stage);
  }
}

// Writes the columns [0, N) of the warp's rows of a chunk as T pairs (16-bit or float): row r (r < left) at
// rows + r row_stride, element e of n tile n = value(n, e).
template <typename T, int N, typename Value>
FF_DEVICE void store_rows(const Lane& l, T* rows, int64_t row_stride, int64_t left, const Value& value) {
  FF_UNROLL
  for (int i = 0; i < 2; ++i) {
    const int row = l.row(2 * i);
    if (row < left) {
      T* r = rows + row * row_stride;
      FF_UNROLL
      for (int n = 0; n < N / 8; ++n) {
        T* at = r + n * 8 + 2 * l.t;
        if constexpr (std::is_same_v<T, float>) {
          simt::store_global(at, value(n, 2 * i));
          simt::store_global(at + 1, value(n, 2 * i + 1));
        } else {
          simt::store_global(reinterpret_cast<uint32_t*>(at), simt::pack_floats<T>(value(n, 2 * i), value(n, 2 * i + 1)));
        }
      }
    }
  }
}

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

  FF_DEVICE void scale(float factor) {
    FF_UNROLL
    for (int n = 0; n < N / 8; ++n) {
      FF_UNROLL
      for (int e = 0; e < 4; ++e) {
        acc[n][e] *= factor;
      }
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

// The chunk's 64 x 64 score matrix seen by one warp: its rows against the keys of the 16-wide key tiles on
// one side of the diagonal (Lower: keys j <= row, tiles up to the warp's; upper: j >= row, from the warp's).
template <bool Lower>
struct Scores {
  RowTile<kChunkRows> s;

  FF_DEVICE static bool tile_used(int np, int warp) { return Lower ? np <= warp : np >= warp; }
  FF_DEVICE static bool kept(int row, int key) { return Lower ? key <= row : key >= row; }

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

  // A power of two that brings the warp's scores within T's range before times() rounds them: 1 for bf16
  // (float's range); for half 2^(14 - e) once the largest |s| reaches 2^14 (< 2^e).
  template <typename T>
  FF_DEVICE float fit() const {
    if constexpr (std::is_same_v<T, simt::half>) {
      float largest = 0.f;
      FF_UNROLL
      for (int n = 0; n < kChunkRows / 8; ++n) {
        FF_UNROLL
        for (int e = 0; e < 4; ++e) {
          largest = fmaxf(largest, fabsf(s.acc[n][e]));
        }
      }
      FF_UNROLL
      for (int offset = 16; offset > 0; offset /= 2) {
        largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
      }
      if (largest >= 16384.f && largest <= 3.0e38f) {
        int exponent = 0;
        frexpf(largest, &exponent);
        return ldexpf(1.f, 14 - exponent);
      }
    }
    return 1.f;
  }

  // out += scale (masked scores) Y, Y the columns n0 .. n0 + N - 1 of a 64 x n matrix (keys x columns) in
  // shared memory; the scaled scores are rounded to T as A fragments (float: as they are).
  template <typename T, int N, typename YMatrix>
  FF_DEVICE void times(const Lane& l, const YMatrix& y, float scale, RowTile<N>& out, int n0 = 0) const {
    FF_UNROLL
    for (int np = 0; np < 4; ++np) {
      if (tile_used(np, l.warp)) {
        Fragment<T> a;
        FF_UNROLL
        for (int half = 0; half < 2; ++half) {
          const float(&c)[4] = s.acc[2 * np + half];
          a.set_pair(2 * half, c[0] * scale, c[1] * scale);
          a.set_pair(2 * half + 1, c[2] * scale, c[3] * scale);
        }
        FF_UNROLL
        for (int vp = 0; vp < N / 16; ++vp) {
          Fragment<T> b;
          y.template b_fragments<true>(b, l, np * 16, n0 + vp * 16);
          mma_pair<T>(out.acc[2 * vp], out.acc[2 * vp + 1], a, b);
        }
      }
    }
  }
};

// An R x C float matrix in registers: its 16 x 16 units dealt to the warps in turn, two m16n8 accumulators
// a unit. It adds x^T y over a chunk (x 64 x R, y 64 x C in shared memory) and publishes itself as
// hi + lo = M 2^-e, 16-bit parts in shared memory, for products with it (half: e > 0 only once |M| reaches
// 2^14, so that the parts cannot overflow). bf16 inputs publish hi = bf16(M) alone (e = 0): its 2^-9 relative
// rounding of each element is below the bf16 outputs' own and far within their tolerance (2e-2 norm-wise), and a
// second part would double the ldmatrix traffic of every product with the state; half's tolerance (5e-3) keeps
// both. Float inputs: hi = M itself, lo unused.
// With Vector it also carries the vector z = x^T 1 (the sum of x's rows) as an (R x 8) column of equal
// columns, on the tensor cores: the unit of each row of units whose column is that row's number modulo C / 16
// adds x^T times ones beside its own product (with C / 16 = 4 warps, one unit in four consecutive slots of a
// warp: a quarter of the registers), and publishes z into the parts' 8 padding columns, so that a product with
// the parts of C + 8 columns gives X z as well.
template <typename T, int R, int C, bool Vector = false>
struct StateTile {
  static constexpr int kUnits = (R / 16) * (C / 16);
  static constexpr int kUnitsPerWarp = (kUnits + kWarps - 1) / kWarps;
  static constexpr bool kScaled = std::is_same_v<T, simt::half>;
  static constexpr bool kTwoParts = kScaled;  // half: hi + lo
  static constexpr bool kTwoByteElements = !std::is_same_v<T, float>;
  static constexpr int kColumns = C;
  static constexpr int kWidth = C + (Vector ? 8 : 0);  // of the parts' products: the vector in the padding
  // A warp's units share their columns (C / 16 divides kWarps).
  static constexpr bool kFixedColumns = kWarps % (C / 16) == 0;
  static_assert(R % 16 == 0 && C % 16 == 0, "units of 16 x 16");

  static constexpr bool kVectorEveryWarp = C / 16 == kWarps;  // slot i carries it in warp i % kWarps only
  static constexpr int kVectorSlots = kVectorEveryWarp ? (kUnitsPerWarp + kWarps - 1) / kWarps : kUnitsPerWarp;

  float acc[kUnitsPerWarp][2][4];
  float vec[Vector ? kVectorSlots : 1][4];  // the vector's rows of the unit in slot i, at vector_slot(i)
  int exponent;

  FF_DEVICE static int unit(const Lane& l, int i) { return l.warp + i * kWarps; }
  FF_DEVICE static bool carries_vector(int u) {
    return Vector && u < kUnits && u % (C / 16) == u / (C / 16) % (C / 16);
  }
  FF_DEVICE static constexpr int vector_slot(int i) { return kVectorEveryWarp ? i / kWarps : i; }
  FF_DEVICE static int row(const Lane& l, int u, int e) { return u / (C / 16) * 16 + l.g + e / 2 * 8; }
  FF_DEVICE static int col(const Lane& l, int u, int half, int e) {
    return u % (C / 16) * 16 + half * 8 + l.col(e);
  }
  FF_DEVICE float scale() const { return kScaled ? ldexpf(1.f, -exponent) : 1.f; }    // of the 16-bit parts
  FF_DEVICE float unscale() const { return kScaled ? ldexpf(1.f, exponent) : 1.f; }

  // fn(&element, row, col) for every Step-th of this thread's elements of the matrix (Step 2: the pairs of
  // columns 2t, 2t + 1, at element[0], element[1]).
  template <int Step, typename Fn>
  FF_DEVICE void for_elements(const Lane& l, const Fn& fn) {
    FF_UNROLL
    for (int i = 0; i < kUnitsPerWarp; ++i) {
      const int u = unit(l, i);
      FF_UNROLL
      for (int half = 0; half < 2; ++half) {
        FF_UNROLL
        for (int e = 0; e < 4; e += Step) {
          if (u < kUnits) {
            fn(&acc[i][half][e], row(l, u, e), col(l, u, half, e));
          }
        }
      }
    }
  }
  // fn(&element, row, e) for every Step-th of this thread's elements of the vector's columns (element e: column
  // 2t + e % 2).
  template <int Step, typename Fn>
  FF_DEVICE void for_vector_elements(const Lane& l, const Fn& fn) {
    if constexpr (Vector) {
      FF_UNROLL
      for (int i = 0; i < kUnitsPerWarp; ++i) {
        FF_UNROLL
        for (int e = 0; e < 4; e += Step) {
          if (carries_vector(unit(l, i))) {
            fn(&vec[vector_slot(i)][e], row(l, unit(l, i), e), e);
          }
        }
      }
    }
  }
  // fn(element, row, col) for each of this thread's elements of the matrix.
  template <typename Fn>
  FF_DEVICE void for_each(const Lane& l, const Fn& fn) {
    for_elements<1>(l, [&](float* x, int r, int c) { fn(*x, r, c); });
  }
  // fn(element, row, e) for each of this thread's elements of the vector's columns.
  template <typename Fn>
  FF_DEVICE void for_each_of_vector(const Lane& l, const Fn& fn) {
    for_vector_elements<1>(l, [&](float* x, int r, int e) { fn(*x, r, e); });
  }
  template <typename Fn>
  FF_DEVICE void for_all(const Lane& l, const Fn& fn) {
    for_each(l, [&](float& x, int, int) { fn(x); });
    for_each_of_vector(l, [&](float& x, int, int) { fn(x); });
  }

  // From global memory (rows of `stride` floats; the vector from vector_src), or zeros where null.
  FF_DEVICE void load(const Lane& l, const float* src, int64_t stride, const float* vector_src = nullptr) {
    exponent = 0;
    FF_UNROLL
    for (int i = 0; i < kUnitsPerWarp; ++i) {
      FF_UNROLL
      for (int e = 0; e < 4; ++e) {
        acc[i][0][e] = 0.f;
        acc[i][1][e] = 0.f;
        vec[Vector ? vector_slot(i) : 0][e] = 0.f;
      }
    }
    if (src != nullptr) {
      for_each(l, [&](float& x, int r, int c) { x = simt::load_global(src + r * stride + c); });
    }
    if (vector_src != nullptr) {
      for_each_of_vector(l, [&](float& x, int r, int) { x = simt::load_global(vector_src + r); });
    }
  }
  FF_DEVICE void store(const Lane& l, float* dst, int64_t stride) {
    for_each(l, [&](float& x, int r, int c) { simt::store_global(dst + r * stride + c, x); });
  }
  // The vector (its column 0) to R floats of global or shared memory.
  template <typename Pointer>
  FF_DEVICE void store_vector(const Lane& l, const Pointer& dst) {
    for_each_of_vector(l, [&](float& x, int r, int e) {
      if (l.t == 0 && e % 2 == 0) {
        if constexpr (std::is_pointer_v<Pointer>) {
          simt::store_global(dst + r, x);
        } else {
          dst[r] = x;
        }
      }
    });
  }

  // += x^T y over the chunk's 64 rows (rows past a sequence are zero in x); the vector += x^T 1. 16-bit inputs
  // whose units share their columns (kFixedColumns) load one B fragment a k step for all of them; float inputs
  // walk a unit at a time (fewer live registers: no spills).
  template <typename XMatrix, typename YMatrix>
  FF_DEVICE void add_product(const Lane& l, const XMatrix& x, const YMatrix& y) {
    [[maybe_unused]] const Fragment<T> ones = ones_fragment<T>();
    const auto unit_step = [&](int i, int k0, const Fragment<T>& b) {
      const int u = unit(l, i);
      Fragment<T> a;
      x.template a_fragment<false>(a, l, u / (C / 16) * 16, k0);
      mma_pair<T>(acc[i][0], acc[i][1], a, b);
      if constexpr (Vector) {
        if (carries_vector(u)) {
          mma_single<T>(vec[vector_slot(i)], a, ones);
        }
      }
    };
    if constexpr (kFixedColumns && kTwoByteElements) {
      for (int k0 = 0; k0 < kChunkRows; k0 += 16) {
        Fragment<T> b;
        y.template b_fragments<true>(b, l, k0, unit(l, 0) % (C / 16) * 16);
        FF_UNROLL
        for (int i = 0; i < kUnitsPerWarp; ++i) {
          if (unit(l, i) < kUnits) {
            unit_step(i, k0, b);
          }
        }
      }
    } else {
      FF_UNROLL
      for (int i = 0; i < kUnitsPerWarp; ++i) {
        if (unit(l, i) < kUnits) {
          for (int k0 = 0; k0 < kChunkRows; k0 += 16) {
            Fragment<T> b;
            y.template b_fragments<true>(b, l, k0, unit(l, i) % (C / 16) * 16);
            unit_step(i, k0, b);
          }
        }
      }
    }
  }

  // += 2^e x^T y, x scaled into [-1, 1] by 2^-e (scale_rows_into_unit): the accumulators stay in their units.
  template <typename XMatrix, typename YMatrix>
  FF_DEVICE void add_scaled_product(const Lane& l, const XMatrix& x, const YMatrix& y, int e) {
    const float down = ldexpf(1.f, -e), up = ldexpf(1.f, e);  // powers of two: exact products
    for_all(l, [&](float& a) { a *= down; });
    add_product(l, x, y);
    for_all(l, [&](float& a) { a *= up; });
  }

  // hi + lo = this 2^-e (float: hi = this), a pair of columns a store; with Vector, the vector's 2^-e into the
  // padding columns C .. C + 7. largest_s: kWarps floats of shared memory. Half: a block barrier.
  FF_DEVICE void publish(const Lane& l, const SharedMatrix<T, R, C>& hi, const SharedMatrix<T, R, C>& lo,
                         simt::shared_ptr<float> largest_s) {
    if constexpr (kScaled) {
      float largest = 0;
      for_all(l, [&](float& x) { largest = fmaxf(largest, fabsf(x)); });
      FF_UNROLL
      for (int offset = 16; offset > 0; offset /= 2) {
        largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
      }
      if (l.lane == 0) {
        largest_s[l.warp] = largest;
      }
      __syncthreads();
      FF_UNROLL
      for (int w = 0; w < kWarps; ++w) {
        const float m = largest_s[w];
        largest = fmaxf(largest, m);
      }
      exponent = 0;
      if (largest >= 16384.f && largest <= 3.0e38f) {  // then |M 2^-e| < 2^14
        frexpf(largest, &exponent);
        exponent -= 14;
      }
    }
    const float s = scale();
    const auto put = [&](int r, int c, float x0, float x1) {
      x0 *= s;
      x1 *= s;
      if constexpr (kTwoParts) {
        const float h0 = float(T(x0)), h1 = float(T(x1));
        hi.set_pair(r, c, h0, h1);
        lo.set_pair(r, c, x0 - h0, x1 - h1);
      } else {
        hi.set_pair(r, c, x0, x1);
      }
    };
    for_elements<2>(l, [&](float* x, int r, int c) { put(r, c, x[0], x[1]); });
    for_vector_elements<2>(l, [&](float* x, int r, int) { put(r, C + 2 * l.t, x[0], x[1]); });
  }

  // out += A (hi + lo) for the k rows k0 .. k0 + 15 (a: the A fragment of the warp's rows there): the columns
  // n0 .. n0 + N - 1 of X M 2^-e (KByN; N up to C + 8 with Vector: X z in the columns C ..) or X M^T 2^-e.
  template <bool KByN, int N>
  FF_DEVICE static void rows_step(const Lane& l, const Fragment<T>& a, const SharedMatrix<T, R, C>& hi,
                                  const SharedMatrix<T, R, C>& lo, RowTile<N>& out, int k0, int n0 = 0) {
    static_assert(N <= (KByN ? kWidth : R), "the product's width");
    out.template add_step<KByN>(l, a, hi, k0, n0);
    if constexpr (kTwoParts) {
      out.template add_step<KByN>(l, a, lo, k0, n0);
    }
  }

  // out += the columns n0 .. n0 + N - 1 of X M (KByN: X 64 x R) or X M^T (X 64 x C), X the warp's rows,
  // with M 2^-e = hi + lo: out holds sums scaled by 2^-e; the caller multiplies by unscale() when done.
  template <bool KByN, typename XMatrix, int N>
  FF_DEVICE static void rows_times(const Lane& l, const XMatrix& x, const SharedMatrix<T, R, C>& hi,
                                   const SharedMatrix<T, R, C>& lo, RowTile<N>& out, int n0 = 0) {
    for (int k0 = 0; k0 < (KByN ? R : C); k0 += 16) {
      Fragment<T> a;
      x.template a_fragment<true>(a, l, l.warp * 16, k0);
      rows_step<KByN>(l, a, hi, lo, out, k0, n0);
    }
  }
};

// The two products of a causal chunk's query rows (this warp's): the scores G = q k^T (keys up to the diagonal)
// and out += q (hi + lo), the state's parts (StateTile::rows_times). 16-bit inputs load each A fragment of q
// once for both; float inputs make them one after the other (fewer live registers: no spills).
template <typename State, typename T, int D, int N>
FF_DEVICE void scores_and_state_rows(const Lane& l, const ChunkTile<T, D>& q, const ChunkTile<T, D>& k,
                                     const SharedMatrix<T, D, State::kColumns>& hi,
                                     const SharedMatrix<T, D, State::kColumns>& lo, Scores<true>& G, RowTile<N>& out) {
  if constexpr (std::is_same_v<T, float>) {
    G.template compute<T, D>(l, q, k);
    State::template rows_times<true>(l, q, hi, lo, out);
  } else {
    G.s.zero();
    for (int k0 = 0; k0 < D; k0 += 16) {
      Fragment<T> a;
      q.template a_fragment<true>(a, l, l.warp * 16, k0);
      G.add_step(l, a, k, k0);
      State::template rows_step<true>(l, a, hi, lo, out, k0);
    }
  }
}

// sum[c] += sum over the chunk's rows r of w(r) x[r][c], one thread a column, rows in order.
template <typename T, int Width, typename Weight>
FF_DEVICE void add_column_sums(const ChunkTile<T, Width>& x, const Weight& w, simt::shared_ptr<float> sum) {
  for (int c = int(threadIdx.x); c < Width; c += kForwardThreads) {
    float s = 0;
    for (int r = 0; r < kChunkRows; ++r) {
      s += w(r) * x.get(r, c);
    }
    const float before = sum[c];
    sum[c] = before + s;
  }
}

// A chunk's share of the gradients of the state S and of its vector z (the reverse-order state of a backward),
// from its query rows: q their features (overwritten), dout their output gradients, 1 / den_t and dden_t in
// inv_den_s, dden_s (0 for rows past the sequence):
//   dS += sum_t q_t dout_t^T / den_t   (mma of q_t / den_t scaled into [-1, 1], scale_rows_into_unit)
//   dz += sum_t dden_t q_t             (float, one thread a column)
// Block-wide: after a barrier that published inv_den_s, dden_s; q and dout are read until the next barrier.
template <typename T, int D, int M>
FF_DEVICE void add_query_gradient_sums(const Lane& l, const ChunkTile<T, D>& q, const ChunkTile<T, M>& dout,
                                       simt::shared_ptr<float> inv_den_s, simt::shared_ptr<float> dden_s,
                                       simt::shared_ptr<float> largest_s, StateTile<T, D, M>& dS,
                                       simt::shared_ptr<float> dz_s) {
  add_column_sums(q, [&](int r) { return float(dden_s[r]); }, dz_s);
  const int e = scale_rows_into_unit(q, [&](int r) { return float(inv_den_s[r]); }, largest_s);
  dS.add_scaled_product(l, q, dout, e);
}

// dots[r] = <x_r, v> for the chunk's rows, two threads a row (v: Width floats of shared memory).
template <typename T, int Width>
FF_DEVICE void row_dots(const ChunkTile<T, Width>& x, simt::shared_ptr<float> v, simt::shared_ptr<float> dots) {
  static_assert(kForwardThreads == 2 * kChunkRows, "two threads a row");
  const int r = int(threadIdx.x) / 2, part = int(threadIdx.x) % 2;
  float sum = 0;
  for (int c = part * (Width / 2); c < (part + 1) * (Width / 2); ++c) {
    const float vc = v[c];
    sum += x.get(r, c) * vc;
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  if (part == 0) {
    dots[r] = sum;
  }
}

// Where a block of a forward-like grid (x: N G units of M / BM value tiles, y: H heads) works: unit n G + g is
// segment g of sequence n; the block takes the value columns value_col .. value_col + BM - 1 of one head.
struct BlockPlace {
  int unit, sequence, head, value_col;
  SequenceSpan span;

  template <int BM>
  FF_DEVICE static BlockPlace of(const Inputs& p, const Segments& s) {
    const int tiles_per_head = p.M / BM;
    const int unit = int(blockIdx.x) / tiles_per_head, n = unit / s.segments;
    return {unit, n, int(blockIdx.y), int(blockIdx.x) % tiles_per_head * BM,
            SequenceSpan::of(p.cu_seqlens, n, p.L).segment(unit % s.segments, s.segment_rows)};
  }
  // Offset of the (index, head) state in (., H, D, M) states.
  FF_DEVICE int64_t state_at(const Inputs& p, int index) const { return (int64_t(index) * p.H + head) * p.D * p.M; }
  // Offset of the span's first row in (B, H, L, ...) row arrays, in rows.
  FF_DEVICE int64_t rows_at(const Inputs& p) const { return (span.batch * p.H + head) * p.L + span.first; }
  // The block's first output row of a (B, H, L, M) contiguous output, at its value columns.
  template <typename T>
  FF_DEVICE T* output_rows(const Inputs& p, void* out) const {
    return static_cast<T*>(out) + ((span.batch * p.H + head) * p.L + span.first) * p.M + value_col;
  }
};

// Launches a forward-like grid (BlockPlace) of the kernel that kernel_of(T{}, std::integral_constant<int, BM>{})
// returns with its dynamic shared bytes, {kernel, bytes}, for the inputs' type T (bf16, half; float for
// D <= kMaxFloatD) and the value tile BM of head dim D (value_tile, or backward_value_tile for a Backward pass).
// `name` names the kernel, `op` the op in the errors.
template <int D, bool Backward = false, typename Params, typename KernelOf>
void launch_forward_like(const Params& p, const char* name, const char* op, void* stream, const KernelOf& kernel_of) {
  constexpr auto tile_of = [](int M, std::size_t bytes) {
    return Backward ? backward_value_tile(D, M, bytes) : value_tile(D, M, bytes);
  };
  const auto with_tile = [&](auto type, auto tile) {
    const int64_t blocks = int64_t(p.N) * p.segments * (p.M / decltype(tile)::value);
    if (blocks > 0x7fffffff || p.H > 65535) {
      throw std::length_error(std::string("flowformer::") + op + ": " + std::to_string(p.N) + " sequences x " +
                              std::to_string(p.H) + " heads exceed one CUDA launch");
    }
    if (blocks > 0 && p.H > 0) {
      const auto [kernel, shared_bytes] = kernel_of(type, tile);
      simt::launch(name, kernel,
                   {simt::Dim3(unsigned(blocks), unsigned(p.H)), simt::Dim3(kForwardThreads), shared_bytes,
                    stream_of(stream)},
                   p);
    }
  };
  const auto with_type = [&](auto type) {
    constexpr std::size_t bytes = sizeof(decltype(type));
    switch (tile_of(p.M, bytes)) {
      case 16:
        return with_tile(type, std::integral_constant<int, 16>{});
      case 32:
        if constexpr (tile_of(256, bytes) >= 32) {
          return with_tile(type, std::integral_constant<int, 32>{});
        }
        break;
      default:
        if constexpr (tile_of(256, bytes) == 64) {
          return with_tile(type, std::integral_constant<int, 64>{});
        }
    }
    throw std::invalid_argument(std::string("flowformer: no fused ") + name + " kernel for D = " + std::to_string(D) +
                                ", M = " + std::to_string(p.M));
  };
  switch (p.element) {
    case Element::half:
      return with_type(simt::half{});
    case Element::bf16:
      return with_type(simt::bf16{});
    case Element::float32:
      if constexpr (D <= kMaxFloatD) {
        return with_type(float{});
      }
  }
  throw std::invalid_argument(std::string("flowformer: no fused ") + name + " kernel for these inputs' dtype");
}

// A pass of a backward over its forward-like grid (value tiles of backward_value_tile): D up to MaxD.
template <int D, int MaxD, typename Params, typename KernelOf>
void launch_backward_pass(const Params& p, const char* name, const char* op, void* stream, const KernelOf& kernel_of) {
  if constexpr (D <= MaxD) {
    return launch_forward_like<D, /*Backward=*/true>(p, name, op, stream, kernel_of);
  }
  throw std::invalid_argument(std::string("flowformer: no fused ") + name + " kernel for D = " + std::to_string(D));
}

// The rows B H L of the (B, H, L, ...) inputs (B = 1 for packed sequences).
FF_DEVICE int64_t input_rows(const Inputs& p) { return int64_t(p.cu_seqlens != nullptr ? 1 : p.N) * p.H * p.L; }

// Where a backward block writes its gradients: the rows of its span (from rows_at in (B, H, L, ...) row arrays)
// of its value tile (value_col, of BM columns).
struct GradientRows {
  int64_t rows_at;
  int value_col, tile;  // tile: value_col / BM

  // Columns n0 .. n0 + N - 1 of the warp's rows of chunk c of dq or dk ((B, H, L, D), `grad`): in T, or as
  // floats to the block's tile's share (parts: Gradients::dq_parts or dk_parts, value tiles).
  template <typename T, int D, int N, typename Value>
  FF_DEVICE void store_d(const Lane& l, const Inputs& p, void* grad, float* parts, int64_t c, int n0,
                         int64_t left, const Value& value) const {
    const int64_t first = (rows_at + c * kChunkRows) * D + n0;
    if (parts != nullptr) {
      store_rows<float, N>(l, parts + tile * input_rows(p) * D + first, D, left, value);
    } else {
      store_rows<T, N>(l, static_cast<T*>(grad) + first, D, left, value);
    }
  }
  // store_d of the gradients of raw inputs: value(n, e, through) returns through(g, x) = g phi'(x) from the
  // gradient g of the feature phi(x) of the raw input x there (or a value of its own), phi = p.feature_map chosen
  // once, outside the loop.
  template <typename T, int D, int N, typename Value>
  FF_DEVICE void store_d_through_feature(const Lane& l, const Inputs& p, void* grad, float* parts, int64_t c, int n0,
                                         int64_t left, const Value& value) const {
    portable::with_feature_map(p.feature_map, [&](auto map) {
      const auto through = [](float g, float x) { return feature_gradient<decltype(map)::value, T>(g, x); };
      store_d<T, D, N>(l, p, grad, parts, c, n0, left, [&](int n, int e) { return value(n, e, through); });
    });
  }
  // The block's BM columns of the warp's rows of chunk c of dv ((B, H, L, M)).
  template <typename T, int BM, typename Value>
  FF_DEVICE void store_v(const Lane& l, const Inputs& p, void* dv, int64_t c, int64_t left,
                         const Value& value) const {
    store_rows<T, BM>(l, static_cast<T*>(dv) + (rows_at + c * kChunkRows) * p.M + value_col, p.M, left, value);
  }
};

}  // namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD
