#include "common/cpu_vec.h"

// One body per primitive, written once as an inline template and instantiated below for float and
// double inside functions that GCC clones per instruction set (function multi-versioning).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FLOWFORMER_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define FLOWFORMER_CLONES
#endif
#define FLOWFORMER_INLINE inline __attribute__((always_inline))

namespace flowformer::cpu {
namespace {

template <typename T>
FLOWFORMER_INLINE T dot_impl(int64_t n, const T* __restrict x, const T* __restrict y) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    s += x[i] * y[i];
  }
  return s;
}

template <typename T>
FLOWFORMER_INLINE T dot_eps_impl(int64_t n, const T* __restrict x, const T* __restrict y, T eps) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    s += (x[i] + eps) * (y[i] + eps);
  }
  return s;
}

template <typename T>
FLOWFORMER_INLINE void axpy_impl(int64_t n, T a, const T* __restrict x, T* __restrict y) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * x[i];
  }
}

template <typename T>
FLOWFORMER_INLINE void axpy_eps_impl(int64_t n, T a, const T* __restrict x, T eps, T* __restrict y) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * (x[i] + eps);
  }
}

template <typename T>
FLOWFORMER_INLINE void rank1_impl(int64_t D, int64_t M, T a, const T* __restrict x, const T* __restrict y,
                                  T* __restrict S) {
  for (int64_t d = 0; d < D; ++d) {
    axpy_impl(M, a * x[d], y, S + d * M);
  }
}

template <typename T>
FLOWFORMER_INLINE void vec_mat_impl(int64_t D, int64_t M, T a, const T* __restrict x, const T* __restrict S,
                                    T* __restrict out) {
  for (int64_t m = 0; m < M; ++m) {
    out[m] = 0;
  }
  for (int64_t d = 0; d < D; ++d) {
    axpy_impl(M, a * x[d], S + d * M, out);
  }
}

template <typename T>
FLOWFORMER_INLINE void mat_vec_acc_impl(int64_t D, int64_t M, T a, const T* __restrict S, const T* __restrict y,
                                        T* __restrict out) {
  for (int64_t d = 0; d < D; ++d) {
    out[d] += a * dot_impl(M, S + d * M, y);
  }
}

}  // namespace

#define FLOWFORMER_INSTANTIATE(T)                                                                  \
  FLOWFORMER_CLONES T dot(int64_t n, const T* x, const T* y) { return dot_impl(n, x, y); }         \
  FLOWFORMER_CLONES T dot_eps(int64_t n, const T* x, const T* y, T eps) {                          \
    return dot_eps_impl(n, x, y, eps);                                                             \
  }                                                                                                \
  FLOWFORMER_CLONES void axpy(int64_t n, T a, const T* x, T* y) { axpy_impl(n, a, x, y); }         \
  FLOWFORMER_CLONES void axpy_eps(int64_t n, T a, const T* x, T eps, T* y) {                       \
    axpy_eps_impl(n, a, x, eps, y);                                                                \
  }                                                                                                \
  FLOWFORMER_CLONES void rank1_update(int64_t D, int64_t M, T a, const T* x, const T* y, T* S) {   \
    rank1_impl(D, M, a, x, y, S);                                                                  \
  }                                                                                                \
  FLOWFORMER_CLONES void vec_mat(int64_t D, int64_t M, T a, const T* x, const T* S, T* out) {      \
    vec_mat_impl(D, M, a, x, S, out);                                                              \
  }                                                                                                \
  FLOWFORMER_CLONES void mat_vec_acc(int64_t D, int64_t M, T a, const T* S, const T* y, T* out) {  \
    mat_vec_acc_impl(D, M, a, S, y, out);                                                          \
  }

FLOWFORMER_INSTANTIATE(float)
FLOWFORMER_INSTANTIATE(double)

#undef FLOWFORMER_INSTANTIATE

}  // namespace flowformer::cpu
