// Small dense primitives for the CPU kernels, inlined into them. The kernels that use them are
// marked FLOWFORMER_CPU_CLONES: GCC compiles each for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA) and a
// portable baseline, chosen by the features of the running CPU at load time (not its model name), and
// these loops vectorise for it.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FLOWFORMER_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FLOWFORMER_CPU_CLONES
#endif
#define FLOWFORMER_INLINE inline __attribute__((always_inline))

namespace flowformer::cpu {

// sum_i x[i] y[i]
template <typename T>
FLOWFORMER_INLINE T dot(int64_t n, const T* __restrict x, const T* __restrict y) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    s += x[i] * y[i];
  }
  return s;
}

// sum_i (x[i] + eps) (y[i] + eps)
template <typename T>
FLOWFORMER_INLINE T dot_eps(int64_t n, const T* __restrict x, const T* __restrict y, T eps) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    s += (x[i] + eps) * (y[i] + eps);
  }
  return s;
}

// y += a x
template <typename T>
FLOWFORMER_INLINE void axpy(int64_t n, T a, const T* __restrict x, T* __restrict y) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * x[i];
  }
}

// y += a (x + eps)
template <typename T>
FLOWFORMER_INLINE void axpy_eps(int64_t n, T a, const T* __restrict x, T eps, T* __restrict y) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * (x[i] + eps);
  }
}

// y = a x
template <typename T>
FLOWFORMER_INLINE void scale(int64_t n, T a, const T* __restrict x, T* __restrict y) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] = a * x[i];
  }
}

// x *= a
template <typename T>
FLOWFORMER_INLINE void scale_(int64_t n, T a, T* __restrict x) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    x[i] *= a;
  }
}

// S (D x M, row-major) += a x y^T
template <typename T>
FLOWFORMER_INLINE void rank1_update(int64_t D, int64_t M, T a, const T* __restrict x, const T* __restrict y,
                                    T* __restrict S) {
  for (int64_t d = 0; d < D; ++d) {
    axpy(M, a * x[d], y, S + d * M);
  }
}

// out (M) = a x^T S   (S is D x M)
template <typename T>
FLOWFORMER_INLINE void vec_mat(int64_t D, int64_t M, T a, const T* __restrict x, const T* __restrict S,
                               T* __restrict out) {
  for (int64_t m = 0; m < M; ++m) {
    out[m] = 0;
  }
  for (int64_t d = 0; d < D; ++d) {
    axpy(M, a * x[d], S + d * M, out);
  }
}

// out (D) += a S y   (S is D x M)
template <typename T>
FLOWFORMER_INLINE void mat_vec_acc(int64_t D, int64_t M, T a, const T* __restrict S, const T* __restrict y,
                                   T* __restrict out) {
  for (int64_t d = 0; d < D; ++d) {
    out[d] += a * dot(M, S + d * M, y);
  }
}

}  // namespace flowformer::cpu
