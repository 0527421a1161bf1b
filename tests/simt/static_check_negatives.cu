// Kernels that the static checks must reject (tests/static/negatives.toml): the checks can fail.
#include "simt/simt.h"

namespace flowformer::simt_samples::cuda {

// A per-thread array indexed at run time lives in local memory.
__global__ void uses_local_memory(const int* index, float* out) {
  float scratch[64];
  for (int i = 0; i < 64; ++i) {
    scratch[i] = out[i * 32 + threadIdx.x];
  }
  for (int i = 0; i < 64; ++i) {
    out[i * 32 + threadIdx.x] = scratch[index[i * 32 + threadIdx.x] & 63];
  }
}

// Meant for tensor cores, but written as a plain loop.
__global__ void scalar_product(const float* a, const float* b, float* c, int k) {
  float sum = 0.f;
  for (int i = 0; i < k; ++i) {
    sum += a[threadIdx.x * k + i] * b[i];
  }
  c[threadIdx.x] = sum;
}

void launch_negatives(const int* index, float* out, const float* a, const float* b, int k) {
  simt::launch("uses_local_memory", uses_local_memory, {simt::Dim3(1), simt::Dim3(32)}, index, out);
  simt::launch("scalar_product", scalar_product, {simt::Dim3(1), simt::Dim3(32)}, a, b, out, k);
}

}  // namespace flowformer::simt_samples::cuda
