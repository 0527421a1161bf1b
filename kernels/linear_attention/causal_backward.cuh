// Causal linear attention, backward, fused on tensor cores (bf16, half or float32 inputs, float32 states and sums):
// two passes over each (sequence, head, value tile of BM columns), one block of 4 warps each. q, k = phi(query),
// phi(key); per chunk of 64 rows t, with the chunk's masked score matrices and the state at the chunk's start:
// 1. Forward order, state (S, z) as in the forward; z_t = z + sum_{j<=t} k_j, S_t alike, never formed:
//      den_t = <q_t, z_t> + eps = <q_t, z> + sum_{j<=t} <q_t, k_j> + eps (1 without normalisation)     mma
//      dden_t = -<q_t, S_t dout_t> / den_t^2 = -<num_t, dout_t> / den_t^2 with the forward's numerator
//      num_t = S^T q_t + sum_{j<=t} <q_t, k_j> v_j (0 without normalisation)                            mma
//      dq_t = S_t dout_t / den_t + dden_t z_t = P_t / den_t + dden_t z,
//      P_t = S dout_t + sum_{j<=t} k_j (<v_j, dout_t> + dden_t den_t)               mma, 64 columns at a time
//      then S += k^T v, z += sum k. 1 / den_t and dden_t go to a work space for pass 2.
// 2. Reverse order, state R = dS_L + sum_{t' > chunk} q_t' dnum_t'^T, r = dz_L + sum dden_t' q_t', with
//    dnum_t = dout_t / den_t:
//      dk_t = R v_t + r + sum_{t'>=t} q_t' (<v_t, dnum_t'> + dden_t')                mma
//      dv_t = R^T k_t + sum_{t'>=t} dnum_t' <q_t', k_t>                               mma
//      then R += q^T dnum, r += sum dden_t q_t. At the start of the sequence: dS_0 = R, dz_0 = r.
// dq and dk are multiplied by phi'(query), phi'(key). Deterministic: no atomics, sums in a fixed order.
// Value tiles: a block holds the BM columns of S and R of its tile, and of v, dout, dnum. P_t, dden_t, dq_t and
// dk_t contract over M: each tile's block computes its share (r and dden_t' enter the shares of tile 0 only)
// and the host adds the shares in tile order (fused_kernels.h, Gradients; dden_t between the passes).
// The split schedule (fused_kernels.h, plan_segments) runs each pass over segments: pass 1 from each segment's
// incoming state (segment_sums, scanned in order by the host) also sums the segment's share of R and r
// (add_query_gradient_sums); the host scans those from the end, and pass 2 runs each segment from its own.
#pragma once

#include "linear_attention/blocks.cuh"

#include <utility>

namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD {

// What both passes share: the block's sequence, its tiles in shared memory (q, k, v, dout in two stages, a
// feature tile, the state's parts), cp.async of a chunk. Vector: the state carries its vector (StateTile).
template <typename T, int D, int BM, bool Vector>
struct BackwardBlockBase {
  using Q = ChunkTile<T, D>;
  using V = ChunkTile<T, BM>;
  using State = StateTile<T, D, BM, Vector>;
  using StateParts = SharedMatrix<T, D, BM>;
  static constexpr std::size_t kSharedElements = 5 * Q::kSize + 4 * V::kSize + 2 * StateParts::kSize;
  static_assert(kSharedElements * sizeof(T) == causal_backward_shared_bytes(D, BM, sizeof(T)),
                "the layout the host sizes");

  const CausalBackwardParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;             // the sequence, or its segment
  int head;
  GradientRows out;  // the span's rows, the value tile's columns
  int64_t state_at;  // offset of this (sequence or segment, head) in the (N G, H, D, M) states
  Lane l;
  simt::shared_ptr<T> tiles;
  simt::shared_ptr<float> largest_s;
  State S;

  FF_DEVICE Q q_tile(int stage) const { return {tiles + stage * Q::kSize}; }
  FF_DEVICE Q k_tile(int stage) const { return {tiles + (2 + stage) * Q::kSize}; }
  FF_DEVICE Q feature_tile() const { return {tiles + 4 * Q::kSize}; }
  FF_DEVICE V v_tile(int stage) const { return {tiles + 5 * Q::kSize + stage * V::kSize}; }
  FF_DEVICE V dout_tile(int stage) const { return {tiles + 5 * Q::kSize + (2 + stage) * V::kSize}; }
  FF_DEVICE StateParts s_hi() const { return {tiles + 5 * Q::kSize + 4 * V::kSize}; }
  FF_DEVICE StateParts s_lo() const { return {tiles + 5 * Q::kSize + 4 * V::kSize + StateParts::kSize}; }

  FF_DEVICE void load_chunk(int64_t c, int stage) const {
    const int64_t first = c * kChunkRows;
    load_rows(q_tile(stage), span.rows<T>(p.q, p.q_stride, head), p.q_stride[2], first, span.length);
    load_rows(k_tile(stage), span.rows<T>(p.k, p.k_stride, head), p.k_stride[2], first, span.length);
    const int col = out.value_col;
    load_rows(v_tile(stage), span.rows<T>(p.v, p.v_stride, head) + col, p.v_stride[2], first, span.length);
    load_rows(dout_tile(stage), span.rows<T>(p.dout, p.dout_stride, head) + col, p.dout_stride[2], first,
              span.length);
  }

  // The tile's columns of the state from the (N, H, D, M) `matrices` and its vector from the (N, H, D)
  // `vectors` (zeros where null): in the state with Vector, else into vector_s; its parts published.
  FF_DEVICE void start(const float* matrices, const float* vectors, simt::shared_ptr<float> vector_s) {
    const float* vector = vectors != nullptr ? vectors + state_at / p.M : nullptr;
    S.load(l, matrices != nullptr ? matrices + state_at + out.value_col : nullptr, p.M, Vector ? vector : nullptr);
    if constexpr (!Vector) {
      for (int d = int(threadIdx.x); d < D; d += kThreads) {
        vector_s[d] = vector != nullptr ? simt::load_global(vector + d) : 0.f;
      }
    }
    S.publish(l, s_hi(), s_lo(), largest_s);
  }

  // body(c, stage) for the chunks in order (or reversed), as walk_chunks.
  template <typename Body>
  FF_DEVICE void walk(bool reverse, const Body& body) const {
    walk_chunks(span.chunks(), reverse, [&](int64_t c, int stage) { load_chunk(c, stage); }, body);
  }
};

// Pass 1: dq, and 1 / den_t, dden_t for pass 2; with segments, the segment's sums of q_t dnum_t^T and dden_t q_t.
// The state carries z (StateTile's vector): <q_t, z> is one more n8 tile of q_t^T S.
template <typename T, int D, int BM>
struct BackwardQueryBlock : BackwardBlockBase<T, D, BM, /*Vector=*/true> {
  using Base = BackwardBlockBase<T, D, BM, true>;
  using Base::l, Base::p, Base::S, Base::span;
  static constexpr int kColumns = gradient_columns(D, sizeof(T));
  simt::shared_ptr<float> z_s, inv_den_s, dden_s, dz_s;  // z_s: z at the chunk's start (the state's vector)
  StateTile<T, D, BM> dS;  // the segment's sums (split schedule)

  FF_DEVICE void chunk(int64_t c, int stage) {
    const auto q = this->feature_tile(), k = this->k_tile(stage), query = this->q_tile(stage);
    const auto v = this->v_tile(stage), dout = this->dout_tile(stage);
    const int64_t left = span.length - c * kChunkRows;
    apply_feature_map(p.feature_map, query, q, left);
    apply_feature_map(p.feature_map, k, k, left);
    __syncthreads();
    // den_t = <q_t, z> + sum_{j<=t} <q_t, k_j> + eps; 2^-e num_t = 2^-e S_t^T q_t (the forward's numerator)
    Scores<true> A;
    RowTile<Base::State::kWidth> num;  // its last n8 tile: 2^-e <q_t, z> in every column
    num.zero();
    scores_and_state_rows<typename Base::State>(l, q, k, this->s_hi(), this->s_lo(), A, num);
    A.mask(l, [](int, int) { return 0.f; });
    float a_sum[2] = {0.f, 0.f};
    A.s.row_sums(a_sum);
    A.template times<T>(l, v, S.scale(), num);
    float inv_den[2], dden[2], weight[2];  // dden_t = -<num_t, dout_t> / den_t^2, weight dden_t den_t
    num.template row_dots_with<BM>(l, dout, S.unscale(), dden);
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = l.row(2 * i);
      const float qz = num.acc[BM / 8][2 * i] * S.unscale();
      const float den = p.normalize ? qz + a_sum[i] + p.eps : 1.f;
      inv_den[i] = 1.f / den;
      dden[i] = p.normalize ? -dden[i] * inv_den[i] * inv_den[i] : 0.f;
      weight[i] = dden[i] * den;
      if (l.t == 0 && row < left) {  // the tile's share of dden_t
        const int64_t at = this->out.rows_at + c * kChunkRows + row;
        if (this->out.tile == 0) {
          simt::store_global(p.inv_den + at, inv_den[i]);
        }
        simt::store_global(p.dden + this->out.tile * input_rows(p) + at, dden[i]);
      }
      if (l.t == 0) {  // rows past the span count for nothing in the sums
        inv_den_s[row] = row < left ? inv_den[i] : 0.f;
        dden_s[row] = row < left ? dden[i] : 0.f;
      }
    }
    // dq_t = P_t / den_t + dden_t z_t with z_t = z + sum_{j<=t} k_j: P'_t / den_t + dden_t z, where
    // P'_t = S dout_t + sum_{j<=t} k_j (<v_j, dout_t> + dden_t den_t)
    Scores<true> G;
    G.template compute<T, BM>(l, dout, v);
    const float weight_g = weight[0], weight_g8 = weight[1];  // rows g and g + 8 (bit 3 of the row): registers
    G.mask(l, [&](int row, int) { return (row & 8) != 0 ? weight_g8 : weight_g; });
    const float g_fit = G.template fit<T>();
    for (int d0 = 0; d0 < D; d0 += kColumns) {  // a part of dq at a time: fewer registers (D = 256 fits)
      RowTile<kColumns> P;  // 2^-e P'_t, columns d0 ..
      P.zero();
      G.template times<T>(l, k, g_fit, P, d0);
      P.scale(S.scale() / g_fit);
      Base::State::template rows_times<false>(l, dout, this->s_hi(), this->s_lo(), P, d0);
      this->out.template store_d_through_feature<T, D, kColumns>(
          l, p, p.dq, p.dq_parts, c, d0, left, [&](int n, int e, const auto& through) {
        const int row = l.row(e), col = d0 + n * 8 + l.col(e);
        const float z = z_s[col];
        const float grad = P.acc[n][e] * S.unscale() * inv_den[e / 2] + dden[e / 2] * z;
        return through(grad, query.get(row, col));
      });
    }
    __syncthreads();  // inv_den_s, dden_s written; q, z_s, the state's parts read
    if (p.dkv_sums != nullptr) {
      add_query_gradient_sums(l, q, dout, inv_den_s, dden_s, this->largest_s, dS, dz_s);
    }
    S.add_product(l, k, v);
    __syncthreads();  // the stage may be loaded again; z_s, inv_den_s, dden_s, the state's parts rewritten
    publish();  // read after the next chunk's first barrier
  }

  FF_DEVICE void publish() {
    S.publish(l, this->s_hi(), this->s_lo(), this->largest_s);
    S.store_vector(l, z_s);
  }

  FF_DEVICE void run() {
    this->start(p.kv0, p.z0, z_s);
    S.store_vector(l, z_s);
    dS.load(l, nullptr, 0);
    for (int d = int(threadIdx.x); d < D; d += kThreads) {  // each column's thread, as in the sums
      dz_s[d] = 0.f;
    }
    this->walk(false, [&](int64_t c, int stage) { chunk(c, stage); });
    if (p.dkv_sums != nullptr) {  // the tile's columns of dS, its share of dz
      dS.store(l, p.dkv_sums + this->state_at + this->out.value_col, p.M);
      const int64_t vectors = int64_t(p.N) * p.segments * p.H * D;
      for (int d = int(threadIdx.x); d < D; d += kThreads) {
        simt::store_global(p.dz_sums + this->out.tile * vectors + this->state_at / p.M + d, float(dz_s[d]));
      }
    }
  }
};

// Pass 2: dk, dv and the initial state's gradients, from the end of the sequence. dnum_t = dout_t / den_t never
// enters a 16-bit product (1 / den_t can be 1 / eps, e.g. a row of zero relu features): the products take
// q~_t = q_t / den_t 2^-e instead (2^e the chunk's largest |q_t| / den_t rounded up, so q~ is within
// [-1, 1]) with dout_t, and w_t = dden_t den_t = -<dout_t, out_t>, so that
//   q_t' (<v_t, dnum_t'> + dden_t') = 2^e q~_t' (<v_t, dout_t'> + w_t')     dnum_t' <q_t', k_t> = 2^e dout_t' <q~_t', k_t>
//   q_t dnum_t^T = 2^e q~_t dout_t^T                                          dden_t q_t = 2^e w_t q~_t.
// The chunk's terms are rescaled from 2^-e to the state's 2^-e_R units in float before the state's are added;
// for half, score matrices past 2^14 are scaled down by a power of two before they are rounded (Scores::fit).
template <typename T, int D, int BM>
struct BackwardKeyBlock : BackwardBlockBase<T, D, BM, /*Vector=*/false> {
  using Base = BackwardBlockBase<T, D, BM, false>;
  using Base::l, Base::p, Base::S, Base::span;  // S is R here
  static constexpr int kKeyColumns = gradient_columns(D, sizeof(T));
  simt::shared_ptr<float> r_s, weight_s, inv_den_s;

