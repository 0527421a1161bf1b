// Types shared by the two builds of a kernel: dim3, and 16-bit float storage. nvcc: CUDA's own types.
// Host (emulation): dim3/uint3 look-alikes, and bf16/half with the conversions of __float2bfloat16_rn and
// __float2half_rn (round to nearest even), bit-compatible with CUDA's and c10's types.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#include <cmath>
#endif

namespace flowformer::simt {

#if defined(__CUDACC__)

#define FF_SIMT_HD __host__ __device__ __forceinline__
using Dim3 = dim3;
using bf16 = __nv_bfloat16;
using half = __half;

#else

#define FF_SIMT_HD inline

struct Dim3 {
  unsigned x, y, z;
  constexpr Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct Uint3 {
  unsigned x, y, z;
};

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t bits_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

struct bf16 {
  uint16_t bits;

  bf16() = default;
  bf16(float f) : bits(round(f)) {}  // NOLINT: implicit, as __nv_bfloat16's
  operator float() const { return float_from_bits(uint32_t(bits) << 16); }

  static uint16_t round(float f) {
    const uint32_t u = bits_from_float(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      return uint16_t((u >> 16) | 0x40u);  // NaN stays a quiet NaN
    }
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

struct half {
  uint16_t bits;

  half() = default;
  half(float f) : bits(round(f)) {}  // NOLINT: implicit, as __half's
  operator float() const {
    const uint32_t sign = uint32_t(bits & 0x8000u) << 16, e = (bits >> 10) & 0x1fu, m = bits & 0x3ffu;
    if (e == 0) {  // zero or subnormal: m * 2^-24
      const float magnitude = float(m) * 5.9604644775390625e-8f;
      return sign ? -magnitude : magnitude;
    }
    if (e == 31) {
      return float_from_bits(sign | 0x7f800000u | (m << 13));
    }
    return float_from_bits(sign | ((e + 112u) << 23) | (m << 13));
  }

  static uint16_t round(float f) {
    const uint32_t u = bits_from_float(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
      return uint16_t(sign | 0x7e00u);
    }
    if (a >= 0x477ff000u) {  // at or above 65520: rounds to infinity
      return uint16_t(sign | 0x7c00u);
    }
    if (a >= 0x38800000u) {  // normal: rebias the exponent (127 - 15), drop 13 mantissa bits, to nearest even
      const uint32_t r = a - 0x38000000u;
      return uint16_t(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
    // subnormal: a multiple of 2^-24, rounded to nearest even (the scaling by 2^24 is exact)
    return uint16_t(sign | uint32_t(std::nearbyint(float_from_bits(a) * 16777216.0f)));
  }
};

#endif

// Two 16-bit values in one 32-bit register, the lower index in the lower half (the fragment layout).
template <typename T>
FF_SIMT_HD uint32_t pack2(T lo, T hi) {
  uint16_t l, h;
  std::memcpy(&l, &lo, 2);
  std::memcpy(&h, &hi, 2);
  return uint32_t(l) | (uint32_t(h) << 16);
}

// Two floats rounded to T (to nearest even) in one 32-bit register, lo in the lower half: one F2FP
// instruction on the GPU (the same bits as pack2(T(lo), T(hi))).
template <typename T>
FF_SIMT_HD uint32_t pack_floats(float lo, float hi) {
  static_assert(sizeof(T) == 2, "16-bit elements");
#if defined(__CUDACC__)
  uint32_t packed;
  if constexpr (std::is_same_v<T, bf16>) {
    const __nv_bfloat162 two = __floats2bfloat162_rn(lo, hi);
    std::memcpy(&packed, &two, 4);
  } else {
    const __half2 two = __floats2half2_rn(lo, hi);
    std::memcpy(&packed, &two, 4);
  }
  return packed;
#else
  return pack2(T(lo), T(hi));
#endif
}

// The two T values of a 32-bit register as floats (pack2's inverse: lo from the lower half).
template <typename T>
FF_SIMT_HD void unpack_floats(uint32_t two, float& lo, float& hi) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  T l, h;
  const uint16_t lo_bits = uint16_t(two & 0xffffu), hi_bits = uint16_t(two >> 16);
  std::memcpy(&l, &lo_bits, 2);
  std::memcpy(&h, &hi_bits, 2);
  lo = float(l);
  hi = float(h);
}

}  // namespace flowformer::simt
