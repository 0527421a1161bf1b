// Causal Flow-Attention, forward, fused on tensor cores (bf16, half or float32 inputs; float32 state and sums).
// The math is spec/flow_attention.md; kernels/flow_attention/DESIGN.md has the plan. One block of 4 warps walks
// one (sequence, head, value tile of BM columns) in chunks of 64 rows from the state at the chunk's start: the
// valid count n0, the vectors K = sum k, Q = sum q, A = sum O k, B = sum I q (float, shared memory; published
// as 16-bit parts X = [K A | Q B] for products), the competition's running (max m0, sum E0) and
// S = sum k (c v)^T (StateTile). With s(x) the sum of x's elements and "up to t" the chunk's rows j <= t
// (warp scans of per-row values after the earlier warps' totals), for the chunk's rows t (warp w: 16 w ..):
//   G = q k^T, H = k q^T on the diagonal and below; q X, k X              mma (one A fragment each k step)
//   n_t  = n0 + valid rows up to t
//   I_t  = n_t / (<q_t, K> + rowsum G_t + e s(q_t) + e (s(K) + s(k) up to t) + D e^2)
//   O_t  = n_t / (<k_t, Q> + rowsum H_t + e s(k_t) + e (s(Q) + s(q) up to t) + D e^2)
//   Ih_t = (<q_t, A> + (G O)_t + e s(q_t) + e (s(A) + O s(k) up to t) + D e^2) / n_t   G O, H I: float dot
//   Oh_t = clamp((<k_t, B> + (H I)_t + e s(k_t) + e (s(B) + I s(q) up to t) + D e^2) / n_t)  products of rows
//   (m_t, E_t) = the running max and sum of exp(Oh - m) over the valid rows   a warp scan of the 64 rows
//   c_t  = n_t exp(Oh_t - m_t) / E_t,  a_t = sigmoid(Ih_t)
//   out_t = a_t I_t / n_t ((G o c) v + q S)_t                             G's key columns scaled by c
//   S += k^T (c v), K += k^T 1, A += k^T O, Q += q^T 1, B += q^T I        mma (v's B fragments scaled by c)
// Padded rows (either mask) have zero features, zero v, no count, c = 0 and output 0. Six barriers a chunk
// (linear attention's forward: three): the tiles landed, the features, the valid counts and s(x), the flows, the
// sources Oh, the chunk's end. Half inputs: S, the vectors, the scores, c and the flows are scaled by powers of two
// within half's range before they are rounded. The split schedule (few sequences and heads) runs the block over
// a segment from its incoming state in five passes (CausalPass): the first four write only the state after it
// (the first three without v and S += k^T (c v)), the last the output; none but the last reads S.
#pragma once

#include "flow_attention/blocks.cuh"

namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD {

// A row's scalars of the forward's chain (a backward pass records them): the valid count n_t, the flows I_t and
// O_t, the allocation a_t = sigmoid(Ih_t), the source r_t before its clamp and g_t = a_t I_t / n_t (0 if padded).
struct RowScalars {
  float n, I, O, a, r, g;
};

template <typename T, int D, int BM>
struct CausalForwardBlock {
  using Element = T;
  static constexpr int kColumns = BM;
  using Rows = ChunkTile<T, D>;
  using V = ChunkTile<T, BM>;
  using State = StateTile<T, D, BM>;
  using StateParts = SharedMatrix<T, D, BM>;
  using Vectors = SharedMatrix<T, D, 16>;  // X: [K_hi A_hi K_lo A_lo 1 0 0 0 | Q_hi B_hi Q_lo B_lo 1 0 0 0]
  using Scalars = ChunkTile<T, 16>;        // the rows' flows as a k x n8 operand (columns 0 .. 7; rows of 16
                                           // padded to 24 elements: stores and ldmatrix without bank conflicts)
  static constexpr std::size_t kSharedElements =
      4 * Rows::kSize + 2 * V::kSize + 2 * StateParts::kSize + Vectors::kSize + Scalars::kSize;
  static_assert(kSharedElements == causal_forward_elements(D, BM), "the layout the host sizes");
  static constexpr bool kHalf = std::is_same_v<T, simt::half>;
  static constexpr unsigned kAll = 0xffffffffu;

  const CausalForwardParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;
  const T *q, *k, *v;  // the sequence's first row (v: of the block's value columns)
  const bool* pad;     // the sequence's first padding flag, or nullptr
  T* out;
  int value_col;
  int64_t state_at;  // offset of this (sequence, head)'s packed state
  RecurrentState layout;
  Lane l;
  simt::shared_ptr<T> tiles;
  simt::shared_ptr<float> vectors_s;  // K, Q, A, B: 4 D floats
  simt::shared_ptr<float> rows_s;     // per row: n_t, Oh_t (-inf where padded), O_t, I_t (4 x 64)
  simt::shared_ptr<float> carries_s;  // the warps' totals of per-row values (5 a warp)
  simt::shared_ptr<float> largest_s;
  State S;
  float n0;
  RunningSum competition;  // (m0, E0)
  float sums[4];           // s(K), s(Q), s(A), s(B) as published
  float unscale[4];        // 2^e of each vector's published parts

  FF_DEVICE Rows q_tile(int stage) const { return {tiles + stage * Rows::kSize}; }
  FF_DEVICE Rows k_tile(int stage) const { return {tiles + (2 + stage) * Rows::kSize}; }
  FF_DEVICE V v_tile(int stage) const { return {tiles + 4 * Rows::kSize + stage * V::kSize}; }
  FF_DEVICE StateParts s_hi() const { return {tiles + 4 * Rows::kSize + 2 * V::kSize}; }
  FF_DEVICE StateParts s_lo() const { return {tiles + 4 * Rows::kSize + 2 * V::kSize + StateParts::kSize}; }
  FF_DEVICE Vectors x_parts() const { return {tiles + 4 * Rows::kSize + 2 * V::kSize + 2 * StateParts::kSize}; }
  FF_DEVICE Scalars scalars() const {
    return {tiles + 4 * Rows::kSize + 2 * V::kSize + 2 * StateParts::kSize + Vectors::kSize};
  }
  FF_DEVICE static float exp_of(float x) { return FeatureExp<T>{}(x); }
  // A power of two that brings x >= 0 below 2^15 (half: a flow in the 16-bit flows tile), else 1.
  FF_DEVICE static float range_factor(float x) {
    if (!kHalf || !(x >= 16384.f)) {
      return 1.f;
    }
    int exponent = 0;
    frexpf(fminf(x, 3.0e38f), &exponent);
    return ldexpf(1.f, exponent - 14);
  }
  // a's k columns (the rows k0 + 2t + 8 h + e of the chunk) multiplied by their range_factor of `values` (64
  // floats of shared memory).
  FF_DEVICE void scale_by_range(Fragment<T>& a, simt::shared_ptr<float> values, int k0) const {
    float s[2][2];
    FF_UNROLL
    for (int h = 0; h < 2; ++h) {
      const Two<float> pair = simt::shared_cast<Two<float>>(values + k0 + 2 * l.t + 8 * h)[0];
      s[h][0] = range_factor(pair.x0);
      s[h][1] = range_factor(pair.x1);
    }
    scale_k_columns<T>(a, s);
  }

  FF_DEVICE void load_chunk(int64_t c, int stage) const {
    const int64_t first = c * kChunkRows;
    load_rows(q_tile(stage), q, p.q_stride[2], first, span.length);
    load_rows(k_tile(stage), k, p.k_stride[2], first, span.length);
    if (p.pass >= CausalPass::state) {  // the split schedule's first three passes read no v
      load_rows(v_tile(stage), v, p.v_stride[2], first, span.length);
    }
  }

  // The vectors' sums and parts for the next chunk's products (after a barrier that ended the writes of
  // vectors_s; X is read after the next one): each warp sums them itself, each part scaled into half's range.
  FF_DEVICE void publish_vectors() {
    FF_UNROLL
    for (int i = 0; i < 4; ++i) {
      float sum = 0.f, largest = 0.f;
      for (int d = l.lane; d < D; d += 32) {
        const float x = vectors_s[i * D + d];
        sum += x;
        largest = fmaxf(largest, fabsf(x));
      }
      FF_UNROLL
      for (int offset = 16; offset > 0; offset /= 2) {
        sum += __shfl_xor_sync(kAll, sum, offset);
        largest = fmaxf(largest, __shfl_xor_sync(kAll, largest, offset));
      }
      int exponent = 0;
      if (kHalf && largest >= 16384.f && largest <= 3.0e38f) {
        frexpf(largest, &exponent);
        exponent -= 14;
      }
      sums[i] = sum;
      unscale[i] = ldexpf(1.f, exponent);
    }
    const Vectors x = x_parts();
    for (int d = int(threadIdx.x); d < D; d += kThreads) {
      Parts part[4];
      FF_UNROLL
      for (int i = 0; i < 4; ++i) {
        part[i] = split_parts<T>(vectors_s[i * D + d] / unscale[i]);
      }
      // [K A] at columns 0 .. 3 for q, [Q B] at 8 .. 11 for k; a column of ones beside each gives s(x)
      x.set_pair(d, 0, part[0].hi, part[2].hi);
      x.set_pair(d, 2, part[0].lo, part[2].lo);
      x.set_pair(d, 4, 1.f, 0.f);
      x.set_pair(d, 6, 0.f, 0.f);
      x.set_pair(d, 8, part[1].hi, part[3].hi);
      x.set_pair(d, 10, part[1].lo, part[3].lo);
      x.set_pair(d, 12, 1.f, 0.f);
      x.set_pair(d, 14, 0.f, 0.f);
    }
  }

  // Per-row values x[j][i] of this lane's rows (i: row g + 8 i of the warp's) summed over the chunk's rows up to
  // each row, in two steps around a barrier: scan_rows, the warp's scan, publishes each warp's totals in
  // carries_s[first_carry + Count w + j]; add_carries, after the barrier, adds the totals of the warps before it.
  template <int Count>
  FF_DEVICE void scan_rows(float (&x)[Count][2], int first_carry) const {
    FF_UNROLL
    for (int j = 0; j < Count; ++j) {
      warp_row_prefix(l, x[j]);
      if (l.lane == 28) {  // row 15
        carries_s[first_carry + Count * l.warp + j] = x[j][1];
      }
    }
  }
  template <int Count>
  FF_DEVICE void add_carries(float (&x)[Count][2], int first_carry) const {
    FF_UNROLL
    for (int j = 0; j < Count; ++j) {
      FF_UNROLL
      for (int w = 0; w < kWarps; ++w) {
        const float total = carries_s[first_carry + Count * w + j];
        if (w < l.warp) {
          x[j][0] += total;
          x[j][1] += total;
        }
      }
    }
  }

  // The chunk's numerators 2^-e ((G o c) v + q S)_t into num (G's key columns scaled by c here); returns 2^e.
  FF_DEVICE float numerator(int stage, Scores<true>& G, const float (&c_pair)[kChunkRows / 8][2],
                            RowTile<BM>& num) const {
    G.scale_keys(c_pair);
    const float fit = G.template fit<T>();
    num.zero();
    State::template rows_times<true>(l, q_tile(stage), s_hi(), s_lo(), num);
    num.scale(fit);
    G.template times<T>(l, v_tile(stage), S.scale() * fit, num);
    return S.unscale() / fit;
  }

  // The chunk c in stage `stage` (features in place): `left` rows of the sequence from its first, pad_rows the
  // chunk's padding flags (or nullptr); `rows` what the kernel makes of the rows (ForwardRows: the output).
  template <typename Records>
  FF_DEVICE void chunk_rows(int64_t c, int stage, int64_t left, const bool* pad_rows, Records& rows) {
    const Rows q = q_tile(stage), k = k_tile(stage);
    const V vt = v_tile(stage);
    const Scalars flows = scalars();
    const float e = p.eps, e2 = float(D) * e * e;
    simt::shared_ptr<float> n_s = rows_s, oh_s = rows_s + kChunkRows, o_s = rows_s + 2 * kChunkRows,
                            i_s = rows_s + 3 * kChunkRows;

    // The scores and the products with the vectors' parts, one A fragment of q and one of k a k step.
    Scores<true> G, H;
    RowTile<8> qx, kx;  // q [K A ..], k [Q B ..] (2^-e parts; column 4: s(q), s(k))
    G.s.zero();
    H.s.zero();
    qx.zero();
    kx.zero();
    for (int k0 = 0; k0 < D; k0 += 16) {
      Fragment<T> a;
      q.template a_fragment<true>(a, l, l.warp * 16, k0);
      G.add_step(l, a, k, k0);
      qx.template add_step<true>(l, a, x_parts(), k0, 0);
      k.template a_fragment<true>(a, l, l.warp * 16, k0);
      H.add_step(l, a, q, k0);
      kx.template add_step<true>(l, a, x_parts(), k0, 8);
    }
    G.mask(l, [](int, int) { return 0.f; });
    H.mask(l, [](int, int) { return 0.f; });
    float g_sum[2] = {0.f, 0.f}, h_sum[2] = {0.f, 0.f};
    G.s.row_sums(g_sum);
    H.s.row_sums(h_sum);

    // The rows' valid flags, s(k) and s(q), and their sums up to each row.
    bool ok[2];
    float sq[2], sk[2], prefix[3][2];  // prefix: valid, s(k), s(q)
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = l.row(2 * i);
      ok[i] = row < left && (pad_rows == nullptr || !simt::load_global(pad_rows + row));
      sq[i] = quad_column(l, qx.acc[0], 4, i);
      sk[i] = quad_column(l, kx.acc[0], 4, i);
      prefix[0][i] = ok[i] ? 1.f : 0.f;
      prefix[1][i] = sk[i];
      prefix[2][i] = sq[i];
    }
    scan_rows(prefix, 0);
    __syncthreads();
    add_carries(prefix, 0);

    // Incoming and outgoing flow, and the sums up to each row of O s(k) and I s(q).
    float n[2], I[2], O[2], flow_prefix[2][2];
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = l.row(2 * i);
      n[i] = n0 + prefix[0][i];
      const float qK = (quad_column(l, qx.acc[0], 0, i) + quad_column(l, qx.acc[0], 2, i)) * unscale[0];
      const float kQ = (quad_column(l, kx.acc[0], 0, i) + quad_column(l, kx.acc[0], 2, i)) * unscale[1];
      I[i] = ok[i] ? n[i] / (qK + g_sum[i] + e * sq[i] + e * (sums[0] + prefix[1][i]) + e2) : 0.f;
      O[i] = ok[i] ? n[i] / (kQ + h_sum[i] + e * sk[i] + e * (sums[1] + prefix[2][i]) + e2) : 0.f;
      flow_prefix[0][i] = O[i] * sk[i];
      flow_prefix[1][i] = I[i] * sq[i];
      if (l.t == 0) {
        o_s[row] = O[i];
        i_s[row] = I[i];
      }
      // flows: [O_hi O_lo | I_hi I_lo | 1 0 | 0 0], lane t the pair t (the vectors' sums k^T O, q^T I, k^T 1, q^T 1);
      // half: a flow past half's range divided by range_factor, its row of k or q multiplied by it
      const Parts flow = split_parts<T>(l.t == 0 ? O[i] / range_factor(O[i]) : I[i] / range_factor(I[i]));
      flows.set_pair(row, 2 * l.t, l.t < 2 ? flow.hi : l.t == 2 ? 1.f : 0.f, l.t < 2 ? flow.lo : 0.f);
    }
    scan_rows(flow_prefix, 3 * kWarps);
    __syncthreads();
    add_carries(flow_prefix, 3 * kWarps);

    // Conservation: (G O)_t, (H I)_t as float dot products of the score rows.
    float key_values[kChunkRows / 8][2], G_O[2], H_I[2];
    Scores<true>::key_pairs(l, o_s, key_values);
    G.row_dots(l, key_values, G_O);
    Scores<true>::key_pairs(l, i_s, key_values);
    H.row_dots(l, key_values, H_I);
    float g[2];
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = l.row(2 * i);
      const float safe_n = fmaxf(n[i], 1.f);
      const float qA = (quad_column(l, qx.acc[0], 1, i) + quad_column(l, qx.acc[0], 3, i)) * unscale[2];
      const float kB = (quad_column(l, kx.acc[0], 1, i) + quad_column(l, kx.acc[0], 3, i)) * unscale[3];
      const float Ih = (qA + G_O[i] + e * sq[i] + e * (sums[2] + flow_prefix[0][i]) + e2) / safe_n;
      const float r = (kB + H_I[i] + e * sk[i] + e * (sums[3] + flow_prefix[1][i]) + e2) / safe_n;
      const float Oh = fminf(fmaxf(r, -p.clamp), p.clamp);
      const float a = 1.f / (1.f + exp_of(-Ih));
      g[i] = ok[i] ? a * I[i] / safe_n : 0.f;
      if (l.t == 0) {
        n_s[row] = n[i];
        oh_s[row] = ok[i] ? Oh : -INFINITY;
        rows.row(c, row, left, {n[i], I[i], O[i], a, r, g[i]});
      }
    }
    __syncthreads();

    // The competition over the chunk's rows in order, every warp the whole scan: lane j the rows 2 j, 2 j + 1.
    float c_pair[kChunkRows / 8][2];
    {
      const int r0 = 2 * l.lane;
      const float oh0 = oh_s[r0], oh1 = oh_s[r0 + 1];
      const RunningSum x0 = RunningSum::of(oh0, oh0 != -INFINITY), x1 = RunningSum::of(oh1, oh1 != -INFINITY);
      RunningSum inclusive = x0.then(x1, FeatureExp<T>{});
      FF_UNROLL
      for (int offset = 1; offset < 32; offset *= 2) {
        const RunningSum before{__shfl_up_sync(kAll, inclusive.m, offset), __shfl_up_sync(kAll, inclusive.E, offset)};
        if (l.lane >= offset) {
          inclusive = before.then(inclusive, FeatureExp<T>{});
        }
      }
      RunningSum exclusive{__shfl_up_sync(kAll, inclusive.m, 1), __shfl_up_sync(kAll, inclusive.E, 1)};
      if (l.lane == 0) {
        exclusive = RunningSum::empty();
      }
      const RunningSum at0 = competition.then(exclusive, FeatureExp<T>{}).then(x0, FeatureExp<T>{});
      const RunningSum at1 = at0.then(x1, FeatureExp<T>{});
      const float n_0 = n_s[r0], n_1 = n_s[r0 + 1];
      const float c0 = oh0 != -INFINITY ? n_0 * exp_of(oh0 - at0.m) / at0.E : 0.f;
      const float c1 = oh1 != -INFINITY ? n_1 * exp_of(oh1 - at1.m) / at1.E : 0.f;
      if (l.warp == 0) {
        rows.competition(c, r0, left, c0, at0);
        rows.competition(c, r0 + 1, left, c1, at1);
      }
      FF_UNROLL
      for (int j = 0; j < kChunkRows / 8; ++j) {  // columns 8 j + 2t, + 1: the rows of lane 4 j + t
        c_pair[j][0] = __shfl_sync(kAll, c0, 4 * j + l.t);
        c_pair[j][1] = __shfl_sync(kAll, c1, 4 * j + l.t);
      }
      competition = RunningSum{__shfl_sync(kAll, at1.m, 31), __shfl_sync(kAll, at1.E, 31)};
      const float n_last = n_s[kChunkRows - 1];
      n0 = n_last;
    }

    if (p.pass == CausalPass::output) {
      rows.output(c, stage, left, G, c_pair, g);
    }

    // The next state: S += k^T (c v), and the vectors' sums of the chunk (D x 8: x^T flows for x = k, q).
    const auto times_c = [&](float down) {  // v's rows in the B fragments times c_t down
      return [&c_pair, down](Fragment<T>& b, int k0) {
        const float s[2][2] = {{c_pair[k0 / 8][0] * down, c_pair[k0 / 8][1] * down},
                               {c_pair[k0 / 8 + 1][0] * down, c_pair[k0 / 8 + 1][1] * down}};
        scale_k_rows<T>(b, s);
      };
    };
    if (p.pass >= CausalPass::state) {  // the split schedule's earlier passes keep the incoming S
      if constexpr (kHalf) {  // c_t <= n_t: c v rounded to half after c is scaled into [0, 1] by 2^-e
        float largest = 0.f;
        FF_UNROLL
        for (int j = 0; j < kChunkRows / 8; ++j) {
          largest = fmaxf(largest, fmaxf(c_pair[j][0], c_pair[j][1]));
        }
        int exponent = 0;
        frexpf(warp_max(largest), &exponent);
        S.add_scaled_product(l, k, vt, exponent, times_c(ldexpf(1.f, -exponent)));
      } else {
        S.add_product(l, k, vt, times_c(1.f));
      }
    }
    for (int u = l.warp; u < D / 16; u += kWarps) {
      RowTile<8> kt, qt;
      kt.zero();
      qt.zero();
      for (int k0 = 0; k0 < kChunkRows; k0 += 16) {
        Fragment<T> a;
        k.template a_fragment<false>(a, l, u * 16, k0);
        if constexpr (kHalf) {
          scale_by_range(a, o_s, k0);
        }
        kt.template add_step<true>(l, a, flows, k0);
        q.template a_fragment<false>(a, l, u * 16, k0);
        if constexpr (kHalf) {
          scale_by_range(a, i_s, k0);
        }
        qt.template add_step<true>(l, a, flows, k0);
      }
      FF_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int d = u * 16 + l.g + 8 * i;
        const float added[4] = {quad_column(l, kt.acc[0], 4, i), quad_column(l, qt.acc[0], 4, i),  // K, Q
                                quad_column(l, kt.acc[0], 0, i) + quad_column(l, kt.acc[0], 1, i),  // A = sum O k
                                quad_column(l, qt.acc[0], 2, i) + quad_column(l, qt.acc[0], 3, i)};  // B = sum I q
        if (l.t == 0) {
          FF_UNROLL
          for (int v = 0; v < 4; ++v) {
            const float before = vectors_s[v * D + d];
            vectors_s[v * D + d] = before + added[v];
          }
        }
      }
    }
  }

  FF_DEVICE void load_state() {
    const float* s0 = p.state0 != nullptr ? p.state0 + state_at : nullptr;
    S.load(l, s0 != nullptr ? s0 + layout.S() + value_col : nullptr, p.M);
    for (int d = int(threadIdx.x); d < 4 * D; d += kThreads) {
      vectors_s[d] = s0 != nullptr ? simt::load_global(s0 + layout.K() + d) : 0.f;  // K, Q, A, B in a row
    }
    n0 = s0 != nullptr ? simt::load_global(s0 + layout.n()) : 0.f;
    const float E0 = s0 != nullptr ? simt::load_global(s0 + layout.E()) : 0.f;
    competition = E0 > 0.f ? RunningSum{simt::load_global(s0 + layout.m()), E0} : RunningSum::empty();
    __syncthreads();
  }

  FF_DEVICE void store_state() {
    float* s1 = p.state_final + state_at;
    S.store(l, s1 + layout.S() + value_col, p.M);
    if (value_col == 0) {
      for (int d = int(threadIdx.x); d < 4 * D; d += kThreads) {
        const float x = vectors_s[d];
        simt::store_global(s1 + layout.K() + d, x);
      }
      if (threadIdx.x == 0) {
        simt::store_global(s1 + layout.n(), n0);
        simt::store_global(s1 + layout.m(), competition.E > 0.f ? competition.m : 0.f);
        simt::store_global(s1 + layout.E(), competition.E);
      }
    }
  }

  // The walk from the incoming state; rows: what the kernel makes of each chunk's rows (ForwardRows or a
  // backward pass's), with its own loads beside the chunk's.
  template <typename Records>
  FF_DEVICE void run(Records& rows) {
    const bool output = p.pass == CausalPass::output;  // the other passes read no part of S
    load_state();
    if (output) {
      S.publish(l, s_hi(), s_lo(), largest_s);
    }
    publish_vectors();
    walk_chunks(span.chunks(), false,
                [&](int64_t c, int stage) {
                  load_chunk(c, stage);
                  rows.load(c, stage);
                },
                [&](int64_t c, int stage) {
                  const int64_t left = span.length - c * kChunkRows;
                  const bool* pad_rows = pad != nullptr ? pad + c * kChunkRows : nullptr;
                  apply_feature_map(p.feature_map, k_tile(stage), k_tile(stage), left, pad_rows);
                  apply_feature_map(p.feature_map, q_tile(stage), q_tile(stage), left, pad_rows);
                  if (pad_rows != nullptr && p.pass >= CausalPass::state) {
                    zero_padded_rows(v_tile(stage), pad_rows, left);
                  }
                  rows.prepare(c, stage, left, pad_rows);
                  __syncthreads();
                  chunk_rows(c, stage, left, pad_rows, rows);
                  __syncthreads();  // the stage may be loaded again, the state's parts rewritten
                  if (output) {
                    S.publish(l, s_hi(), s_lo(), largest_s);  // read after the next chunk's first barrier
                  }
                  publish_vectors();
                });
    if (p.state_final != nullptr) {
      store_state();
    }
  }

  // The block of the grid place `at` (BlockPlace) with params p (the forward's or a backward pass's), and the
  // shared memory it walks on.
  FF_DEVICE static CausalForwardBlock at_place(const CausalForwardParams& p, const BlockPlace& at) {
    FF_DYNAMIC_SHARED(T, tiles);
    FF_SHARED(float, vectors_s, 4 * D);
    FF_SHARED(float, rows_s, 4 * kChunkRows);
    FF_SHARED(float, carries_s, 5 * kWarps);
    FF_SHARED(float, largest_s, kWarps);
    const RecurrentState layout{p.D, p.M};
    return {p,
            at.span,
            at.span.rows<T>(p.q, p.q_stride, at.head),
            at.span.rows<T>(p.k, p.k_stride, at.head),
            at.span.rows<T>(p.v, p.v_stride, at.head) + at.value_col,
            p.pad != nullptr ? p.pad + at.span.batch * p.L + at.span.first : nullptr,
            p.out != nullptr ? at.output_rows<T>(p, p.out) : nullptr,
            at.value_col,
            (int64_t(at.unit) * p.H + at.head) * layout.size(),
            layout,
            Lane::of(int(threadIdx.x)),
            tiles,
            vectors_s,
            rows_s,
            carries_s,
            largest_s,
            {},
            0.f,
            RunningSum::empty(),
            {},
            {}};
  }
};