  FF_DEVICE void chunk(int64_t c, int stage) {
    const auto q = this->q_tile(stage), key = this->k_tile(stage), k = this->feature_tile();
    const auto v = this->v_tile(stage), dout = this->dout_tile(stage);
    const int64_t left = span.length - c * kChunkRows, rows = this->out.rows_at + c * kChunkRows;
    const bool first_tile = this->out.tile == 0;  // r and dden_t' enter dk in tile 0's share
    apply_feature_map(p.feature_map, q, q, left);
    apply_feature_map(p.feature_map, key, k, left);
    for (int r = int(threadIdx.x); r < kChunkRows; r += kThreads) {
      const float inv_den = r < left ? simt::load_global(p.inv_den + rows + r) : 0.f;
      inv_den_s[r] = inv_den;
      weight_s[r] = r < left ? simt::load_global(p.dden + rows + r) / inv_den : 0.f;
    }
    __syncthreads();
    const int e = scale_rows_into_unit(q, [&](int r) { return float(inv_den_s[r]); }, this->largest_s);  // q~
    const float up = ldexpf(1.f, e), to_state = up * S.scale();  // from 2^-e to the state's units
    Scores<false> W;  // <v_t, dout_t'> + w_t', t' >= t
    W.template compute<T, BM>(l, v, dout);
    W.mask(l, [&](int, int key_row) { return first_tile ? float(weight_s[key_row]) : 0.f; });
    const float w_fit = W.template fit<T>();
    for (int d0 = 0; d0 < D; d0 += kKeyColumns) {  // a part of dk at a time: fewer registers
      RowTile<kKeyColumns> dk;  // 2^-e_R (R v_t + sum_{t'>=t} q_t' (<v_t, dnum_t'> + dden_t'))
      dk.zero();
      W.template times<T>(l, q, w_fit, dk, d0);
      dk.scale(to_state / w_fit);
      Base::State::template rows_times<false>(l, v, this->s_hi(), this->s_lo(), dk, d0);
      this->out.template store_d_through_feature<T, D, kKeyColumns>(
          l, p, p.dk, p.dk_parts, c, d0, left, [&](int n, int el, const auto& through) {
        const int col = d0 + n * 8 + l.col(el);
        const float r = first_tile ? float(r_s[col]) : 0.f;
        return through(dk.acc[n][el] * S.unscale() + r, key.get(l.row(el), col));
      });
    }
    RowTile<BM> dv;  // 2^-e_R (R^T k_t + sum_{t'>=t} dnum_t' <q_t', k_t>)
    dv.zero();
    Scores<false> G;
    G.template compute<T, D>(l, k, q);
    G.mask(l, [](int, int) { return 0.f; });
    const float g_fit = G.template fit<T>();
    G.template times<T>(l, dout, g_fit, dv);
    dv.scale(to_state / g_fit);
    Base::State::template rows_times<true>(l, k, this->s_hi(), this->s_lo(), dv);
    this->out.template store_v<T, BM>(l, p, p.dv, c, left, [&](int n, int el) { return dv.acc[n][el] * S.unscale(); });
    __syncthreads();  // r_s and the state's parts read
    S.add_scaled_product(l, q, dout, e);
    add_column_sums(q, [&](int r) { return float(weight_s[r]) * up; }, r_s);
    S.publish(l, this->s_hi(), this->s_lo(), this->largest_s);
    __syncthreads();  // the stage may be loaded again; r_s, weight_s, inv_den_s and the state's parts rewritten
  }

  FF_DEVICE void run() {
    this->start(p.dkv_final, p.dz_final, r_s);
    this->walk(true, [&](int64_t c, int stage) { chunk(c, stage); });
    if (p.dkv0 == nullptr) {  // segments: the host's scan gave them
      return;
    }
    S.store(l, p.dkv0 + this->state_at + this->out.value_col, p.M);
    if (this->out.tile == 0) {
      for (int d = int(threadIdx.x); d < D; d += kThreads) {
        simt::store_global(p.dz0 + this->state_at / p.M + d, float(r_s[d]));
      }
    }
  }
};

template <typename T, int D, int BM, bool Vector>
FF_DEVICE BackwardBlockBase<T, D, BM, Vector> backward_base(const CausalBackwardParams& p, simt::shared_ptr<T> tiles,
                                                            simt::shared_ptr<float> largest_s) {
  const BlockPlace at = BlockPlace::of<BM>(p, p);
  return {p,
          at.span,
          at.head,
          {at.rows_at(p), at.value_col, at.value_col / BM},
          at.state_at(p, at.unit),
          Lane::of(int(threadIdx.x)),
          tiles,
          largest_s,
          {}};
}

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) causal_query_grads_kernel(CausalBackwardParams p) {
  FF_DYNAMIC_SHARED(T, tiles);
  FF_SHARED(float, largest_s, kWarps);
  FF_SHARED(float, z_s, D);
  FF_SHARED(float, inv_den_s, kChunkRows);
  FF_SHARED(float, dden_s, kChunkRows);
  FF_SHARED(float, dz_s, D);
  BackwardQueryBlock<T, D, BM> block{backward_base<T, D, BM, true>(p, tiles, largest_s), z_s, inv_den_s, dden_s,
                                     dz_s, {}};
  block.run();
}

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) causal_key_grads_kernel(CausalBackwardParams p) {
  FF_DYNAMIC_SHARED(T, tiles);
  FF_SHARED(float, largest_s, kWarps);
  FF_SHARED(float, r_s, D);
  FF_SHARED(float, weight_s, kChunkRows);
  FF_SHARED(float, inv_den_s, kChunkRows);
  BackwardKeyBlock<T, D, BM> block{backward_base<T, D, BM, false>(p, tiles, largest_s), r_s, weight_s, inv_den_s};
  block.run();
}

template <int D>
void CausalQueryGrads<D>::run(const CausalBackwardParams& p, void* stream) {
  constexpr const char* op = "causal_linear_attention_backward";
  launch_backward_pass<D, kMaxCausalBackwardD>(p, "causal_query_grads", op, stream, [](auto type, auto tile) {
    using T = decltype(type);
    return std::pair{&causal_query_grads_kernel<T, D, decltype(tile)::value>,
                     causal_backward_shared_bytes(D, decltype(tile)::value, sizeof(T))};
  });
}

template <int D>
void CausalKeyGrads<D>::run(const CausalBackwardParams& p, void* stream) {
  constexpr const char* op = "causal_linear_attention_backward";
  launch_backward_pass<D, kMaxCausalBackwardD>(p, "causal_key_grads", op, stream, [](auto type, auto tile) {
    using T = decltype(type);
    return std::pair{&causal_key_grads_kernel<T, D, decltype(tile)::value>,
                     causal_backward_shared_bytes(D, decltype(tile)::value, sizeof(T))};
  });
}

}  // namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD
