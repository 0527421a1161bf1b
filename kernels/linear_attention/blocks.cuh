// What the fused linear-attention kernels (causal_forward.cuh, causal_backward.cuh, segment_sums.cuh,
// state_output.cuh, noncausal_backward.cuh) share beyond the chunk layer (kernels/chunk): where a block writes
// the value tiles of their grids, and the products and sums of their chunk steps.
#pragma once

#include "chunk/chunk.cuh"
#include "linear_attention/fused_kernels.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD {

using namespace ::flowformer::chunk::FF_SIMT_BUILD;  // the tiles and stages of the chunk layer
using chunk::kThreads;
using chunk::kWarps;

// The two products of a causal chunk's query rows (this warp's): the scores G = q k^T (keys up to the diagonal)
// and out += q (hi + lo), the state's parts (StateTile::rows_times). 16-bit inputs load each A fragment of q
// once for both; float inputs make them one after the other (fewer live registers: no spills).
template <typename State, typename T, int D, int N>
FF_DEVICE void scores_and_state_rows(const Lane& l, const ChunkTile<T, D>& q, const ChunkTile<T, D>& k,
                                     const SharedMatrix<T, D, State::kColumns>& hi,
                                     const SharedMatrix<T, D, State::kColumns>& lo, Scores<true>& G, RowTile<N>& out) {
  if constexpr (std::is_same_v<T, float>) {
    G.template compute<T, D>(l, q, k);
    State::template rows_times<true>(l, q, hi, lo, out);
  } else {
    G.s.zero();
    for (int k0 = 0; k0 < D; k0 += 16) {
      Fragment<T> a;
      q.template a_fragment<true>(a, l, l.warp * 16, k0);
      G.add_step(l, a, k, k0);
      State::template rows_step<true>(l, a, hi, lo, out, k0);
    }
  }
}

// sum[c] += sum over the chunk's rows r of w(r) x[r][c], one thread a column, rows in order.
template <typename T, int Width, typename Weight>
FF_DEVICE void add_column_sums(const ChunkTile<T, Width>& x, const Weight& w, simt::shared_ptr<float> sum) {
  for (int c = int(threadIdx.x); c < Width; c += kThreads) {
    float s = 0;
    for (int r = 0; r < kChunkRows; ++r) {
      s += w(r) * x.get(r, c);
    }
    const float before = sum[c];
    sum[c] = before + s;
  }
}

// A chunk's share of the gradients of the state S and of its vector z (the reverse-order state of a backward),
// from its query rows: q their features (overwritten), dout their output gradients, 1 / den_t and dden_t in
// inv_den_s, dden_s (0 for rows past the sequence):
//   dS += sum_t q_t dout_t^T / den_t   (mma of q_t / den_t scaled into [-1, 1], scale_rows_into_unit)
//   dz += sum_t dden_t q_t             (float, one thread a column)
// Block-wide: after a barrier that published inv_den_s, dden_s; q and dout are read until the next barrier.
template <typename T, int D, int M>
FF_DEVICE void add_query_gradient_sums(const Lane& l, const ChunkTile<T, D>& q, const ChunkTile<T, M>& dout,
                                       simt::shared_ptr<float> inv_den_s, simt::shared_ptr<float> dden_s,
                                       simt::shared_ptr<float> largest_s, StateTile<T, D, M>& dS,
                                       simt::shared_ptr<float> dz_s) {
  add_column_sums(q, [&](int r) { return float(dden_s[r]); }, dz_s);
  const int e = scale_rows_into_unit(q, [&](int r) { return float(inv_den_s[r]); }, largest_s);
  dS.add_scaled_product(l, q, dout, e);
}

// dots[r] = <x_r, v> for the chunk's rows, two threads a row (v: Width floats of shared memory).
template <typename T, int Width>
FF_DEVICE void row_dots(const ChunkTile<T, Width>& x, simt::shared_ptr<float> v, simt::shared_ptr<float> dots) {
  static_assert(kThreads == 2 * kChunkRows, "two threads a row");
  const int r = int(threadIdx.x) / 2, part = int(threadIdx.x) % 2;
  float sum = 0;
  for (int c = part * (Width / 2); c < (part + 1) * (Width / 2); ++c) {
    const float vc = v[c];
    sum += x.get(r, c) * vc;
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  if (part == 0) {
    dots[r] = sum;
  }
}

// The value tiles of linear attention's forward-like grids for head dim D: value_tile, or backward_value_tile
// for a Backward pass (launch_value_tiles).
template <int D, bool Backward>
struct ValueTiles {
  static constexpr int kMaxFloatD = linear_attention_kernels::kMaxFloatD;
  static constexpr int of(int M, std::size_t bytes) {
    return Backward ? backward_value_tile(D, M, bytes) : value_tile(D, M, bytes);
  }
};

// Launches a forward-like grid of linear attention (launch_value_tiles with ValueTiles).
template <int D, bool Backward = false, typename Params, typename KernelOf>
void launch_forward_like(const Params& p, const char* name, const char* op, void* stream, const KernelOf& kernel_of) {
  launch_value_tiles<D, ValueTiles<D, Backward>>(p, name, op, stream, kernel_of);
}

// A pass of a backward over its forward-like grid (value tiles of backward_value_tile): D up to MaxD.
template <int D, int MaxD, typename Params, typename KernelOf>
void launch_backward_pass(const Params& p, const char* name, const char* op, void* stream, const KernelOf& kernel_of) {
  if constexpr (D <= MaxD) {
    return launch_forward_like<D, /*Backward=*/true>(p, name, op, stream, kernel_of);
  }
  throw std::invalid_argument(std::string("flowformer: no fused ") + name + " kernel for D = " + std::to_string(D));
}

}  // namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD
