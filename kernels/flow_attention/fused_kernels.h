// The fused kernels of Flow-Attention (causal_forward.cuh): their parameters and entry points, shared by the
// kernels' two builds (nvcc: cuda::, the SIMT emulator: emulated::) and the torch glue
// (csrc/flow_attention/fused.h). Torch-free.
#pragma once

#include "chunk/inputs.h"
#include "chunk/shape.h"
#include "flow_attention/state_layout.h"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace flowformer::flow_attention_kernels {

using chunk::Element;
using chunk::element_bytes;
using chunk::Inputs;
using chunk::kChunkRows;
using chunk::run_for_head_dim;
using chunk::Segments;

// Causal Flow-Attention, forward, from a recurrent state (state_layout.h) per sequence: Inputs' eps is the
// normalisers' eps (normalize unused); segments = 1 (whole sequences).
struct CausalForwardParams : Inputs, Segments {
  const bool* pad;          // (B, L) contiguous, true where a position is padding (either mask), or nullptr
  float clamp;              // of the conserved source, > 0 (inf: none)
  void* out;                // (B, H, L, M) contiguous, the inputs' dtype
  const float* state0;      // (N, H, RecurrentState::size()) incoming states, or nullptr (the empty prefix)
  float* state_final;       // (N, H, RecurrentState::size()), or nullptr (not wanted)
};

// Head dims of the fused causal forward: D and M in {16, 32, 64, 128, 256}; float32 inputs D <= 128.
constexpr bool fused_head_dim(int64_t d) { return d == 16 || d == 32 || d == 64 || d == 128 || d == 256; }
constexpr int kMaxFloatD = 128;
// Columns of the state S (value tile) one block carries, for inputs of `bytes` bytes an element: the block also
// holds two 64 x 64 score matrices in registers (G and H), so 64 columns only up to D = 32 (16-bit) and 32 beyond.
constexpr int value_tile(int D, int M, std::size_t bytes) {
  const int cap = bytes == 2 ? (D <= 64 ? 64 : D == 128 ? 32 : 16) : (D <= 64 ? 32 : 16);
  return M < cap ? M : cap;
}
// Dynamic shared memory of a causal forward block, in elements of the inputs' type: q and k tiles (2 stages),
// v tiles (2 stages), the state's hi and lo parts, the vectors' parts (D x 16) and the rows' flows (64 x 16, 8
// used); rows padded by 8 elements against bank conflicts.
constexpr std::size_t causal_forward_elements(int D, int BM) {
  return 4 * kChunkRows * (D + 8) + 2 * kChunkRows * (BM + 8) + 2 * D * (BM + 8) + (D + kChunkRows) * (16 + 8);
}
// All of a causal forward block's shared memory: the dynamic part and the static floats (the vectors K, Q, A,
// B: 4 D; the rows' n, conserved sources and flows: 4 x 64; the warps' totals: 5 x 4; the warps' maxima: 4).
constexpr std::size_t causal_forward_block_bytes(int D, int BM, std::size_t bytes) {
  return bytes * causal_forward_elements(D, BM) + std::size_t(4) * (4 * D + 4 * kChunkRows + 24);
}

// The kernels for head dim D, in each build: explicitly instantiated one D a file (csrc/flow_attention/
// cuda/fused_d*.cu for nvcc, cpu/emulated_fused_d*.cpp for the emulator). `stream` is a cudaStream_t (ignored
// by the emulator, which runs synchronously); a failed launch throws.
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

}  // namespace flowformer::flow_attention_kernels