// What a walk makes of a chunk's rows besides the state's advance: nothing (the split schedule's state passes).
// A backward pass adds loads of its own (load, then prepare before the features' barrier) and records the rows'
// scalars (row: every row's, in the lanes t = 0; competition: the running (m, E) after each row, in warp 0).
struct NoRowRecords {
  FF_DEVICE void load(int64_t, int) const {}
  FF_DEVICE void prepare(int64_t, int, int64_t, const bool*) const {}
  FF_DEVICE void row(int64_t, int, int64_t, const RowScalars&) const {}
  FF_DEVICE void competition(int64_t, int, int64_t, float, const RunningSum&) const {}
};

// The forward's output pass: out_t = g_t ((G o c) v + q S)_t.
template <typename Block>
struct ForwardRows : NoRowRecords {
  const Block& b;

  FF_DEVICE void output(int64_t c, int stage, int64_t left, Scores<true>& G,
                        const float (&c_pair)[kChunkRows / 8][2], const float (&g)[2]) const {
    RowTile<Block::kColumns> num;
    const float back = b.numerator(stage, G, c_pair, num);
    store_rows<typename Block::Element, Block::kColumns>(
        b.l, b.out + c * kChunkRows * b.p.M, b.p.M, left, [&](int nt, int el) { return num.acc[nt][el] * back * g[el / 2]; });
  }
};

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) flow_causal_forward_kernel(CausalForwardParams p) {
  using Block = CausalForwardBlock<T, D, BM>;
  Block block = Block::at_place(p, BlockPlace::of<BM>(p, p));
  ForwardRows<Block> rows{{}, block};
  block.run(rows);
}

template <int D>
void CausalForward<D>::run(const CausalForwardParams& p, void* stream) {
  // the passes as the counters name them: the first three do the same work
  const char* name = p.pass == CausalPass::output  ? "flow_causal_forward"
                     : p.pass == CausalPass::state ? "flow_causal_state"
                                                   : "flow_causal_sums";
  launch_value_tiles<D, ValueTiles<D, causal_value_tile>>(p, name, "causal_flow_attention", stream,
                                         [](auto type, auto tile) {
                                           using T = decltype(type);
                                           constexpr int BM = decltype(tile)::value;
                                           return std::pair{&flow_causal_forward_kernel<T, D, BM>,
                                                            CausalForwardBlock<T, D, BM>::kSharedElements * sizeof(T)};
                                         });
}

}  // namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD
