// Fast math of kernel code, the same formula in both builds. fast_exp(x) = 2^(x log2 e) by the MUFU.EX2
// approximation with subnormals flushed to zero (ex2.approx.ftz: one FMUL and one MUFU; a relative error of
// about 2^-22, far below a 16-bit element's rounding); in the emulator exp2f of the same product, flushed alike.
#pragma once

#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace flowformer::simt {

constexpr float kLog2e = 1.44269504088896341f;

#if defined(__CUDACC__)
__device__ __forceinline__ float fast_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * kLog2e));
  return y;
}
#else
inline float fast_exp(float x) {
  const float y = std::exp2(x * kLog2e);
  return std::fabs(y) < 1.17549435e-38f ? 0.f : y;  // ftz: a subnormal result is 0
}
#endif

}  // namespace flowformer::simt
