// Small dense primitives for the CPU kernels. Row-major matrices; D x M state matrices are small
// (at most a few hundred KiB) and stay in cache. Each is compiled for AVX-512, AVX2+FMA and a
// portable baseline; the best one for the running CPU is picked at load time.
#pragma once

#include <cstdint>

namespace flowformer::cpu {

// sum_i x[i] * y[i]
float dot(int64_t n, const float* x, const float* y);
double dot(int64_t n, const double* x, const double* y);

// sum_i (x[i] + eps) * (y[i] + eps)
float dot_eps(int64_t n, const float* x, const float* y, float eps);
double dot_eps(int64_t n, const double* x, const double* y, double eps);

// y += a * x
void axpy(int64_t n, float a, const float* x, float* y);
void axpy(int64_t n, double a, const double* x, double* y);

// y += a * (x + eps)
void axpy_eps(int64_t n, float a, const float* x, float eps, float* y);
void axpy_eps(int64_t n, double a, const double* x, double eps, double* y);

// S (D x M) += a * x y^T
void rank1_update(int64_t D, int64_t M, float a, const float* x, const float* y, float* S);
void rank1_update(int64_t D, int64_t M, double a, const double* x, const double* y, double* S);

// out (M) = a * x^T S   (S is D x M)
void vec_mat(int64_t D, int64_t M, float a, const float* x, const float* S, float* out);
void vec_mat(int64_t D, int64_t M, double a, const double* x, const double* S, double* out);

// out (D) += a * S y   (S is D x M)
void mat_vec_acc(int64_t D, int64_t M, float a, const float* S, const float* y, float* out);
void mat_vec_acc(int64_t D, int64_t M, double a, const double* S, const double* y, double* out);

}  // namespace flowformer::cpu
