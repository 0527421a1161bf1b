// The non-causal Flow-Attention backward (DESIGN.md, fused_kernels.h's NoncausalBackwardParams), fused on tensor
// cores (bf16, half or float32 inputs, float32 sums): four passes, queries, keys, queries, keys, each a block of 4
// warps a (segment, head, value tile of BM columns) walking one side's rows in chunks of 64, with the tile's
// columns of W (queries) or dW (keys) published as 16-bit parts. q, k = phi(query), phi(key), rows of the chunk i
// (queries) or j (keys); what contracts over M is the tile's share (the scalars' tile-0-only terms in tile 0's):
//   queries: I_i = 1 / <q_i + e, K + e>, a_i = sigmoid(<q_i + e, A + e> L / S), g_i = a_i I_i
//            dg_i = <q_i^T W, dout_i>                                                   mma (q W), row dots
//     1:     dW += q^T (g dout)                                                         mma (rows scaled into [-1, 1])
//            dA += dg_i s_i (q_i + e),  s_i = I_i a_i (1 - a_i) L / S                   column sums
//     2:     dI_i = dg_i a_i + <dB, q_i>
//            dq_i = phi'(query_i) (g_i W dout_i + dg_i s_i (A + e) - dI_i I_i^2 (K + e) + I_i dB + dQ)   mma (dout W^T)
//            dK += -dI_i I_i^2 (q_i + e)                                                column sums
//   keys:    O_j = 1 / <k_j + e, Q + e>, r_j = <k_j + e, B + e>, c_j = S / E exp(clamp(r_j) - m)
//            dc_j = <k_j^T dW, v_j>, dr_j = c_j (dc_j - <dW, W> / S) where |r_j| <= clamp   mma (k dW), row dots
//     1:     dv_j = c_j dW^T k_j (the same product), dB += dr_j (k_j + e), dQ += -<dA, k_j> O_j^2 (k_j + e)
//     2:     dk_j = phi'(key_j) (c_j dW v_j + dr_j (B + e) + O_j dA - <dA, k_j> O_j^2 (Q + e) + dK)   mma (v dW^T)
// Row dots against the D-vectors a thread 16 bytes of a row at a time (PieceRows), the sums a thread's columns in
// registers over the segment, added in thread order at its end. Padded rows (and their dout or v) count as
// zeros and get zero gradients. Deterministic: no atomics, sums in a fixed order.
#pragma once

#include "flow_attention/blocks.cuh"

namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD {

// Per chunk row, in shared memory (rows_s): the scalars the chunk's steps pass between its threads.
enum RowScalar : int { kKept, kWeight, kFlow, kRate, kSlope, kSource, kLinear };
static_assert(kLinear + 1 == kBackwardRowScalars, "the rows' scalars the host counts");
// kFlow: I_i or O_j; queries: kRate g_i, kSlope s_i, kSource a_i, kLinear <dB, q_i>; keys: kRate c_j, kSlope c_j
// where |r_j| <= clamp (else 0), kSource <dA, k_j>; kWeight the sums' weight of the row (dg s, dr, -dI I^2).

// What the four passes share: the segment, its raw rows x (query or key) and their features, the rows y (dout or
// v) at the tile's columns, two stages each, the state's parts, the D-vectors the pass reads and the rows'
// scalars; the thread's share of the column sums.
template <typename T, int D, int BM>
struct BackwardBlock {
  using X = ChunkTile<T, D>;
  using Y = ChunkTile<T, BM>;
  using State = StateTile<T, D, BM>;
  using StateParts = SharedMatrix<T, D, BM>;
  using Rows = PieceRows<T, D>;
  static constexpr int kCount = Rows::kCount;
  static constexpr int kColumns = gradient_columns(D, sizeof(T));  // of dq or dk at a time
  static constexpr std::size_t kSharedElements = 3 * X::kSize + 2 * Y::kSize + 2 * StateParts::kSize;
  static_assert(kSharedElements == noncausal_backward_elements(D, BM), "the layout the host sizes");
  static_assert(kSharedElements * sizeof(T) >= kThreads * kCount * sizeof(float), "room for the column sums");

  const NoncausalBackwardParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;
  SideRows<T> side;
  const T* y;  // the segment's first row of dout or v, at the tile's columns
  int64_t y_stride;
  GradientRows out;
  int64_t vectors_at;  // this (sequence, head) in (N, H) arrays
  int64_t sums_at;     // this (segment, head) in (N G, H) arrays
  Lane l;
  simt::shared_ptr<T> tiles;
  simt::shared_ptr<float> vectors_s;  // D x 4: column d of the four vectors dq's or dk's terms take
  simt::shared_ptr<float> rows_s;     // kBackwardRowScalars x kChunkRows
  simt::shared_ptr<float> largest_s;  // kWarps
  float sums[kCount];                 // the thread's columns of the pass's sum (dA, dB or dK)
  float columns[3][kCount];           // the thread's columns of the vectors the rows are dotted with
  float unscale;                      // of the state's parts

  FF_DEVICE X raw_tile(int stage) const { return {tiles + stage * X::kSize}; }
  FF_DEVICE X feature_tile() const { return {tiles + 2 * X::kSize}; }
  FF_DEVICE Y y_tile(int stage) const { return {tiles + 3 * X::kSize + stage * Y::kSize}; }
  FF_DEVICE StateParts s_hi() const { return {tiles + 3 * X::kSize + 2 * Y::kSize}; }
  FF_DEVICE StateParts s_lo() const { return {tiles + 3 * X::kSize + 2 * Y::kSize + StateParts::kSize}; }
  FF_DEVICE simt::shared_ptr<float> row(RowScalar s) const { return rows_s + int(s) * kChunkRows; }
  FF_DEVICE bool first_tile() const { return out.tile == 0; }

  // <f + eps, y> (no eps: <f, y>) over the piece's row, y the vector v < 3, in every lane of the row.
  FF_DEVICE float row_dot(const float (&f)[kCount], int v, float eps) const {
    return Rows::row_dot(f, columns[v], eps);
  }
  // The piece's features as the inputs' type, into the feature tile.
  FF_DEVICE void store_features(int r, int c, const float (&f)[kCount]) const {
    Piece<T> feature;
    FF_UNROLL
    for (int j = 0; j < kCount / 2; ++j) {
      feature.set_pair(j, f[2 * j], f[2 * j + 1]);
    }
    feature_tile().set_piece(r, c, feature);
  }
  // sums += w_r (x_r + eps) over the chunk's feature rows, w = row(kWeight) (0 for rows that do not count).
  FF_DEVICE void add_weighted_rows() {
    Rows::Pieces::each([&](int r, int c) {
      const float w = row(kWeight)[r];
      const Piece<T> x = feature_tile().piece(r, c);
      FF_UNROLL
      for (int i = 0; i < kCount; ++i) {
        sums[i] += w * (float(x.x[i]) + p.eps);
      }
    });
  }
  // The chunk's rows past the span, or padded, have zero features; padded rows of y become zeros too.
  FF_DEVICE void zero_padded_y(int64_t c, int stage, int64_t left) const {
    if (side.pad != nullptr) {
      zero_padded_rows(y_tile(stage), side.pad + c * kChunkRows, left);
    }
  }
  // The pass's sum (its tile's share) to `dst` + the (segment, head)'s offset, after the walk's last barrier.
  FF_DEVICE void store_sums(float* dst) const {
    Rows::store_column_sums(sums, simt::shared_cast<float>(tiles), dst + sums_at * D);
  }

  // dq or dk (grad, parts: chunk::Gradients') of the chunk's rows i, a gradient_columns part at a time:
  //   phi'(x_i) (rate_i (y_i M^T) + sum_v terms[v][i] V_v)   for kept rows (kept[i] != 0), else 0,
  // V_v the four vectors of vectors_s, y the chunk's rows of dout or v, M the state (its parts), x the raw rows;
  // made in place of y M^T an n tile at a time: the four vectors' columns d, d + 1 in two 16-byte loads, the raw
  // rows' pairs in one load each.
  template <FeatureMap F>
  FF_DEVICE void store_gradient(int64_t c, int64_t left, const X& raw, const Y& y, void* grad, float* parts,
                                const float (&rate)[2], const float (&terms)[4][2], const float (&kept)[2]) const {
    for (int d0 = 0; d0 < D; d0 += kColumns) {  // a part at a time: fewer registers (D = 256 fits)
      RowTile<kColumns> P;  // 2^-e y M^T, columns d0 .., then the gradient there
      P.zero();
      State::template rows_times<false>(l, y, s_hi(), s_lo(), P, d0);
      FF_UNROLL
      for (int n = 0; n < kColumns / 8; ++n) {
        const int d = d0 + n * 8 + 2 * l.t;
        const auto vectors = simt::shared_cast<Piece<float>>(vectors_s + 4 * d);
        const Piece<float> v[2] = {vectors[0], vectors[1]};
        FF_UNROLL
        for (int i = 0; i < 2; ++i) {
          const auto [x0, x1] = raw.get_pair(l.row(2 * i), d);
          const float x[2] = {x0, x1};
          FF_UNROLL
          for (int h = 0; h < 2; ++h) {
            float& g = P.acc[n][2 * i + h];
            g = rate[i] * g * unscale;
            FF_UNROLL
            for (int j = 0; j < 4; ++j) {
              g += terms[j][i] * v[h].x[j];
            }
            g = kept[i] != 0.f ? feature_gradient<F, T>(g, x[h]) : 0.f;
          }
        }
      }
      out.template store_d<T, D, kColumns>(l, p, grad, parts, c, d0, left, [&](int n, int e) { return P.acc[n][e]; });
    }
  }

  // The state's tile (p.state) published, the vectors src[i] + eps[i] (null: zeros) in vectors_s and the first
  // three's columns of the thread in `columns`; then body(F, c, stage) for every chunk, F the feature map.
  template <typename Body>
  FF_DEVICE void run(const float* const (&src)[4], const float (&eps)[4], const Body& body) {
    FF_UNROLL
    for (int i = 0; i < kCount; ++i) {
      sums[i] = 0.f;
    }
    State S;
    S.load(l, p.state + vectors_at * D * p.M + out.value_col, p.M);
    FF_UNROLL
    for (int i = 0; i < 4; ++i) {
      for (int d = int(threadIdx.x); d < D; d += kThreads) {
        vectors_s[4 * d + i] = src[i] != nullptr ? simt::load_global(src[i] + vectors_at * D + d) + eps[i] : 0.f;
      }
      if (i < 3) {
        FF_UNROLL
        for (int j = 0; j < kCount; ++j) {
          columns[i][j] = 0.f;
        }
        if (src[i] != nullptr) {
          Rows::load_columns(src[i] + vectors_at * D, eps[i], columns[i]);
        }
      }
    }
    S.publish(l, s_hi(), s_lo(), largest_s);
    unscale = S.unscale();
    portable::with_feature_map(p.feature_map, [&](auto map) {
      walk_chunks(span.chunks(), false,
                  [&](int64_t c, int stage) {
                    load_rows(raw_tile(stage), side.x, side.row_stride(p), c * kChunkRows, span.length);
                    load_rows(y_tile(stage), y, y_stride, c * kChunkRows, span.length);
                  },
                  [&](int64_t c, int stage) { body(map, c, stage); });
    });
  }
};

// Queries: pass 1 (Second = false) dW and dA, pass 2 dq and dK.
template <typename T, int D, int BM, bool Second>
struct QueryGradsBlock : BackwardBlock<T, D, BM> {
  using Base = BackwardBlock<T, D, BM>;
  using typename Base::Rows;
  using Base::l, Base::p, Base::span, Base::row;
  enum Vectors { kSinkSum, kConservedSum, kdB, kdQ };  // K + e, A + e, dB, dQ
  float allocation;
  typename Base::State dW;

  template <FeatureMap F>
  FF_DEVICE void chunk(int64_t c, int stage) {
    const auto raw = this->raw_tile(stage), q = this->feature_tile();
    const auto dout = this->y_tile(stage);
    const int64_t left = span.length - c * kChunkRows;
    this->zero_padded_y(c, stage, left);
    float largest = 0.f;  // pass 1: the largest |g_i q_i| of the thread's pieces (dW's rows, unscaled)
    Rows::Pieces::each([&](int r, int col) {
      const bool kept = this->side.kept(c, r, left);
      float f[Base::kCount];
      Rows::template features<F>(raw, r, col, kept, f);
      const float sink = this->row_dot(f, kSinkSum, p.eps), conserved = this->row_dot(f, kConservedSum, p.eps);
      const float linear = Second ? this->row_dot(f, kdB, 0.f) : 0.f;  // every lane of the row
      this->store_features(r, col, f);
      const float I = kept ? 1.f / sink : 0.f;
      const float a = 1.f / (1.f + FeatureExp<T>{}(-conserved * allocation));
      if constexpr (!Second) {
        FF_UNROLL
        for (int j = 0; j < Base::kCount; ++j) {
          largest = fmaxf(largest, fabsf(f[j]) * (a * I));
        }
      }
      if (col == 0) {
        row(kRate)[r] = a * I;
        row(kSlope)[r] = I * a * (1.f - a) * allocation;
        if constexpr (Second) {  // pass 1 reads the two above only
          row(kKept)[r] = kept ? 1.f : 0.f;
          row(kFlow)[r] = I;
          row(kSource)[r] = a;
          row(kLinear)[r] = linear;
        }
      }
    });
    int e = 0;  // pass 1: 2^-e brings the rows g_i q_i into [-1, 1] (its block maximum's barrier ends the rows)
    if constexpr (!Second) {
      frexpf(block_max(largest, this->largest_s), &e);
    } else {
      __syncthreads();
    }
    RowTile<BM> num;  // 2^-e q W
    num.zero();
    Base::State::template rows_times<true>(l, q, this->s_hi(), this->s_lo(), num);
    float dg[2];  // the tile's share of <q_i^T W, dout_i>
    num.row_dots_with(l, dout, this->unscale, dg);
    if constexpr (!Second) {
      if (l.t == 0) {
        FF_UNROLL
        for (int i = 0; i < 2; ++i) {
          const int r = l.row(2 * i);
          row(kWeight)[r] = dg[i] * row(kSlope)[r];
        }
      }
      __syncthreads();
      this->add_weighted_rows();  // dA
      // dW += q^T (g dout) as (g q)^T dout, the A fragments' k columns (rows i) scaled by g_i 2^-e in registers
      const float down = ldexpf(1.f, -e);
      float weights[kChunkRows / 16][2][2];  // of the lane's rows 16 s + 2 t + 8 h + {0, 1}, k step s
      FF_UNROLL
      for (int s = 0; s < kChunkRows / 16; ++s) {
        FF_UNROLL
        for (int h = 0; h < 2; ++h) {
          const Two<float> g = simt::shared_cast<Two<float>>(row(kRate) + 16 * s + 2 * l.t + 8 * h)[0];
          weights[s][h][0] = g.x0 * down;
          weights[s][h][1] = g.x1 * down;
        }
      }
      dW.add_scaled_product(l, q, dout, e, KeepRows{},
                            [&](Fragment<T>& a, int k0) { scale_k_columns<T>(a, weights[k0 / 16]); });
    } else {
      float rate[2], terms[4][2], kept[2];  // per row: g_i, the coefficients of dq's vector terms, whether it counts
      FF_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int r = l.row(2 * i);
        const float I = row(kFlow)[r];
        const float dI = dg[i] * row(kSource)[r] + (this->first_tile() ? float(row(kLinear)[r]) : 0.f);
        rate[i] = row(kRate)[r];
        terms[kConservedSum][i] = dg[i] * row(kSlope)[r];
        terms[kSinkSum][i] = -dI * I * I;
        terms[kdB][i] = this->first_tile() ? I : 0.f;
        terms[kdQ][i] = this->first_tile() ? 1.f : 0.f;
        kept[i] = row(kKept)[r];
      }
      if (l.t == 0) {  // row(kWeight)'s last readers passed the last chunk's end
        FF_UNROLL
        for (int i = 0; i < 2; ++i) {
          row(kWeight)[l.row(2 * i)] = terms[kSinkSum][i];
        }
      }
      this->template store_gradient<F>(c, left, raw, dout, p.dq, p.dq_parts, rate, terms, kept);
      __syncthreads();  // row(kWeight) written
      this->add_weighted_rows();  // dK
    }
    __syncthreads();  // the stage may be loaded again; the rows' scalars rewritten
  }

  FF_DEVICE void run() {
    dW.load(l, nullptr, 0);
    allocation = simt::load_global(p.allocation + span.batch);
    const float* const src[4] = {p.K, p.A, Second ? p.dB : nullptr, Second ? p.dQ : nullptr};
    Base::run(src, {p.eps, p.eps, 0.f, 0.f},
              [&](auto map, int64_t c, int stage) { chunk<decltype(map)::value>(c, stage); });
    const int64_t shares_at = int64_t(this->out.tile) * p.N * p.segments * p.H * D;
    if constexpr (!Second) {
      dW.store(l, p.dW + this->sums_at * D * p.M + this->out.value_col, p.M);
    }
    this->store_sums(p.shares + shares_at);  // dA, or dK
  }
};

// Keys: pass 1 (Second = false) dv, dB and dQ, pass 2 dk.
template <typename T, int D, int BM, bool Second>
struct KeyGradsBlock : BackwardBlock<T, D, BM> {
  using Base = BackwardBlock<T, D, BM>;
  using typename Base::Rows;
  using Base::l, Base::p, Base::span, Base::row;
  enum Vectors { kSourceSum, kConservedSum, kdA, kdK };  // Q + e, B + e, dA, dK
  float top, scale, total;  // the competition's maximum, S / E, <dW, W> / S
  float dQ[Base::kCount];   // the thread's columns of dQ (tile 0's blocks)

  template <FeatureMap F>
  FF_DEVICE void chunk(int64_t c, int stage) {
    const auto raw = this->raw_tile(stage), k = this->feature_tile();
    const auto v = this->y_tile(stage);
    const int64_t left = span.length - c * kChunkRows;
    this->zero_padded_y(c, stage, left);
    Rows::Pieces::each([&](int r, int col) {
      const bool kept = this->side.kept(c, r, left);
      float f[Base::kCount];
      Rows::template features<F>(raw, r, col, kept, f);
      const float source = this->row_dot(f, kSourceSum, p.eps), conserved = this->row_dot(f, kConservedSum, p.eps);
      const float dO = this->row_dot(f, kdA, 0.f);  // every lane of the row
      this->store_features(r, col, f);
      const float O = kept ? 1.f / source : 0.f;
      if constexpr (!Second) {
        const float w = -dO * O * O;  // 0 where not kept (O = 0)
        FF_UNROLL
        for (int i = 0; i < Base::kCount; ++i) {
          dQ[i] += w * (f[i] + p.eps);
        }
      }
      if (col == 0) {
        const float oh = fminf(fmaxf(conserved, -p.clamp), p.clamp);
        const float rate = kept ? scale * FeatureExp<T>{}(oh - top) : 0.f;
        row(kRate)[r] = rate;
        row(kSlope)[r] = fabsf(conserved) <= p.clamp ? rate : 0.f;
        if constexpr (Second) {  // pass 1 reads the two above only
          row(kKept)[r] = kept ? 1.f : 0.f;
          row(kFlow)[r] = O;
          row(kSource)[r] = kept ? dO : 0.f;
        }
      }
    });
    __syncthreads();
    RowTile<BM> kdW;  // 2^-e k dW
    kdW.zero();
    Base::State::template rows_times<true>(l, k, this->s_hi(), this->s_lo(), kdW);
    float dr[2];  // the tile's share of dc_j, then of dr_j
    kdW.row_dots_with(l, v, this->unscale, dr);
    float rate[2];
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int r = l.row(2 * i);
      rate[i] = row(kRate)[r];
      dr[i] = row(kSlope)[r] * (dr[i] - (this->first_tile() ? total : 0.f));
    }
    if constexpr (!Second) {
      this->out.template store_v<T, BM>(l, p, p.dv, c, left,
                                        [&](int n, int e) { return rate[e / 2] * kdW.acc[n][e] * this->unscale; });
      if (l.t == 0) {
        FF_UNROLL
        for (int i = 0; i < 2; ++i) {
          row(kWeight)[l.row(2 * i)] = dr[i];
        }
      }
      __syncthreads();  // row(kWeight) written
      this->add_weighted_rows();  // dB
    } else {
      float terms[4][2], kept[2];  // per row: the coefficients of dk's vector terms, whether it counts
      FF_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int r = l.row(2 * i);
        const float O = row(kFlow)[r];
        terms[kConservedSum][i] = dr[i];
        terms[kdA][i] = this->first_tile() ? O : 0.f;
        terms[kSourceSum][i] = this->first_tile() ? -row(kSource)[r] * O * O : 0.f;
        terms[kdK][i] = this->first_tile() ? 1.f : 0.f;
        kept[i] = row(kKept)[r];
      }
      this->template store_gradient<F>(c, left, raw, v, p.dk, p.dk_parts, rate, terms, kept);
    }
    __syncthreads();  // the stage may be loaded again; the rows' scalars rewritten
  }

  FF_DEVICE void run() {
    FF_UNROLL
    for (int i = 0; i < Base::kCount; ++i) {
      dQ[i] = 0.f;
    }
    top = simt::load_global(p.max + this->vectors_at);
    scale = simt::load_global(p.scale + this->vectors_at);
    total = simt::load_global(p.total + this->vectors_at);
    const float* const src[4] = {p.Q, p.B, p.dA, Second ? p.dK : nullptr};
    Base::run(src, {p.eps, p.eps, 0.f, 0.f},
              [&](auto map, int64_t c, int stage) { chunk<decltype(map)::value>(c, stage); });
    if constexpr (!Second) {
      const int64_t shares_at = int64_t(this->out.tile) * p.N * p.segments * p.H * D;
      this->store_sums(p.shares + shares_at);  // dB
      if (this->first_tile()) {  // the block's uniform choice
        __syncthreads();  // the column sums' scratch read
        Rows::store_column_sums(dQ, simt::shared_cast<float>(this->tiles), p.dQ_sums + this->sums_at * D);
      }
    }
  }
};

