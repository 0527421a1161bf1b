// What the fused Flow-Attention kernels (causal_forward.cuh, noncausal_*.cuh) share beyond the chunk layer: the
// value tiles of their grids, the competition's running log-sum-exp and where a non-causal pass's block finds its
// side of the inputs.
#pragma once

#include "chunk/chunk.cuh"
#include "chunk/row_pieces.cuh"
#include "flow_attention/fused_kernels.h"

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD {

using namespace ::flowformer::chunk::FF_SIMT_BUILD;  // the tiles and stages of the chunk layer
using chunk::kThreads;
using chunk::kWarps;

// The value tiles of a grid for head dim D (launch_value_tiles), by the kernel's rule (causal_value_tile,
// chunk::value_tile, chunk::backward_value_tile).
template <int D, int (*Rule)(int, int, std::size_t)>
struct ValueTiles {
  static constexpr int kMaxFloatD = flow_attention_kernels::kMaxFloatD;
  static constexpr int of(int M, std::size_t bytes) { return Rule(D, M, bytes); }
};

// Column `col` of an n8 accumulator tile (its column pairs 2t, 2t + 1 held by lanes t of each row group: lanes
// 4 g .. 4 g + 3 hold the rows g, g + 8) at lane l's rows (i = 0: g, 1: g + 8), from the lane that holds it.
FF_DEVICE float quad_column(const Lane& l, const float (&tile)[4], int col, int i) {
  return __shfl_sync(0xffffffffu, tile[2 * i + col % 2], (l.lane & ~3) | col / 2);
}

// The competition's running (max, sum of exp(x - max)) over a run of rows (the causal forward's, and the split
// schedule's over segments); empty: (-inf, 0).
struct RunningSum {
  float m, E;

  FF_DEVICE static RunningSum empty() { return {-INFINITY, 0.f}; }
  FF_DEVICE static RunningSum of(float x, bool valid) { return valid ? RunningSum{x, 1.f} : empty(); }
  // This run followed by `next`.
  template <typename Exp>
  FF_DEVICE RunningSum then(const RunningSum& next, Exp exp) const {
    const float top = fmaxf(m, next.m);
    if (top == -INFINITY) {
      return empty();
    }
    return {top, E * exp(m - top) + next.E * exp(next.m - top)};  // exp(-inf) = 0
  }
};

// A non-causal pass's block's rows of its side (BlockPlace `at`): the first row of q or k there, and its first
// padding flag (or nullptr).
template <typename T>
struct SideRows {
  const T* x;
  const bool* pad;

  FF_DEVICE static SideRows of(const NoncausalSide& p, const BlockPlace& at) {
    return {p.keys ? at.span.rows<T>(p.k, p.k_stride, at.head) : at.span.rows<T>(p.q, p.q_stride, at.head),
            p.pad != nullptr ? p.pad + at.span.batch * p.L + at.span.first : nullptr};
  }
  FF_DEVICE int64_t row_stride(const NoncausalSide& p) const { return p.keys ? p.k_stride[2] : p.q_stride[2]; }
  // Whether row r of chunk c (`left` rows of the span from the chunk's first) counts.
  FF_DEVICE bool kept(int64_t c, int r, int64_t left) const {
    return r < left && (pad == nullptr || !simt::load_global(pad + c * kChunkRows + r));
  }
};

}  // namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD
