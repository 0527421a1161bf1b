// Non-causal linear attention, backward, fused on tensor cores (bf16, half or float32 inputs, float32 sums): two
// passes (fused_kernels.h, NoncausalBackwardParams), each a block of 4 warps a (segment, head, value tile of BM
// columns) in chunks of 64 rows, with the tile's D x BM part of the state. q, k = phi(query), phi(key); S, z the
// forward's sums.
// 1. Queries:  den_t = <q_t, z> + eps (1 without normalisation)      P_t = S dout_t   mma (S as 16-bit parts)
//              dden_t = -<q_t, P_t> / den_t^2 = -<S^T q_t, dout_t> / den_t^2 (M-wide: no D-wide row tile)
//              dq_t = phi'(query_t) (P_t / den_t + dden_t z), 64 columns of P at a time
//              the segment's dS += sum_t q_t dnum_t^T, dnum_t = dout_t / den_t, and dz += sum_t dden_t q_t
//              (add_query_gradient_sums: mma of (q_t / den_t) 2^-e, scaled into [-1, 1], with dout_t)
// 2. Keys, with dS, dz the segments' sums added in order by the host:
//              dk_j = phi'(key_j) (dS v_j + dz)      dv_j = dS^T k_j      mma; 0 for padded keys
// Value tiles: P_t, dden_t, dq_t, dk_t and dz contract over M, so each tile's block computes its share (dz enters
// dk in tile 0's) and the host adds them in tile order. Deterministic: no atomics, sums in a fixed order.
#pragma once

#include "linear_attention/blocks.cuh"

#include <stdexcept>
#include <string>
#include <utility>

namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD {

// What both passes share: the segment, its two inputs x (width D) and y (the tile's BM columns) in two stages,
// a feature tile, the state's parts (the tile's columns of S or dS), its vector (z or dz) in vector_s.
template <typename T, int D, int BM>
struct NoncausalBlock {
  using X = ChunkTile<T, D>;
  using Y = ChunkTile<T, BM>;
  using State = StateTile<T, D, BM>;
  using StateParts = SharedMatrix<T, D, BM>;
  static constexpr std::size_t kSharedElements = 3 * X::kSize + 2 * Y::kSize + 2 * StateParts::kSize;
  static_assert(kSharedElements * sizeof(T) == noncausal_backward_shared_bytes(D, BM, sizeof(T)),
                "the layout the host sizes");

  const NoncausalBackwardParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;
  const T *x, *y;         // the segment's first rows: (query, dout) or (key, value), y at the tile's columns
  int64_t x_stride, y_stride;
  GradientRows out;       // the segment's rows, the value tile's columns
  int64_t state_at;       // offset of the sequence's (N, H, D, M) state
  Lane l;
  simt::shared_ptr<T> tiles;
  simt::shared_ptr<float> vector_s, largest_s;
  float unscale;          // of the state's published parts

  FF_DEVICE X x_tile(int stage) const { return {tiles + stage * X::kSize}; }
  FF_DEVICE X feature_tile() const { return {tiles + 2 * X::kSize}; }
  FF_DEVICE Y y_tile(int stage) const { return {tiles + 3 * X::kSize + stage * Y::kSize}; }
  FF_DEVICE StateParts s_hi() const { return {tiles + 3 * X::kSize + 2 * Y::kSize}; }
  FF_DEVICE StateParts s_lo() const { return {tiles + 3 * X::kSize + 2 * Y::kSize + StateParts::kSize}; }

  // The state and its vector from p.kv, p.z, published; then body(c, stage) for every chunk (walk_chunks).
  template <typename Body>
  FF_DEVICE void run(const Body& body) {
    State S;
    S.load(l, p.kv + state_at + out.value_col, p.M);
    for (int d = int(threadIdx.x); d < D; d += kThreads) {
      vector_s[d] = simt::load_global(p.z + state_at / p.M + d);
    }
    S.publish(l, s_hi(), s_lo(), largest_s);
    unscale = S.unscale();
    walk_chunks(span.chunks(), false,
                [&](int64_t c, int stage) {
                  load_rows(x_tile(stage), x, x_stride, c * kChunkRows, span.length);
                  load_rows(y_tile(stage), y, y_stride, c * kChunkRows, span.length);
                },
                body);
  }
};

// Pass 1: dq, and the segment's sums of dS and dz.
template <typename T, int D, int BM>
struct NoncausalQueryBlock : NoncausalBlock<T, D, BM> {
  using Base = NoncausalBlock<T, D, BM>;
  using Base::l, Base::p, Base::span;
  static constexpr int kColumns = gradient_columns(D, sizeof(T));
  simt::shared_ptr<float> den_s, inv_den_s, dden_s, dz_s;
  int64_t sums_at;  // offset of the segment's (N G, H, D, M) sums
  typename Base::State dS;

  FF_DEVICE void chunk(int64_t c, int stage) {
    const auto query = this->x_tile(stage), q = this->feature_tile();
    const auto dout = this->y_tile(stage);
    const int64_t left = span.length - c * kChunkRows;
    apply_feature_map(p.feature_map, query, q, left);
    __syncthreads();
    row_dots(q, this->vector_s, den_s);
    RowTile<BM> num;  // 2^-e S^T q_t (the forward's numerator): <q_t, S dout_t> = <num_t, dout_t>
    num.zero();
    Base::State::template rows_times<true>(l, q, this->s_hi(), this->s_lo(), num);
    __syncthreads();  // den_s written
    float inv_den[2], dden[2];
    num.row_dots_with(l, dout, this->unscale, dden);
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = l.row(2 * i);
      const float qz = den_s[row];
      inv_den[i] = 1.f / (p.normalize ? qz + p.eps : 1.f);
      dden[i] = p.normalize ? -dden[i] * inv_den[i] * inv_den[i] : 0.f;
      if (l.t == 0) {  // rows past the segment count for nothing in the sums
        inv_den_s[row] = row < left ? inv_den[i] : 0.f;
        dden_s[row] = row < left ? dden[i] : 0.f;
      }
    }
    for (int d0 = 0; d0 < D; d0 += kColumns) {  // dq a part at a time: fewer registers (D = 256 fits)
      RowTile<kColumns> P;  // 2^-e S dout_t, columns d0 ..
      P.zero();
      Base::State::template rows_times<false>(l, dout, this->s_hi(), this->s_lo(), P, d0);
      this->out.template store_d_through_feature<T, D, kColumns>(
          l, p, p.dq, p.dq_parts, c, d0, left, [&](int n, int e, const auto& through) {
        const int row = l.row(e), col = d0 + n * 8 + l.col(e);
        const float z = this->vector_s[col];
        const float grad = P.acc[n][e] * this->unscale * inv_den[e / 2] + dden[e / 2] * z;
        return through(grad, query.get(row, col));
      });
    }
    __syncthreads();  // inv_den_s, dden_s written
    add_query_gradient_sums(l, q, dout, inv_den_s, dden_s, this->largest_s, dS, dz_s);
    __syncthreads();  // the stage may be loaded again; den_s, inv_den_s, dden_s, largest_s rewritten
  }

  FF_DEVICE void run() {
    dS.load(l, nullptr, 0);
    for (int d = int(threadIdx.x); d < D; d += kThreads) {  // each column's thread, as in the sums
      dz_s[d] = 0.f;
    }
    Base::run([&](int64_t c, int stage) { chunk(c, stage); });
    dS.store(l, p.dkv + sums_at + this->out.value_col, p.M);  // the tile's columns of dS, its share of dz
    const int64_t vectors = int64_t(p.N) * p.segments * p.H * D;
    for (int d = int(threadIdx.x); d < D; d += kThreads) {
      simt::store_global(p.dz + this->out.tile * vectors + sums_at / p.M + d, float(dz_s[d]));
    }
  }
};

// Pass 2: dk and dv from dS and dz (the state here).
template <typename T, int D, int BM>
struct NoncausalKeyBlock : NoncausalBlock<T, D, BM> {
  using Base = NoncausalBlock<T, D, BM>;
  using Base::l, Base::p, Base::span;
  static constexpr int kKeyColumns = gradient_columns(D, sizeof(T));
  const bool* pad;  // the segment's first padding flag, or null