template <typename T, int D, int BM>
FF_DEVICE BackwardBlock<T, D, BM> backward_block(const NoncausalBackwardParams& p, const BlockPlace& at,
                                                 const void* y, const int64_t (&y_stride)[3], simt::shared_ptr<T> tiles,
                                                 simt::shared_ptr<float> vectors_s, simt::shared_ptr<float> rows_s,
                                                 simt::shared_ptr<float> largest_s) {
  return {p,
          at.span,
          SideRows<T>::of(p, at),
          at.span.rows<T>(y, y_stride, at.head) + at.value_col,
          y_stride[2],
          {at.rows_at(p), at.value_col, at.value_col / BM},
          int64_t(at.sequence) * p.H + at.head,
          int64_t(at.unit) * p.H + at.head,
          Lane::of(int(threadIdx.x)),
          tiles,
          vectors_s,
          rows_s,
          largest_s,
          {},
          {},
          1.f};
}

#define FF_BACKWARD_SHARED(D)                                     \
  FF_DYNAMIC_SHARED(T, tiles);                                     \
  FF_SHARED(float, vectors_s, 4 * (D));                            \
  FF_SHARED(float, rows_s, kBackwardRowScalars * kChunkRows);      \
  FF_SHARED(float, largest_s, kWarps);                             \
  static_assert(4 * (D) + kBackwardRowScalars * kChunkRows + kWarps == noncausal_backward_static_floats(D), \
                "the static shared memory the host counts");       \
  const BlockPlace at = BlockPlace::of<BM>(p, p)

// At least one block a multiprocessor, as the forward's passes.
template <typename T, int D, int BM, bool Second>
__global__ void __launch_bounds__(kThreads, 1) flow_query_grads_kernel(NoncausalBackwardParams p) {
  FF_BACKWARD_SHARED(D);
  QueryGradsBlock<T, D, BM, Second> block{
      backward_block<T, D, BM>(p, at, p.dout, p.dout_stride, tiles, vectors_s, rows_s, largest_s), 0.f, {}};
  block.run();
}

template <typename T, int D, int BM, bool Second>
__global__ void __launch_bounds__(kThreads, 1) flow_key_grads_kernel(NoncausalBackwardParams p) {
  FF_BACKWARD_SHARED(D);
  KeyGradsBlock<T, D, BM, Second> block{
      backward_block<T, D, BM>(p, at, p.v, p.v_stride, tiles, vectors_s, rows_s, largest_s), 0.f, 0.f, 0.f, {}};
  block.run();
}
#undef FF_BACKWARD_SHARED

template <int D>
void QueryGrads<D>::run(const NoncausalBackwardParams& p, void* stream) {
  launch_value_tiles<D, ValueTiles<D, chunk::backward_value_tile>>(
      p, p.second ? "flow_query_grads_2" : "flow_query_grads_1", "flow_attention_backward", stream,
      [&](auto type, auto tile) {
        using T = decltype(type);
        constexpr int BM = decltype(tile)::value;
        const auto kernel =
            p.second ? &flow_query_grads_kernel<T, D, BM, true> : &flow_query_grads_kernel<T, D, BM, false>;
        return std::pair{kernel, BackwardBlock<T, D, BM>::kSharedElements * sizeof(T)};
      });
}

template <int D>
void KeyGrads<D>::run(const NoncausalBackwardParams& p, void* stream) {
  launch_value_tiles<D, ValueTiles<D, chunk::backward_value_tile>>(
      p, p.second ? "flow_key_grads_2" : "flow_key_grads_1", "flow_attention_backward", stream,
      [&](auto type, auto tile) {
        using T = decltype(type);
        constexpr int BM = decltype(tile)::value;
        const auto kernel = p.second ? &flow_key_grads_kernel<T, D, BM, true> : &flow_key_grads_kernel<T, D, BM, false>;
        return std::pair{kernel, BackwardBlock<T, D, BM>::kSharedElements * sizeof(T)};
      });
}

}  // namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD
