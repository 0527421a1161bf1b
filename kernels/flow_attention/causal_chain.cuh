// Causal Flow-Attention, backward, pass 3: the chain of scalars (DESIGN.md, "Causal backward"), after the queries
// pass (its records and dg and dq's shares) and the keys pass (dc and dk's shares). One block a
// (sequence, head) walks the chunks from the last, carrying the reverse sums RA, RB, RK, RQ (D floats each,
// seeded by the final state's dA, dB, dK, dQ) and the competition's (P, m_next). For the chunk's rows t:
//   dsink_t = dg_t I_t a_t (1 - a_t) / n_t^2
//   P_t = dc_t c_t / E_t + exp(m_t - m_{t+1}) P_{t+1}       an affine scan in reverse (every warp the chunk)
//   dr_t = (dc_t c_t - c_t E_t P_t / n_t [+ dm - d lse at the largest source]) / n_t where |r_t| <= clamp
//   dI_t = dg_t a_t / n_t + <RB, q_t> + ((F o upper) dr)_t + e s(q_t) sum_{j>=t} dr_j,  F = q k^T   mma
//   dO_t = <RA, k_t> + ((F^T o upper) dsink)_t + e s(k_t) sum_{j>=t} dsink_j                        mma
//   du_t = -dI_t I_t^2 / n_t, dy_t = -dO_t O_t^2 / n_t
//   dq = dq_S + Z k + dsink (A0 + e) + I RB + du (K0 + e) + RQ + e (I sum_{j>=t} dr_j + sum_{j>=t} dy_j)
//   dk = dk_c + Y q + dr (B0 + e) + O RA + RK + dy (Q0 + e) + e (O sum_{j>=t} dsink_j + sum_{j>=t} du_j)
//     Z_tj = [j <= t] (dsink_t O_j + du_t) + [j >= t] (I_t dr_j + dy_j)                            mma
//     Y_tj = [j <= t] (dr_t I_j + dy_t) + [j >= t] (O_t dsink_j + du_j)                            mma
//   then phi' of the raw rows; RA += q^T dsink, RB += k^T dr, RK += q^T du, RQ += k^T dy (+ e times the
//   weights' sums)                                                                                 mma
// (A0, K0, B0, Q0: the forward's sums at the chunk's start, from the queries pass.) At the sequence's start the
// incoming state's gradients: dK, dQ, dA, dB = RK, RQ, RA, RB, d lse_0 = -E_0 exp(m_0 - m_next) P, dm_0 = d lse_0
// (+ dm - d lse where no source passes m_0), dE_0 = d lse_0 / E_0, dn_0 = 0. Padded rows: zero features and
// weights, gradients 0. Five barriers a chunk. The passes' value tiles' shares come added (the host adds them in
// tile order): a loop over the tiles inside dq's and dk's stores made nvcc keep the walk's invariants in local
// memory. The split schedule (ChainPass) walks each segment from its carries after it: the competition's level
// scans P alone (the records read, two barriers a chunk), the vectors' levels skip dq and dk.
#pragma once

#include "flow_attention/blocks.cuh"

#include <algorithm>

namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD {

// The chain's per-row values in shared memory, kChunkRows floats each: the queries pass's records (CausalRowScalar
// order), then the shares' sums, the valid flag, the weights the chain makes and their sums over the rows j >= t
// (dr's and dsink's over the chunk, du's and dy's over the warp's rows).
enum ChainRow : int { chain_dg = kCausalRowScalars, chain_dc, chain_valid, chain_dsink, chain_dr, chain_du, chain_dy,
                      chain_dsink_after, chain_dr_after, chain_du_after_in_warp, chain_dy_after_in_warp,
                      kChainRows };
static_assert(kChainRows == kCausalChainRowFields, "the rows causal_backward_block_bytes (fused_kernels.h) sizes");

template <typename T, int D>
struct CausalChainBlock {
  using Rows = ChunkTile<T, D>;
  using Vectors = SharedMatrix<T, D, 16>;  // [RB_hi RB_lo 1 0 0 0 0 0 | RA_hi RA_lo 1 0 0 0 0 0]
  using Weights = ChunkTile<T, 16>;        // [dsink du | dr dy] as 2^-e parts: hi, lo each
  // dq and dk a part of columns at a time, the scores built once a part (a part's accumulators beside a score
  // tile): 16-bit D <= 64 whole, wider 16-bit heads 32 columns, float 16 (more made nvcc spill)
  static constexpr int kColumns = std::min(gradient_columns(D, sizeof(T)), sizeof(T) == 4 ? 16 : D <= 64 ? 64 : 32);
  static constexpr bool kHalf = std::is_same_v<T, simt::half>;
  static constexpr int kStages = causal_chain_stages(D, sizeof(T));
  static constexpr int kTiles = 2 * kStages + 2;  // raw q and k (each its stages), q's and k's features
  static constexpr std::size_t kSharedElements = kTiles * Rows::kSize + Vectors::kSize + Weights::kSize;
  static_assert(kSharedElements == causal_chain_elements(D, sizeof(T)), "the layout the host sizes");

  const CausalChainParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;
  const T *q, *k;      // the span's first raw row
  const bool* pad;     // the span's first padding flag, or nullptr
  int64_t rows_at;     // the span's first row in (B H L) rows
  int64_t first_slot;  // chunk_starts' slot of the span's first chunk
  Lane l;
  simt::shared_ptr<T> tiles;
  simt::shared_ptr<float> vectors_s;  // RA, RB, RK, RQ, then the chunk's A0, K0, B0, Q0 (plus e where added)
  simt::shared_ptr<float> rows_s;     // kChainRows x kChunkRows
  simt::shared_ptr<float> largest_s;  // the weights' largest magnitudes and sums, 8 a warp
  float P, m_next;                    // the competition's scan after the chunk
  float dm_source;                    // dm - d lse_L, carried by the largest source's first row
  int64_t source_row;                 // that row in the span, or -1 where the final m is no source's
  float unscale[2];                   // 2^e of RB's and RA's published parts

  // The span's sequence, its (sequence, head)'s offset in (N, H, size) states and its (unit, head)'s in (N G, H,
  // size) carries: made again where used from the launch's indices, not kept through the walk (registers).
  FF_DEVICE SequenceSpan sequence() const {
    return SequenceSpan::of(p.cu_seqlens, BlockPlace::of_unit(p, p).sequence, p.L);
  }
  FF_DEVICE int64_t unit_at() const {
    return (int64_t(blockIdx.x) * p.H + blockIdx.y) * RecurrentState{p.D, p.M}.size();
  }
  FF_DEVICE int64_t sequence_at() const {
    return (int64_t(BlockPlace::of_unit(p, p).sequence) * p.H + blockIdx.y) * RecurrentState{p.D, p.M}.size();
  }

  // The final state's gradient (N, H, size), or nullptr; the incoming state's E and m (m = -inf where E = 0) and
  // the final state's dm, dE (zeros without a gradient).
  FF_DEVICE const float* final_gradient() const {
    return p.dstate_final != nullptr ? p.dstate_final + sequence_at() : nullptr;
  }
  struct Ends {
    float E0, m0, dm, dE;
  };
  FF_DEVICE Ends state_ends(const RecurrentState& layout) const {
    const float* fin = final_gradient();
    const float* s0 = p.state0 != nullptr ? p.state0 + sequence_at() : nullptr;
    const float E0 = s0 != nullptr ? simt::load_global(s0 + layout.E()) : 0.f;
    return {E0, E0 > 0.f ? simt::load_global(s0 + layout.m()) : -INFINITY,
            fin != nullptr ? simt::load_global(fin + layout.m()) : 0.f,
            fin != nullptr ? simt::load_global(fin + layout.E()) : 0.f};
  }

  FF_DEVICE Rows raw_q(int stage) const { return {tiles + stage * Rows::kSize}; }
  FF_DEVICE Rows raw_k(int stage) const { return {tiles + (kStages + stage) * Rows::kSize}; }
  FF_DEVICE Rows q_features() const { return {tiles + 2 * kStages * Rows::kSize}; }
  FF_DEVICE Rows k_features() const { return {tiles + (2 * kStages + 1) * Rows::kSize}; }
  FF_DEVICE Vectors x_parts() const { return {tiles + kTiles * Rows::kSize}; }
  FF_DEVICE Weights weights() const { return {tiles + kTiles * Rows::kSize + Vectors::kSize}; }
  FF_DEVICE simt::shared_ptr<float> field(int f) const { return rows_s + f * kChunkRows; }
  FF_DEVICE simt::shared_ptr<float> vector(int v) const { return vectors_s + v * D; }  // RA RB RK RQ A0 K0 B0 Q0

  FF_DEVICE void load_chunk(int64_t c, int stage) const {
    if (p.pass == ChainPass::competition) {  // the records alone
      return;
    }
    load_rows(raw_q(stage), q, p.q_stride[2], c * kChunkRows, span.length);
    load_rows(raw_k(stage), k, p.k_stride[2], c * kChunkRows, span.length);
  }

  // RB's and RA's parts for the products with q and k (after a barrier that ended the writes of vectors_s).
  FF_DEVICE void publish_vectors() {
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {  // RB (q's side), RA (k's)
      const simt::shared_ptr<float> x = vector(i == 0 ? 1 : 0);
      float largest = 0.f;
      for (int d = l.lane; d < D; d += 32) {
        largest = fmaxf(largest, fabsf(x[d]));
      }
      int exponent = 0;
      const float top = warp_max(largest);
      if (kHalf && top >= 16384.f) {
        frexpf(fminf(top, 3.0e38f), &exponent);
        exponent -= 14;
      }
      unscale[i] = ldexpf(1.f, exponent);
    }
    for (int d = int(threadIdx.x); d < D; d += kThreads) {
      FF_UNROLL
      for (int i = 0; i < 2; ++i) {
        set_parts(x_parts(), d, 8 * i, split_parts<T>(vector(i == 0 ? 1 : 0)[d] / unscale[i]), Parts{1.f, 0.f});
      }
    }
  }

  // Row r's columns c0 .. c0 + 7 of an operand of parts: [x hi, x lo, y hi, y lo, 0, 0, 0, 0], in 16-byte pieces
  // (16-bit rows of 48 bytes: no bank conflicts).
  template <typename Matrix>
  FF_DEVICE static void set_parts(const Matrix& m, int r, int c0, const Parts& x, const Parts& y) {
    constexpr int kCount = Piece<T>::kCount;
    FF_UNROLL
    for (int c = 0; c < 8; c += kCount) {
      Piece<T> piece;
      FF_UNROLL
      for (int j = 0; j < kCount / 2; ++j) {
        const int pair = c / 2 + j;
        piece.set_pair(j, pair == 0 ? x.hi : pair == 1 ? y.hi : 0.f, pair == 0 ? x.lo : pair == 1 ? y.lo : 0.f);
      }
      m.set_piece(r, c0 + c, piece);
    }
  }

  // The chunk's records, the shares' sums of dg and dc, the valid flags and A0, K0, B0, Q0.
  FF_DEVICE void load_records(int64_t c, int64_t left, const bool* pad_rows) const {
    const int64_t all = input_rows(p), at = rows_at + c * kChunkRows;
    for (int i = int(threadIdx.x); i < kCausalRowScalars * kChunkRows; i += kThreads) {
      const int f = i / kChunkRows, r = i % kChunkRows;
      rows_s[i] = r < left ? simt::load_global(p.rows + f * all + at + r) : 0.f;
    }
    for (int r = int(threadIdx.x); r < kChunkRows; r += kThreads) {
      field(chain_dg)[r] = r < left ? simt::load_global(p.dg_shares + at + r) : 0.f;
      field(chain_dc)[r] = r < left ? simt::load_global(p.dc_shares + at + r) : 0.f;
      field(chain_valid)[r] = r < left && (pad_rows == nullptr || !simt::load_global(pad_rows + r)) ? 1.f : 0.f;
    }
    const float* start = p.chunk_starts + (first_slot + c) * 4 * D;  // K, Q, A, B
    for (int d = int(threadIdx.x); d < D; d += kThreads) {
      vector(4)[d] = simt::load_global(start + 2 * D + d) + p.eps;  // A0 + e
      vector(5)[d] = simt::load_global(start + d) + p.eps;          // K0 + e
      vector(6)[d] = simt::load_global(start + 3 * D + d) + p.eps;  // B0 + e
      vector(7)[d] = simt::load_global(start + D + d) + p.eps;      // Q0 + e
    }
  }

  // The competition's scan over the chunk's rows in reverse (every warp the whole chunk: lane j the rows 2j,
  // 2j + 1), then dsink and dr (warp 0 writes them). P_t = b_t + f_t P_{t+1}: rows past the span pass P on.
  FF_DEVICE void competition(int64_t c, int64_t left) {
    struct Affine {  // P = b + f P_next
      float b, f;
      FF_DEVICE Affine then(const Affine& next) const { return {b + f * next.b, f * next.f}; }  // this, then next's
    };
    const int r0 = 2 * l.lane;
    Affine row[2];
    float x[2];
    FF_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int r = r0 + e;
      const float m = field(row_m)[r];
      const float m_after = r + 1 < left && r + 1 < kChunkRows ? float(field(row_m)[r + 1]) : m_next;
      x[e] = field(chain_dc)[r] * field(row_c)[r];
      const bool valid = field(chain_valid)[r] != 0.f;
      row[e] = r >= left ? Affine{0.f, 1.f}
                         : Affine{valid ? x[e] / field(row_E)[r] : 0.f, m == -INFINITY ? 0.f : expf(m - m_after)};
    }
    Affine suffix = row[0].then(row[1]);  // lanes j .. 31, inclusive
    FF_UNROLL
    for (int offset = 1; offset < 32; offset *= 2) {
      const Affine after{__shfl_down_sync(0xffffffffu, suffix.b, offset),
                         __shfl_down_sync(0xffffffffu, suffix.f, offset)};
      if (l.lane + offset < 32) {
        suffix = suffix.then(after);
      }
    }
    Affine later{__shfl_down_sync(0xffffffffu, suffix.b, 1), __shfl_down_sync(0xffffffffu, suffix.f, 1)};
    if (l.lane == 31) {
      later = {0.f, 1.f};
    }
    const float P2 = later.b + later.f * P;  // P at row r0 + 2
    const float Pt[2] = {row[0].b + row[0].f * (row[1].b + row[1].f * P2), row[1].b + row[1].f * P2};
    if (l.warp == 0) {
      FF_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int r = r0 + e;
        const bool valid = field(chain_valid)[r] != 0.f;
        const float n = fmaxf(field(row_n)[r], 1.f), I = field(row_I)[r], a = field(row_a)[r];
        const float c_t = field(row_c)[r];
        float source = x[e] - c_t * field(row_E)[r] * Pt[e] / n;
        if (c * kChunkRows + r == source_row) {
          source += dm_source;
        }
        field(chain_dsink)[r] = valid ? field(chain_dg)[r] * I * a * (1.f - a) / (n * n) : 0.f;
        field(chain_dr)[r] = valid && fabsf(field(row_r)[r]) <= p.clamp ? source / n : 0.f;
      }
    }
    P = __shfl_sync(0xffffffffu, Pt[0], 0);
    m_next = field(row_m)[0];
  }

  // sum_{j >= t} s_tj x_j (dot) and sum_{j >= t} x_j (sum) for this lane's rows t, x the keys' values (key pairs).
  FF_DEVICE void suffix_dots(const RowTile<kChunkRows>& s, const float (&x)[kChunkRows / 8][2], float (&dot)[2],
                             float (&sum)[2]) const {
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = l.row(2 * i);
      dot[i] = sum[i] = 0.f;
      FF_UNROLL
      for (int n = 0; n < kChunkRows / 8; ++n) {
        FF_UNROLL
        for (int e = 0; e < 2; ++e) {
          if (n * 8 + 2 * l.t + e >= row) {
            dot[i] += s.acc[n][2 * i + e] * x[n][e];
            sum[i] += x[n][e];
          }
        }
      }
      FF_UNROLL
      for (int offset = 1; offset < 4; offset *= 2) {
        dot[i] += __shfl_xor_sync(0xffffffffu, dot[i], offset);
        sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], offset);
      }
    }
  }

  FF_DEVICE float row_value(int f, int i) const { return field(f)[l.row(2 * i)]; }

  // dI, dO, then du and dy (to shared memory, lanes t = 0, with the rows' sums after them) and the warps' largest
  // |dsink|, |du|, |dr|, |dy| and their sums.
  FF_DEVICE void flow_gradients() const {
    const Rows qf = q_features(), kf = k_features();
    float dr_dot[2], dr_sum[2], sink_dot[2], sink_sum[2], qRB[2], kRA[2], sq[2], sk[2];
    FF_UNROLL
    for (int side = 0; side < 2; ++side) {  // one score tile at a time: F = q k^T, then F^T = k q^T
      const Rows x = side == 0 ? qf : kf, y = side == 0 ? kf : qf;
      Scores<false> scores;   // the warp's rows, the keys j >= t
      RowTile<8> vector_dots;  // x [RB ..] or x [RA ..] (2^-e parts; column 2: s(x))
      scores.s.zero();
      vector_dots.zero();
      for (int k0 = 0; k0 < D; k0 += 16) {
        Fragment<T> a;
        x.template a_fragment<true>(a, l, l.warp * 16, k0);
        scores.add_step(l, a, y, k0);
        vector_dots.template add_step<true>(l, a, x_parts(), k0, 8 * side);
      }
      float keys[kChunkRows / 8][2];
      Scores<false>::key_pairs(l, field(side == 0 ? chain_dr : chain_dsink), keys);
      suffix_dots(scores.s, keys, side == 0 ? dr_dot : sink_dot, side == 0 ? dr_sum : sink_sum);
      FF_UNROLL
      for (int i = 0; i < 2; ++i) {
        const float dot =
            (quad_column(l, vector_dots.acc[0], 0, i) + quad_column(l, vector_dots.acc[0], 1, i)) * unscale[side];
        (side == 0 ? qRB : kRA)[i] = dot;
        (side == 0 ? sq : sk)[i] = quad_column(l, vector_dots.acc[0], 2, i);
      }
    }
    const float e = p.eps;
    float largest[4] = {0.f, 0.f, 0.f, 0.f};  // |dsink|, |du|, |dr|, |dy|
    float du_rows[2], dy_rows[2];
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const bool valid = row_value(chain_valid, i) != 0.f;
      const float n = fmaxf(row_value(row_n, i), 1.f), I = row_value(row_I, i), O = row_value(row_O, i);
      const float dg_part = row_value(chain_dg, i) * row_value(row_a, i) / n;
      const float dI = valid ? dg_part + qRB[i] + dr_dot[i] + e * sq[i] * dr_sum[i] : 0.f;
      const float dO = valid ? kRA[i] + sink_dot[i] + e * sk[i] * sink_sum[i] : 0.f;
      const float du = -dI * I * I / n, dy = -dO * O * O / n;
      du_rows[i] = du;
      dy_rows[i] = dy;
      largest[0] = fmaxf(largest[0], fabsf(row_value(chain_dsink, i)));
      largest[1] = fmaxf(largest[1], fabsf(du));
      largest[2] = fmaxf(largest[2], fabsf(row_value(chain_dr, i)));
      largest[3] = fmaxf(largest[3], fabsf(dy));
    }
    float du_after[2] = {du_rows[0], du_rows[1]}, dy_after[2] = {dy_rows[0], dy_rows[1]};
    warp_row_suffix(l, du_after);
    warp_row_suffix(l, dy_after);
    if (l.t == 0) {
      FF_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int row = l.row(2 * i);
        field(chain_du)[row] = du_rows[i];
        field(chain_dy)[row] = dy_rows[i];
        field(chain_dsink_after)[row] = sink_sum[i];
        field(chain_dr_after)[row] = dr_sum[i];
        field(chain_du_after_in_warp)[row] = du_after[i];
        field(chain_dy_after_in_warp)[row] = dy_after[i];
      }
    }
    FF_UNROLL
    for (int v = 0; v < 4; ++v) {  // the warp's largest and its sum (a row's value in its lane t = 0)
      const float m = warp_max(largest[v]);
      const int f = v == 0 ? chain_dsink : v == 1 ? chain_du : v == 2 ? chain_dr : chain_dy;
      float sum = 0.f;
      if (l.t == 0) {
        sum = v == 1 ? du_rows[0] + du_rows[1] : v == 3 ? dy_rows[0] + dy_rows[1] : row_value(f, 0) + row_value(f, 1);
      }
      FF_UNROLL
      for (int offset = 16; offset > 0; offset /= 2) {
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      }
      if (l.lane == 0) {
        largest_s[8 * l.warp + v] = m;
        largest_s[8 * l.warp + 4 + v] = sum;
      }
    }
  }

  // The weights' 2^-e parts for the vectors' thin products (after the barrier that ended flow_gradients): the
  // exponents of the block's largest magnitudes, in `exponents`.
  FF_DEVICE void publish_weights(int (&exponents)[4]) const {
    FF_UNROLL
    for (int v = 0; v < 4; ++v) {
      float m = 0.f;
      FF_UNROLL
      for (int w = 0; w < kWarps; ++w) {
        m = fmaxf(m, largest_s[8 * w + v]);
      }
      exponents[v] = 0;
      frexpf(fminf(m, 3.0e38f), &exponents[v]);
    }
    const int fields[4] = {chain_dsink, chain_du, chain_dr, chain_dy};
    for (int r = int(threadIdx.x); r < kChunkRows; r += kThreads) {
      Parts part[4];
      FF_UNROLL
      for (int v = 0; v < 4; ++v) {
        part[v] = split_parts<T>(ldexpf(field(fields[v])[r], -exponents[v]));
      }
      set_parts(weights(), r, 0, part[0], part[1]);
      set_parts(weights(), r, 8, part[2], part[3]);
    }
  }

  // dq (Side 0) or dk (Side 1) of the chunk: the two triangles of Z or Y times k or q, the shares, the vectors'
  // terms and phi' of the raw rows.
  template <int Side>
  FF_DEVICE void store_gradient(int64_t c, int stage, int64_t left) const {
    // Side 0: weights on the rows (dsink, du | I, 1), keys (O, 1 | dr, dy); vectors A0, RB, K0, RQ
    // Side 1: rows (dr, dy | O, 1), keys (I, 1 | dsink, du); vectors B0, RA, RK, Q0
    const int row_lower = Side == 0 ? chain_dsink : chain_dr, row_const = Side == 0 ? chain_du : chain_dy;
    const int row_upper = Side == 0 ? row_I : row_O;
    const int key_lower = Side == 0 ? row_O : row_I;
    const int key_upper = Side == 0 ? chain_dr : chain_dsink, key_const = Side == 0 ? chain_dy : chain_du;
    // e (w_upper_t sum_{j>=t} upper keys + sum_{j>=t} constant keys): the constant keys' sums over the later warps'
    // rows are their totals (the warps' sums after their largest)
    const int upper_after = Side == 0 ? chain_dr_after : chain_dsink_after;
    const int const_after = Side == 0 ? chain_dy_after_in_warp : chain_du_after_in_warp;
    const int const_total = Side == 0 ? 3 : 1;
    float later_warps = 0.f;
    for (int w = l.warp + 1; w < kWarps; ++w) {
      later_warps += largest_s[8 * w + 4 + const_total];
    }
    float w_lower[2], w_const[2], w_upper[2], valid[2], eps_term[2];
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      w_lower[i] = row_value(row_lower, i);
      w_const[i] = row_value(row_const, i);
      w_upper[i] = row_value(row_upper, i);
      valid[i] = row_value(chain_valid, i);
      eps_term[i] = p.eps * (w_upper[i] * row_value(upper_after, i) + row_value(const_after, i) + later_warps);
    }
    const Rows other = Side == 0 ? k_features() : q_features(), raw = Side == 0 ? raw_q(stage) : raw_k(stage);
    // the vectors times the rows' weights: dq: (A0 + e) dsink + RB I + (K0 + e) du + RQ; dk: (B0 + e) dr + RA O + (Q0
    // + e) dy + RK
    const simt::shared_ptr<float> of_lower = vector(Side == 0 ? 4 : 6), of_upper = vector(Side == 0 ? 1 : 0),
                                  of_const = vector(Side == 0 ? 5 : 7), alone = vector(Side == 0 ? 3 : 2);
    const float* shares = Side == 0 ? p.dq_shares : p.dk_shares;
    const GradientRows out{rows_at, 0, 0};
    for (int d0 = 0; d0 < D; d0 += kColumns) {  // a part of the gradient at a time; the scores built again
      RowTile<kColumns> acc;  // Z k or Y q
      {
        // Z or Y whole, one tile: keys j <= t w_lower_t x_j + w_const_t, keys j >= t w_upper_t y_j + z_j (both
        // at j = t)
        RowTile<kChunkRows> scores;
        float lower[kChunkRows / 8][2], upper[kChunkRows / 8][2], consts[kChunkRows / 8][2];
        Scores<true>::key_pairs(l, field(key_lower), lower);
        Scores<false>::key_pairs(l, field(key_upper), upper);
        Scores<false>::key_pairs(l, field(key_const), consts);
        FF_UNROLL
        for (int n = 0; n < kChunkRows / 8; ++n) {
          FF_UNROLL
          for (int el = 0; el < 4; ++el) {
            const int row = l.row(el), key = n * 8 + l.col(el), i = el / 2, e = el % 2;
            scores.acc[n][el] = (key <= row ? w_lower[i] * lower[n][e] + w_const[i] : 0.f) +
                                (key >= row ? w_upper[i] * upper[n][e] + consts[n][e] : 0.f);
          }
        }
        const float fit = scores.template fit<T>();  // a power of two: the rescaling is exact
        acc.zero();
        scores.template times<T>(l, other, fit, acc, d0, [](int) { return true; });
        acc.scale(1.f / fit);
      }
      FF_UNROLL
      for (int n = 0; n < kColumns / 8; ++n) {  // the vectors' terms, each column pair read once
        const int col = d0 + n * 8 + 2 * l.t;
        const auto pair = [&](const simt::shared_ptr<float>& v) { return simt::shared_cast<Two<float>>(v + col)[0]; };
        const Two<float> lower = pair(of_lower), upper = pair(of_upper), konst = pair(of_const), own = pair(alone);
        FF_UNROLL
        for (int i = 0; i < 2; ++i) {
          acc.acc[n][2 * i] +=
              w_lower[i] * lower.x0 + w_upper[i] * upper.x0 + w_const[i] * konst.x0 + own.x0 + eps_term[i];
          acc.acc[n][2 * i + 1] +=
              w_lower[i] * lower.x1 + w_upper[i] * upper.x1 + w_const[i] * konst.x1 + own.x1 + eps_term[i];
        }
      }
      out.template store_d_through_feature<T, D, kColumns>(
          l, p, Side == 0 ? p.dq : p.dk, nullptr, c, d0, left, [&](int n, int el, const auto& through) {
            const int row = l.row(el), col = d0 + n * 8 + l.col(el), i = el / 2;
            const float share = simt::load_global(shares + (rows_at + c * kChunkRows + row) * D + col);
            return through(valid[i] != 0.f ? acc.acc[n][el] + share : 0.f, raw.get(row, col));
          });
    }
  }

  // RA += q^T dsink + e sum dsink, RB += k^T dr + e sum dr, RK += q^T du + e sum du, RQ += k^T dy + e sum dy.
  FF_DEVICE void add_to_vectors(const int (&exponents)[4]) const {
    const Rows qf = q_features(), kf = k_features();
    float eps_sums[4] = {0.f, 0.f, 0.f, 0.f};  // e sum dsink, e sum dr, e sum du, e sum dy (RA, RB, RK, RQ)
    FF_UNROLL
    for (int w = 0; w < kWarps; ++w) {
      eps_sums[0] += p.eps * largest_s[8 * w + 4];
      eps_sums[1] += p.eps * largest_s[8 * w + 6];
      eps_sums[2] += p.eps * largest_s[8 * w + 5];
      eps_sums[3] += p.eps * largest_s[8 * w + 7];
    }
    for (int u = l.warp; u < D / 16; u += kWarps) {
      RowTile<8> qt, kt;  // q^T [dsink du], k^T [dr dy] (2^-e parts)
      qt.zero();
      kt.zero();
      for (int k0 = 0; k0 < kChunkRows; k0 += 16) {
        Fragment<T> a;
        qf.template a_fragment<false>(a, l, u * 16, k0);
        qt.template add_step<true>(l, a, weights(), k0, 0);
        kf.template a_fragment<false>(a, l, u * 16, k0);
        kt.template add_step<true>(l, a, weights(), k0, 8);
      }
      FF_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int d = u * 16 + l.g + 8 * i;
        const auto pair = [&](const float(&tile)[4], int col, int e) {  // hi + lo parts at columns col, col + 1
          return (quad_column(l, tile, col, i) + quad_column(l, tile, col + 1, i)) * ldexpf(1.f, exponents[e]);
        };
        const float added[4] = {pair(qt.acc[0], 0, 0), pair(kt.acc[0], 0, 2), pair(qt.acc[0], 2, 1),
                                pair(kt.acc[0], 2, 3)};
        if (l.t == 0) {
          FF_UNROLL
          for (int v = 0; v < 4; ++v) {  // RA, RB, RK, RQ
            const float before = vector(v)[d];
            vector(v)[d] = before + added[v] + eps_sums[v];
          }
        }
      }
    }
  }

  FF_DEVICE void chunk(int64_t c, int stage) {
    const int64_t left = span.length - c * kChunkRows;
    const bool* pad_rows = pad != nullptr ? pad + c * kChunkRows : nullptr;
    if (p.pass != ChainPass::competition) {
      apply_feature_map(p.feature_map, raw_q(stage), q_features(), left, pad_rows);
      apply_feature_map(p.feature_map, raw_k(stage), k_features(), left, pad_rows);
    }
    load_records(c, left, pad_rows);
    __syncthreads();
    competition(c, left);
    __syncthreads();  // dsink, dr written
    if (p.pass == ChainPass::competition) {
      return;
    }
    flow_gradients();
    __syncthreads();  // du, dy and the warps' largest written
    int exponents[4];
    publish_weights(exponents);
    if (p.pass == ChainPass::gradients) {
      store_gradient<0>(c, stage, left);
      store_gradient<1>(c, stage, left);
    }
    __syncthreads();  // the weights' parts written; the vectors read
    add_to_vectors(exponents);
    __syncthreads();  // the stage may be loaded again; the rows' values, the vectors rewritten
    publish_vectors();
  }

  FF_DEVICE void run() {
    const RecurrentState layout{p.D, p.M};
    const SequenceSpan whole = sequence();
    const float* fin = final_gradient();
    const float* after = p.carries_after != nullptr ? p.carries_after + unit_at() : nullptr;
    const float* from = after != nullptr ? after : fin;
    for (int d = int(threadIdx.x); d < D; d += kThreads) {  // RA, RB, RK, RQ from the final state's dA, dB, dK, dQ
      vector(0)[d] = from != nullptr ? simt::load_global(from + layout.A() + d) : 0.f;
      vector(1)[d] = from != nullptr ? simt::load_global(from + layout.B() + d) : 0.f;
      vector(2)[d] = from != nullptr ? simt::load_global(from + layout.K() + d) : 0.f;
      vector(3)[d] = from != nullptr ? simt::load_global(from + layout.Q() + d) : 0.f;
    }
    const Ends ends = state_ends(layout);
    const float E0 = ends.E0, m0 = ends.m0, dm = ends.dm, dE = ends.dE;
    // The final state's competition, from the sequence's last row's records.
    const int64_t all = input_rows(p), offset = span.first - whole.first, first = rows_at - offset;
    const int64_t last = first + whole.length - 1;
    const float n_L = whole.length > 0 ? simt::load_global(p.rows + row_n * all + last) : 0.f;
    const float m_L = whole.length > 0 ? simt::load_global(p.rows + row_m * all + last) : m0;
    const float E_L = whole.length > 0 ? simt::load_global(p.rows + row_E * all + last) : E0;
    const bool started = whole.length > 0 ? n_L > 0.f : E0 > 0.f;
    const float d_lse = started ? dE * E_L : 0.f;
    dm_source = (started ? dm : 0.f) - d_lse;
    // (P, m) after the span: the final state's where it ends its sequence, else the carries' (none: P = 0 at m =
    // +inf, the competition's level)
    if (span.length > 0 ? offset + span.length == whole.length : p.segments == 1) {
      P = started ? -d_lse / fmaxf(E_L, 1.17549435e-38f) : 0.f;
      m_next = m_L;
    } else {
      P = after != nullptr ? simt::load_global(after + layout.E()) : 0.f;
      m_next = after != nullptr ? simt::load_global(after + layout.m()) : INFINITY;
    }
    // The largest source's first row in the span: the sequence's first whose running m is the final one (m never
    // falls).
    source_row = -1;
    if (whole.length > 0 && m_L > m0) {
      int64_t lo = 0, hi = whole.length - 1;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (simt::load_global(p.rows + row_m * all + first + mid) >= m_L) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      source_row = lo - offset;
    }
    __syncthreads();
    publish_vectors();
    walk_chunks<kStages>(span.chunks(), true, [&](int64_t c, int stage) { load_chunk(c, stage); },
                [&](int64_t c, int stage) { chunk(c, stage); });
    if (p.carries_before != nullptr) {
      store_carries(p.carries_before + unit_at(), layout);
    }
    const SequenceSpan sequence_now = sequence();
    if (p.dstate0 != nullptr && span.first == sequence_now.first) {
      finish_state(p.dstate0 + sequence_at(), layout, sequence_now.length);
    }
  }

  // The incoming state's gradients but S's (the sequence's first unit, after the walk: RA, RB, RK, RQ and (P, m)
  // at the sequence's start). The incoming and final states' scalars are read again here, not kept through the
  // walk (registers).
  FF_DEVICE void finish_state(float* d0, const RecurrentState& layout, int64_t length) const {
    const Ends ends = state_ends(layout);
    const float E0 = ends.E0, m0 = ends.m0, dm = ends.dm, dE = ends.dE;
    store_vectors(d0, layout);
    if (threadIdx.x == 0) {
      const bool started0 = E0 > 0.f;
      const float d_lse0 = started0 ? -E0 * expf(m0 - m_next) * P : 0.f;
      const float dm0 = started0 && source_row < 0 ? dm_source : 0.f;
      simt::store_global(d0 + layout.n(), 0.f);
      simt::store_global(d0 + layout.m(), length > 0 ? d_lse0 + dm0 : dm);
      simt::store_global(d0 + layout.E(), length > 0 ? (started0 ? d_lse0 / E0 : 0.f) : dE);
    }
  }

  // A level's carries before the span: the competition's (P, m), or the vectors RA, RB, RK, RQ.
  FF_DEVICE void store_carries(float* before, const RecurrentState& layout) const {
    if (p.pass == ChainPass::competition) {
      if (threadIdx.x == 0) {
        simt::store_global(before + layout.E(), P);
        simt::store_global(before + layout.m(), m_next);
      }
      return;
    }
    store_vectors(before, layout);
  }

  // RA, RB, RK, RQ into a state's A, B, K, Q.
  FF_DEVICE void store_vectors(float* to, const RecurrentState& layout) const {
    for (int d = int(threadIdx.x); d < D; d += kThreads) {
      simt::store_global(to + layout.A() + d, float(vector(0)[d]));
      simt::store_global(to + layout.B() + d, float(vector(1)[d]));
      simt::store_global(to + layout.K() + d, float(vector(2)[d]));
      simt::store_global(to + layout.Q() + d, float(vector(3)[d]));
    }
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) flow_causal_chain_kernel(CausalChainParams p) {
  FF_DYNAMIC_SHARED(T, tiles);
  FF_SHARED(float, vectors_s, 8 * D);
  FF_SHARED(float, rows_s, kChainRows * kChunkRows);
  FF_SHARED(float, largest_s, 8 * kWarps);
  const BlockPlace at = BlockPlace::of_unit(p, p);
  const bool packed = p.cu_seqlens != nullptr;
  CausalChainBlock<T, D> block{
      p,
      at.span,
      at.span.rows<T>(p.q, p.q_stride, at.head),
      at.span.rows<T>(p.k, p.k_stride, at.head),
      p.pad != nullptr ? p.pad + at.span.batch * p.L + at.span.first : nullptr,
      at.rows_at(p),
      (at.span.batch * p.H + at.head) * causal_chunk_slots(p.L, p.N, packed) + at.span.first / kChunkRows +
          (packed ? at.sequence : 0),
      Lane::of(int(threadIdx.x)),
      tiles,
      vectors_s,
      rows_s,
      largest_s,
      0.f,
      -INFINITY,
      0.f,
      -1,
      {}};
  block.run();
}

template <int D>
void CausalChain<D>::run(const CausalChainParams& p, void* stream) {
  const char* name = p.pass == ChainPass::gradients ? "flow_causal_chain"
                     : p.pass == ChainPass::vectors ? "flow_causal_chain_vectors"
                                                    : "flow_causal_chain_competition";
  launch_units<D>(p, name, "causal_flow_attention", stream, [](auto type) {
    using T = decltype(type);
    return std::pair{&flow_causal_chain_kernel<T, D>, causal_chain_elements(D, sizeof(T)) * sizeof(T)};
  });
}

}  // namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD
