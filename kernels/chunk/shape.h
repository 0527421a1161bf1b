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

// The columns of dq or dk a backward pass computes at a time (float32 inputs: 32, and 16 from D = 128, the
// registers of their operands).
constexpr int gradient_columns(int D, std::size_t bytes) {
  const int part = bytes == 4 ? (D >= 128 ? 16 : 32) : 64;
  return D < part ? D : part;
}

}  // namespace flowformer::chunk
