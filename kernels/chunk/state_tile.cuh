// A state carried from chunk to chunk in registers (StateTile<T, R, C, Vector>): an R x C float matrix (and with
// Vector its vector x^T 1) spread over the warps, that adds x^T y over a chunk on the tensor cores and publishes
// itself as 16-bit parts in shared memory for the next chunk's products.
#pragma once

#include "chunk/row_tile.cuh"

#include <cmath>
#include <type_traits>

namespace flowformer::chunk::FF_SIMT_BUILD {

// StateTile::add_product's default: y's rows as they are.
struct KeepRows {
  template <typename Fragment>
  FF_DEVICE void operator()(Fragment&, int) const {}
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
  // walk a unit at a time (fewer live registers: no spills). scale_y(b, k0) may scale the rows of each B
  // fragment of y once loaded, scale_x(a, k0) the k columns of each A fragment of x^T (k rows k0 ..: x^T (w y) or
  // (w x)^T y for row weights w).
  template <typename XMatrix, typename YMatrix, typename ScaleY = KeepRows, typename ScaleX = KeepRows>
  FF_DEVICE void add_product(const Lane& l, const XMatrix& x, const YMatrix& y, const ScaleY& scale_y = {},
                             const ScaleX& scale_x = {}) {
    [[maybe_unused]] const Fragment<T> ones = ones_fragment<T>();
    const auto unit_step = [&](int i, int k0, const Fragment<T>& b) {
      const int u = unit(l, i);
      Fragment<T> a;
      x.template a_fragment<false>(a, l, u / (C / 16) * 16, k0);
      scale_x(a, k0);
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
        scale_y(b, k0);
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
            scale_y(b, k0);
            unit_step(i, k0, b);
          }
        }
      }
    }
  }

  // += 2^e x^T y, x (or its rows or y's as they are scaled by scale_x or scale_y, as in add_product) scaled into
  // [-1, 1] by 2^-e (scale_rows_into_unit): the accumulators stay in their units.
  template <typename XMatrix, typename YMatrix, typename ScaleY = KeepRows, typename ScaleX = KeepRows>
  FF_DEVICE void add_scaled_product(const Lane& l, const XMatrix& x, const YMatrix& y, int e,
                                    const ScaleY& scale_y = {}, const ScaleX& scale_x = {}) {
    const float down = ldexpf(1.f, -e), up = ldexpf(1.f, e);  // powers of two: exact products
    for_all(l, [&](float& a) { a *= down; });
    add_product(l, x, y, scale_y, scale_x);
    for_all(l, [&](float& a) { a *= up; });
  }

  // hi + lo = this 2^-e (float: hi = this), a pair of columns a store; with Vector, the vector's 2^-e into the
  // padding columns C .. C + 7. largest_s: kWarps floats of shared memory. Half: a block barrier.
  FF_DEVICE void publish(const Lane& l, const SharedMatrix<T, R, C>& hi, const SharedMatrix<T, R, C>& lo,
                         simt::shared_ptr<float> largest_s) {
    if constexpr (kScaled) {
      float largest = 0;
      for_all(l, [&](float& x) { largest = fmaxf(largest, fabsf(x)); });
      largest = block_max(largest, largest_s);
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
        const Parts p0 = split_parts<T>(x0), p1 = split_parts<T>(x1);
        hi.set_pair(r, c, p0.hi, p1.hi);
        lo.set_pair(r, c, p0.lo, p1.lo);
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

}  // namespace flowformer::chunk::FF_SIMT_BUILD
