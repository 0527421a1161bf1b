// The fused causal forward of linear attention (causal_forward.cuh): its parameters and entry points, shared
// by the kernel's two builds (nvcc: cuda::, the SIMT emulator: emulated::) and the torch glue. Torch-free.
#pragma once

#include "common/feature_map_kind.h"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace flowformer::linear_attention_kernels {

// One call: N sequences of H heads. Inputs are 16-bit floats (bf16 or half) whose rows (the last axis)
// have a unit stride and start on 16 bytes; strides in elements, per batch, head and row.
struct CausalForwardParams {
  const void *q, *k, *v;
  int64_t q_stride[3], k_stride[3], v_stride[3];
  void* out;                 // (B, H, L, M) contiguous, the inputs' dtype
  const float* kv0;          // (N, H, D, M) initial state, or nullptr (zeros)
  const float* z0;           // (N, H, D), or nullptr
  float* kv_final;           // (N, H, D, M)
  float* z_final;            // (N, H, D)
  const int64_t* cu_seqlens; // (N + 1) row offsets into batch 0, or nullptr: sequence n is batch n
  int64_t L;                 // rows per batch
  int N, H, D, M;
  FeatureMap feature_map;
  bool normalize;
  float eps;
  bool half;                 // half (true) or bf16 inputs
};

constexpr int kChunkRows = 64;      // rows per chunk: one m16 tile per warp
constexpr int kForwardThreads = 128;

// Head dims of the fused path: D and M in {16, 32, 64, 128, 256}.
constexpr bool fused_head_dim(int64_t d) { return d == 16 || d == 32 || d == 64 || d == 128 || d == 256; }
// Columns of the state (value tile) one block carries: D x BM float accumulators spread over 4 warps.
constexpr int value_tile(int D, int M) {
  const int cap = D <= 64 ? 64 : 32;
  return M < cap ? M : cap;
}
// Dynamic shared memory of one block: q and k tiles (2 stages), v tiles (2 stages), the state's hi and lo
// 16-bit parts; rows padded by 8 elements (16 bytes) against bank conflicts.
constexpr std::size_t causal_forward_shared_bytes(int D, int BM) {
  return std::size_t(2) * (2 * 2 * kChunkRows * (D + 8) + 2 * kChunkRows * (BM + 8) + 2 * D * (BM + 8));
}

// The kernel for head dim D, in each build: explicitly instantiated one D a file (csrc/linear_attention/
// cuda/causal_forward_d*.cu for nvcc, cpu/emulated_causal_forward_d*.cpp for the emulator). `stream` is
// a cudaStream_t (ignored by the emulator, which runs synchronously); a failed launch throws.
namespace cuda {
template <int D>
struct CausalForward {
  static void run(const CausalForwardParams& p, void* stream);
};
}  // namespace cuda
namespace emulated {
template <int D>
struct CausalForward {
  static void run(const CausalForwardParams& p, void* stream);
};
}  // namespace emulated

// Kernel<p.D>::run(p, stream), Kernel being cuda::CausalForward or emulated::CausalForward.
template <template <int> class Kernel>
void run_causal_forward(const CausalForwardParams& p, void* stream) {
  switch (p.D) {
    case 16:
      return Kernel<16>::run(p, stream);
    case 32:
      return Kernel<32>::run(p, stream);
    case 64:
      return Kernel<64>::run(p, stream);
    case 128:
      return Kernel<128>::run(p, stream);
    case 256:
      return Kernel<256>::run(p, stream);
    default:
      throw std::invalid_argument("flowformer: no fused causal forward for head dim " + std::to_string(p.D));
  }
}

}  // namespace flowformer::linear_attention_kernels
