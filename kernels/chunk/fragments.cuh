// Operands of the tensor cores for the chunked kernels: which rows and columns a lane holds (Lane), an m16n8k16
// operand (Fragment<T>: 4 registers of 16-bit pairs, or 8 floats), and the products: mma.m16n8k16 with float
// accumulators for 16-bit inputs, three tf32 products per k8 half for float inputs (mma_3xtf32, never plain tf32).
#pragma once

#include "chunk/shape.h"
#include "simt/simt.h"

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace flowformer::chunk::FF_SIMT_BUILD {

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

// x = hi + lo as operands of T: hi is x rounded to T and lo the rest (float: hi = x, lo = 0), so that the two
// 16-bit parts carry x to about 2^-17 relative.
struct Parts {
  float hi, lo;
};
template <typename T>
FF_DEVICE Parts split_parts(float x) {
  const float hi = std::is_same_v<T, float> ? x : float(T(x));
  return {hi, x - hi};
}

// The largest x over the warp's lanes; every lane gets it.
FF_DEVICE float warp_max(float x) {
  FF_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}
// The largest x over the block's threads; every thread gets it. largest_s: kWarps floats of shared memory that
// no thread reads between the block's last barrier and this call. One barrier.
FF_DEVICE float block_max(float x, simt::shared_ptr<float> largest_s) {
  x = warp_max(x);
  if (threadIdx.x % 32 == 0) {
    largest_s[threadIdx.x / 32] = x;
  }
  __syncthreads();
  FF_UNROLL
  for (int w = 0; w < kWarps; ++w) {
    const float m = largest_s[w];
    x = fmaxf(x, m);
  }
  return x;
}

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

// a's k columns scaled (a: an A fragment): the columns k0 + 2t + 8 h + e by s[h][e] (this lane's of the k step).
template <typename T>
FF_DEVICE void scale_k_columns(Fragment<T>& a, const float (&s)[2][2]) {
  FF_UNROLL
  for (int i = 0; i < 4; ++i) {  // pair i: row g + 8 (i % 2), columns 2t + 8 (i / 2) and the next
    if constexpr (std::is_same_v<T, float>) {
      a.r[2 * i] *= s[i / 2][0];
      a.r[2 * i + 1] *= s[i / 2][1];
    } else {
      float x0, x1;
      simt::unpack_floats<T>(a.r[i], x0, x1);
      a.set_pair(i, x0 * s[i / 2][0], x1 * s[i / 2][1]);
    }
  }
}

// b's k rows scaled (b: two B fragments, n tiles 0 and 1, as SharedMatrix::b_fragments loads them): the rows
// k0 + 2t + 8 i + e of both tiles by s[i][e] (this lane's rows of the k step).
template <typename T>
FF_DEVICE void scale_k_rows(Fragment<T>& b, const float (&s)[2][2]) {
  FF_UNROLL
  for (int j = 0; j < 2; ++j) {
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      if constexpr (std::is_same_v<T, float>) {  // float 4 j + 2 i + e: n tile j, k row 2t + 8 i + e
        b.r[4 * j + 2 * i] *= s[i][0];
        b.r[4 * j + 2 * i + 1] *= s[i][1];
      } else {  // register 2 j + i: n tile j, k rows 2t + 8 i and the next
        float x0, x1;
        simt::unpack_floats<T>(b.r[2 * j + i], x0, x1);
        b.set_pair(2 * j + i, x0 * s[i][0], x1 * s[i][1]);
      }
    }
  }
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

}  // namespace flowformer::chunk::FF_SIMT_BUILD