  FF_DEVICE void chunk(int64_t c, int stage) const {
    const auto key = this->x_tile(stage), k = this->feature_tile();
    const auto v = this->y_tile(stage);
    const int64_t left = span.length - c * kChunkRows;
    const bool* chunk_pad = pad != nullptr ? pad + c * kChunkRows : nullptr;
    apply_feature_map(p.feature_map, key, k, left, chunk_pad);
    if (chunk_pad != nullptr) {
      zero_padded_rows(v, chunk_pad, left);
    }
    __syncthreads();
    for (int d0 = 0; d0 < D; d0 += kKeyColumns) {  // a part of dk at a time: fewer registers
      RowTile<kKeyColumns> dk;  // 2^-e dS v_j
      dk.zero();
      Base::State::template rows_times<false>(l, v, this->s_hi(), this->s_lo(), dk, d0);
      this->out.template store_d_through_feature<T, D, kKeyColumns>(
          l, p, p.dk, p.dk_parts, c, d0, left, [&](int n, int e, const auto& through) {
        const int row = l.row(e), col = d0 + n * 8 + l.col(e);
        const float dz = this->out.tile == 0 ? float(this->vector_s[col]) : 0.f;  // in tile 0's share
        const bool padded = chunk_pad != nullptr && chunk_pad[row];
        return padded ? 0.f : through(dk.acc[n][e] * this->unscale + dz, key.get(row, col));
      });
    }
    RowTile<BM> dv;  // 2^-e dS^T k_j (0 for padded keys: their features are 0)
    dv.zero();
    Base::State::template rows_times<true>(l, k, this->s_hi(), this->s_lo(), dv);
    this->out.template store_v<T, BM>(l, p, p.dv, c, left, [&](int n, int e) { return dv.acc[n][e] * this->unscale; });
    __syncthreads();  // the stage may be loaded again
  }

  FF_DEVICE void run() {
    Base::run([&](int64_t c, int stage) { chunk(c, stage); });
  }
};

template <typename T, int D, int BM>
FF_DEVICE NoncausalBlock<T, D, BM> noncausal_block(const NoncausalBackwardParams& p, const BlockPlace& at,
                                                   const void* x, const int64_t (&x_stride)[3], const void* y,
                                                   const int64_t (&y_stride)[3], simt::shared_ptr<T> tiles,
                                                   simt::shared_ptr<float> vector_s,
                                                   simt::shared_ptr<float> largest_s) {
  return {p,
          at.span,
          at.span.rows<T>(x, x_stride, at.head),
          at.span.rows<T>(y, y_stride, at.head) + at.value_col,
          x_stride[2],
          y_stride[2],
          {at.rows_at(p), at.value_col, at.value_col / BM},
          at.state_at(p, at.sequence),
          Lane::of(int(threadIdx.x)),
          tiles,
          vector_s,
          largest_s,
          1.f};
}

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) noncausal_query_grads_kernel(NoncausalBackwardParams p) {
  FF_DYNAMIC_SHARED(T, tiles);
  FF_SHARED(float, z_s, D);
  FF_SHARED(float, largest_s, kWarps);
  FF_SHARED(float, den_s, kChunkRows);
  FF_SHARED(float, inv_den_s, kChunkRows);
  FF_SHARED(float, dden_s, kChunkRows);
  FF_SHARED(float, dz_s, D);
  const BlockPlace at = BlockPlace::of<BM>(p, p);
  NoncausalQueryBlock<T, D, BM> block{
      noncausal_block<T, D, BM>(p, at, p.q, p.q_stride, p.dout, p.dout_stride, tiles, z_s, largest_s),
      den_s, inv_den_s, dden_s, dz_s, at.state_at(p, at.unit), {}};
  block.run();
}

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) noncausal_key_grads_kernel(NoncausalBackwardParams p) {
  FF_DYNAMIC_SHARED(T, tiles);
  FF_SHARED(float, dz_s, D);
  FF_SHARED(float, largest_s, kWarps);
  const BlockPlace at = BlockPlace::of<BM>(p, p);
  NoncausalKeyBlock<T, D, BM> block{
      noncausal_block<T, D, BM>(p, at, p.k, p.k_stride, p.v, p.v_stride, tiles, dz_s, largest_s),
      p.key_pad != nullptr ? p.key_pad + at.span.batch * p.L + at.span.first : nullptr};
  block.run();
}

template <int D>
void NoncausalQueryGrads<D>::run(const NoncausalBackwardParams& p, void* stream) {
  constexpr const char* op = "linear_attention_backward";
  launch_backward_pass<D, 256>(p, "noncausal_query_grads", op, stream, [](auto type, auto tile) {
    using T = decltype(type);
    return std::pair{&noncausal_query_grads_kernel<T, D, decltype(tile)::value>,
                     NoncausalBlock<T, D, decltype(tile)::value>::kSharedElements * sizeof(T)};
  });
}

template <int D>
void NoncausalKeyGrads<D>::run(const NoncausalBackwardParams& p, void* stream) {
  constexpr const char* op = "linear_attention_backward";
  launch_backward_pass<D, 256>(p, "noncausal_key_grads", op, stream, [](auto type, auto tile) {
    using T = decltype(type);
    return std::pair{&noncausal_key_grads_kernel<T, D, decltype(tile)::value>,
                     NoncausalBlock<T, D, decltype(tile)::value>::kSharedElements * sizeof(T)};
  });
}

}  // namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD
