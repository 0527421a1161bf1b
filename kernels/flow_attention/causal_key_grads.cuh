// Causal Flow-Attention, backward, pass 2 (keys, in reverse; DESIGN.md, "Causal backward"): one block a (sequence,
// head, value tile of BM columns) walks its chunks from the last, carrying the tile's columns of
// R = dS_L + sum_{t' after the chunk} g_t' q_t' dout_t'^T (StateTile, float), with g and c from the queries pass's
// records. For the chunk's rows t, with q~_t' = g_t' q_t' 2^-e (scaled into [-1, 1]) and R_t = R + the chunk's
// terms t' >= t:
//   dw_t = R_t^T k_t = R^T k_t + 2^e sum_{t'>=t} dout_t' <q~_t', k_t>      mma: k R, (k q~^T o upper) dout
//   dv_t = c_t dw_t                                                         the tile's columns of dv, whole
//   dc_t = <dw_t, v_t>                                                      the tile's share
//   dk_t = c_t R_t v_t = c_t (R v_t + 2^e sum_{t'>=t} q~_t' <v_t, dout_t'>)  mma: v R^T, (v dout^T o upper) q~;
//                                                                            the tile's share, before phi'
// then R += 2^e q~^T dout. At the sequence's start R is the incoming state's dS (its tile's columns). Padded rows
// have zero features, v and dout zeroed, g = c = 0: no share, dv 0. Four barriers a chunk. The split schedule's
// sums walk (p.sums) reads q, dout and g alone and does R's update alone: three barriers a chunk.
#pragma once

#include "flow_attention/blocks.cuh"

namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD {

template <typename T, int D, int BM>
struct CausalKeyGradsBlock {
  using Rows = ChunkTile<T, D>;
  using V = ChunkTile<T, BM>;
  using State = StateTile<T, D, BM>;
  using StateParts = SharedMatrix<T, D, BM>;
  static constexpr int kColumns = gradient_columns(D, sizeof(T));
  static constexpr std::size_t kSharedElements = 4 * Rows::kSize + 4 * V::kSize + 2 * StateParts::kSize;
  static_assert(kSharedElements == causal_key_grads_elements(D, BM), "the layout the host sizes");

  const CausalKeyGradsParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;
  const T *q, *k, *v, *dout;  // the span's first row (v, dout: at the tile's columns)
  const bool* pad;            // the span's first padding flag, or nullptr
  GradientRows out;
  int64_t state_at;  // offset of this (sequence, head)'s state gradients
  Lane l;
  simt::shared_ptr<T> tiles;
  simt::shared_ptr<float> g_s, c_s, largest_s;  // g_t, c_t of the chunk's rows; the warps' maxima
  State R;

  FF_DEVICE Rows q_tile(int stage) const { return {tiles + stage * Rows::kSize}; }
  FF_DEVICE Rows k_tile(int stage) const { return {tiles + (2 + stage) * Rows::kSize}; }
  FF_DEVICE V v_tile(int stage) const { return {tiles + 4 * Rows::kSize + stage * V::kSize}; }
  FF_DEVICE V dout_tile(int stage) const { return {tiles + 4 * Rows::kSize + (2 + stage) * V::kSize}; }
  FF_DEVICE StateParts r_hi() const { return {tiles + 4 * Rows::kSize + 4 * V::kSize}; }
  FF_DEVICE StateParts r_lo() const { return {tiles + 4 * Rows::kSize + 4 * V::kSize + StateParts::kSize}; }

  FF_DEVICE void load_chunk(int64_t c, int stage) const {
    const int64_t first = c * kChunkRows;
    load_rows(q_tile(stage), q, p.q_stride[2], first, span.length);
    load_rows(dout_tile(stage), dout, p.dout_stride[2], first, span.length);
    if (!p.sums) {
      load_rows(k_tile(stage), k, p.k_stride[2], first, span.length);
      load_rows(v_tile(stage), v, p.v_stride[2], first, span.length);
    }
  }

  FF_DEVICE void chunk(int64_t c, int stage) {
    const Rows qt = q_tile(stage), kt = k_tile(stage);
    const V vt = v_tile(stage), dt = dout_tile(stage);
    const int64_t left = span.length - c * kChunkRows, rows_at = out.rows_at + c * kChunkRows;
    const bool* pad_rows = pad != nullptr ? pad + c * kChunkRows : nullptr;
    apply_feature_map(p.feature_map, qt, qt, left, pad_rows);
    if (pad_rows != nullptr) {  // a NaN there counts for nothing
      zero_padded_rows(dt, pad_rows, left);
    }
    if (!p.sums) {
      apply_feature_map(p.feature_map, kt, kt, left, pad_rows);
      if (pad_rows != nullptr) {
        zero_padded_rows(vt, pad_rows, left);
      }
    }
    const int64_t all_rows = input_rows(p);
    for (int r = int(threadIdx.x); r < kChunkRows; r += kThreads) {
      g_s[r] = r < left ? simt::load_global(p.rows + row_g * all_rows + rows_at + r) : 0.f;
      if (!p.sums) {
        c_s[r] = r < left ? simt::load_global(p.rows + row_c * all_rows + rows_at + r) : 0.f;
      }
    }
    __syncthreads();
    const int e = scale_rows_into_unit(qt, [&](int r) { return float(g_s[r]); }, largest_s);  // q~
    if (!p.sums) {
      gradients(c, qt, kt, vt, dt, e, left, rows_at, all_rows);
      __syncthreads();  // R's parts read
    }
    R.add_scaled_product(l, qt, dt, e);
    if (!p.sums) {
      R.publish(l, r_hi(), r_lo(), largest_s);
    }
    __syncthreads();  // the stage may be loaded again; g_s, c_s and R's parts rewritten
  }

  // The chunk's dk share, dv and dc share from R after it and the chunk's rows (q~ in qt, 2^-e).
  FF_DEVICE void gradients(int64_t c, const Rows& qt, const Rows& kt, const V& vt, const V& dt, int e, int64_t left,
                           int64_t rows_at, int64_t all_rows) {
    const float to_state = ldexpf(1.f, e) * R.scale();  // from 2^-e to R's units
    float weight[2];  // c_t of this lane's rows
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      weight[i] = c_s[l.row(2 * i)];
    }
    {
      Scores<false> W;  // <v_t, dout_t'>, t' >= t
      W.template compute<T, BM>(l, vt, dt);
      W.mask(l, [](int, int) { return 0.f; });
      const float w_fit = W.template fit<T>();
      for (int d0 = 0; d0 < D; d0 += kColumns) {  // a part of dk at a time: fewer registers
        RowTile<kColumns> dk;  // 2^-e_R R_t v_t
        dk.zero();
        W.template times<T>(l, qt, w_fit, dk, d0);
        dk.scale(to_state / w_fit);
        State::template rows_times<false>(l, vt, r_hi(), r_lo(), dk, d0);
        out.template store_d<T, D, kColumns>(l, p, nullptr, p.dk_parts, c, d0, left, [&](int n, int el) {
          return dk.acc[n][el] * R.unscale() * weight[el / 2];
        });
      }
    }
    RowTile<BM> dw;  // 2^-e_R R_t^T k_t
    dw.zero();
    {
      Scores<false> G;  // <k_t, q~_t'>, t' >= t
      G.template compute<T, D>(l, kt, qt);
      G.mask(l, [](int, int) { return 0.f; });
      const float g_fit = G.template fit<T>();
      G.template times<T>(l, dt, g_fit, dw);
      dw.scale(to_state / g_fit);
    }
    State::template rows_times<true>(l, kt, r_hi(), r_lo(), dw);
    out.template store_v<T, BM>(l, p, p.dv, c, left,
                                [&](int n, int el) { return dw.acc[n][el] * R.unscale() * weight[el / 2]; });
    float dc[2];
    dw.template row_dots_with<BM>(l, vt, R.unscale(), dc);
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = l.row(2 * i);
      if (l.t == 0 && row < left) {
        simt::store_global(p.dc_parts + out.tile * all_rows + rows_at + row, dc[i]);
      }
    }
  }

  FF_DEVICE void run() {
    const int64_t S = RecurrentState{p.D, p.M}.S() + out.value_col;
    R.load(l, p.dstate_final != nullptr ? p.dstate_final + state_at + S : nullptr, p.M);
    if (!p.sums) {
      R.publish(l, r_hi(), r_lo(), largest_s);
    }
    walk_chunks(span.chunks(), true, [&](int64_t c, int stage) { load_chunk(c, stage); },
                [&](int64_t c, int stage) { chunk(c, stage); });
    if (p.dstate0 != nullptr) {
      R.store(l, p.dstate0 + state_at + S, p.M);
    }
  }
};

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) flow_causal_key_grads_kernel(CausalKeyGradsParams p) {
  FF_DYNAMIC_SHARED(T, tiles);
  FF_SHARED(float, g_s, kChunkRows);
  FF_SHARED(float, c_s, kChunkRows);
  FF_SHARED(float, largest_s, kWarps);
  const BlockPlace at = BlockPlace::of<BM>(p, p);
  CausalKeyGradsBlock<T, D, BM> block{p,
                                      at.span,
                                      at.span.rows<T>(p.q, p.q_stride, at.head),
                                      at.span.rows<T>(p.k, p.k_stride, at.head),
                                      at.span.rows<T>(p.v, p.v_stride, at.head) + at.value_col,
                                      at.span.rows<T>(p.dout, p.dout_stride, at.head) + at.value_col,
                                      p.pad != nullptr ? p.pad + at.span.batch * p.L + at.span.first : nullptr,
                                      {at.rows_at(p), at.value_col, at.value_col / BM},
                                      (int64_t(at.unit) * p.H + at.head) * RecurrentState{p.D, p.M}.size(),
                                      Lane::of(int(threadIdx.x)),
                                      tiles,
                                      g_s,
                                      c_s,
                                      largest_s,
                                      {}};
  block.run();
}

template <int D>
void CausalKeyGrads<D>::run(const CausalKeyGradsParams& p, void* stream) {
  launch_value_tiles<D, ValueTiles<D, chunk::backward_value_tile>>(
      p, p.sums ? "flow_causal_key_sums" : "flow_causal_key_grads", "causal_flow_attention", stream,
      [](auto type, auto tile) {
        using T = decltype(type);
        constexpr int BM = decltype(tile)::value;
        return std::pair{&flow_causal_key_grads_kernel<T, D, BM>, causal_key_grads_elements(D, BM) * sizeof(T)};
      });
}

}  // namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD
