// Causal Flow-Attention, backward, pass 1 (queries, in order; DESIGN.md, "Causal backward"): the forward's walk
// again (causal_forward.cuh: one block a (sequence or segment, head, value tile of BM columns) from the incoming
// state, the same six barriers a chunk) with the chunk's rows of dout (zero where padded). For the chunk's rows t,
// from the forward's numerator num_t = q_t^T S_t (its tile's columns) and S_0, the state at the chunk's start:
//   dg_t = <num_t, dout_t>                                        float dots of the numerator's rows
//   P_t  = S_0 dout_t + sum_{j<=t} k_j c_j <v_j, dout_t>           mma: dout S_0^T, (dout v^T o lower o c) k
//   dq_t = g_t P_t                                                the features' gradient, before phi'
// each the tile's share (the host adds the shares in tile order). Tile 0 also writes every row's scalars of the
// chain (n, I, O, a, the unclamped r, c, g and the running m, E after the row) and K, Q, A, B at each chunk's
// start, for the passes that walk the keys in reverse and the chain.
#pragma once

#include "flow_attention/causal_forward.cuh"

namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD {

template <typename T, int D, int BM>
struct QueryGradRecords {  // the walk's records (NoRowRecords' members)
  using Block = CausalForwardBlock<T, D, BM>;
  using V = ChunkTile<T, BM>;
  static constexpr int kColumns = gradient_columns(D, sizeof(T));
  static constexpr std::size_t kSharedElements = Block::kSharedElements + 2 * V::kSize;  // and dout's 2 stages
  static_assert(kSharedElements == causal_query_grads_elements(D, BM), "the layout the host sizes");

  const Block& b;
  const T* dout;  // the span's first row, at the tile's columns
  int64_t dout_row_stride;
  float *dq_parts, *dg_parts, *rows, *chunk_starts;
  GradientRows out;
  int64_t all_rows;    // B H L: the stride of the tiles' shares and of the rows' scalars
  int64_t first_slot;  // chunk_starts' slot of the span's first chunk

  FF_DEVICE V dout_tile(int stage) const { return {b.tiles + Block::kSharedElements + stage * V::kSize}; }

  FF_DEVICE void load(int64_t c, int stage) const {
    load_rows(dout_tile(stage), dout, dout_row_stride, c * kChunkRows, b.span.length);
  }
  // Before the features' barrier: padded rows of dout zeroed (a NaN there counts for nothing); K, Q, A, B before
  // the chunk (the walk's vectors until the chunk's end).
  FF_DEVICE void prepare(int64_t c, int stage, int64_t left, const bool* pad_rows) const {
    if (pad_rows != nullptr) {
      zero_padded_rows(dout_tile(stage), pad_rows, left);
    }
    if (out.tile == 0) {
      float* start = chunk_starts + (first_slot + c) * 4 * D;
      for (int d = int(threadIdx.x); d < 4 * D; d += kThreads) {
        simt::store_global(start + d, float(b.vectors_s[d]));
      }
    }
  }
  FF_DEVICE void row(int64_t c, int row, int64_t left, const RowScalars& x) const {
    if (out.tile == 0 && row < left) {
      float* at = rows + out.rows_at + c * kChunkRows + row;
      simt::store_global(at + row_n * all_rows, x.n);
      simt::store_global(at + row_I * all_rows, x.I);
      simt::store_global(at + row_O * all_rows, x.O);
      simt::store_global(at + row_a * all_rows, x.a);
      simt::store_global(at + row_r * all_rows, x.r);
      simt::store_global(at + row_g * all_rows, x.g);
    }
  }
  FF_DEVICE void competition(int64_t c, int row, int64_t left, float weight, const RunningSum& after) const {
    if (out.tile == 0 && row < left) {
      float* at = rows + out.rows_at + c * kChunkRows + row;
      simt::store_global(at + row_c * all_rows, weight);
      simt::store_global(at + row_m * all_rows, after.m);
      simt::store_global(at + row_E * all_rows, after.E);
    }
  }

  FF_DEVICE void output(int64_t c, int stage, int64_t left, Scores<true>& G, const float (&c_pair)[kChunkRows / 8][2],
                        const float (&g)[2]) const {
    const Lane& l = b.l;
    const V dout_rows = dout_tile(stage);
    float dg[2];
    {
      RowTile<BM> num;
      const float back = b.numerator(stage, G, c_pair, num);
      num.template row_dots_with<BM>(l, dout_rows, back, dg);
    }
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = l.row(2 * i);
      if (l.t == 0 && row < left) {
        simt::store_global(dg_parts + out.tile * all_rows + out.rows_at + c * kChunkRows + row, dg[i]);
      }
    }
    Scores<true> W;  // <dout_t, v_j> c_j, j <= t
    W.template compute<T, BM>(l, dout_rows, b.v_tile(stage));
    W.mask(l, [](int, int) { return 0.f; });
    W.scale_keys(c_pair);
    const float fit = W.template fit<T>();
    for (int d0 = 0; d0 < D; d0 += kColumns) {  // a part of dq at a time: fewer registers
      RowTile<kColumns> P;  // 2^-e P_t, columns d0 ..
      P.zero();
      W.template times<T>(l, b.k_tile(stage), fit, P, d0);
      P.scale(b.S.scale() / fit);
      Block::State::template rows_times<false>(l, dout_rows, b.s_hi(), b.s_lo(), P, d0);
      out.template store_d<T, D, kColumns>(l, b.p, nullptr, dq_parts, c, d0, left,
                                           [&](int n, int e) { return P.acc[n][e] * b.S.unscale() * g[e / 2]; });
    }
  }
};

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) flow_causal_query_grads_kernel(CausalQueryGradsParams p) {
  using Block = CausalForwardBlock<T, D, BM>;
  const BlockPlace at = BlockPlace::of<BM>(p, p);
  Block block = Block::at_place(p, at);
  const bool packed = p.cu_seqlens != nullptr;
  const int64_t slots = causal_chunk_slots(p.L, p.N, packed);
  QueryGradRecords<T, D, BM> records{
      block,
      at.span.rows<T>(p.dout, p.dout_stride, at.head) + at.value_col,
      p.dout_stride[2],
      p.dq_parts,
      p.dg_parts,
      p.rows,
      p.chunk_starts,
      GradientRows{at.rows_at(p), at.value_col, at.value_col / BM},
      input_rows(p),
      (at.span.batch * p.H + at.head) * slots + at.span.first / kChunkRows + (packed ? at.sequence : 0)};
  block.run(records);
}

template <int D>
void CausalQueryGrads<D>::run(const CausalQueryGradsParams& p, void* stream) {
  launch_value_tiles<D, ValueTiles<D, causal_value_tile>>(
      p, "flow_causal_query_grads", "causal_flow_attention", stream, [](auto type, auto tile) {
        using T = decltype(type);
        constexpr int BM = decltype(tile)::value;
        return std::pair{&flow_causal_query_grads_kernel<T, D, BM>,
                         QueryGradRecords<T, D, BM>::kSharedElements * sizeof(T)};
      });
}

}  // namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD
