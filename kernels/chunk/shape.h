// The shape of the chunked kernels (kernels/chunk): a block of kThreads threads (kWarps warps) walks a sequence in
// chunks of kChunkRows rows, warp w owning the chunk rows 16 w .. 16 w + 15 (one m16 tile). Host and device code.
#pragma once

#include <cstddef>
#include <cstdint>

namespace flowformer::chunk {

constexpr int kChunkRows = 64;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
static_assert(kChunkRows == 16 * kWarps, "one m16 row tile per warp");

// Head dims of the fused kernels: D and M in {16, 32, 64, 128, 256}; float32 inputs D <= kMaxFloatD (the shared
// memory and registers of float tiles).
constexpr bool fused_head_dim(int64_t d) { return d == 16 || d == 32 || d == 64 || d == 128 || d == 256; }
constexpr int kMaxFloatD = 128;

// Columns of the state (value tile) a block carries when it holds no score matrix beside it (linear attention's
// blocks, Flow-Attention's non-causal passes): D x BM float accumulators over 4 warps, 64 up to D = 64 for 16-bit
// inputs, else 32 (float32 at D = 64 with 64 columns: linear attention's causal forward, whose state carries z
// beside S, spills registers).
constexpr int value_tile(int D, int M, std::size_t bytes) {
  const int cap = D < 64 || (D == 64 && bytes != 4) ? 64 : 32;
  return M < cap ? M : cap;
}
// The value tile of such a block's backward pass: the forward's up to D = 64 (float32: at most 32 columns); 16
// columns for D >= 128, whose passes hold D-wide row tiles of float accumulators besides the state (with 32
// columns, or float32's 64, the sm_90 code spills registers).
constexpr int backward_value_tile(int D, int M, std::size_t bytes) {
  const int tile = D <= 64 ? value_tile(D, M, bytes) : 16;
  return bytes == 4 && tile > 32 ? 32 : tile;
}
// The columns of dq or dk a backward pass computes at a time (float32 inputs: 32, and 16 from D = 128, the
// registers of their operands).
constexpr int gradient_columns(int D, std::size_t bytes) {
  const int part = bytes == 4 ? (D >= 128 ? 16 : 32) : 64;
  return D < part ? D : part;
}

}  // namespace flowformer::chunk
