// Causal linear attention, forward, fused on tensor cores (bf16 or half inputs, float32 state and sums).
// One block of 4 warps walks one (sequence, head, value tile of BM columns) through its sequence in chunks
// of 64 rows. With q, k = phi(query), phi(key) and (S, z) the state before chunk c, for its rows t:
//   G[t, j] = <q_t, k_j> for the chunk's rows j <= t            mma, float accumulators
//   num_t   = q_t^T S + sum_j G[t, j] v_j                        mma: S as hi + lo 16-bit parts, G rounded
//   den_t   = <q_t, z> + sum_j G[t, j] + eps                     float (CUDA cores and the G accumulators)
//   out_t   = num_t / den_t   (num_t without normalisation)
//   S += k^T v  (mma into float accumulators that stay in registers)     z += sum_j k_j  (float)
// Warp w owns the chunk rows 16 w .. 16 w + 15 (so only the key tiles up to its diagonal are multiplied)
// and a quarter of the state's 16 x 16 units. The q, k, v tiles of chunk c + 1 are loaded by cp.async while
// chunk c is computed; the feature map is applied in shared memory (rows past the sequence get phi(k) = 0).
// For half inputs the state's 16-bit parts are scaled by 2^-e (e > 0 only once |S| reaches 2^14) so that
// they cannot overflow; the chunk's G is scaled alike and num is multiplied back by 2^e.
#pragma once

#include "common/portable.h"
#include "linear_attention/causal_forward.h"
#include "simt/simt.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD {

template <typename T, int D, int BM>
struct ForwardTile {
  static constexpr int kRows = kChunkRows, kThreads = kForwardThreads, kWarps = kThreads / 32;
  static constexpr int kLdQ = D + 8, kLdV = BM + 8;  // shared row pitches (elements): 16-byte aligned rows
  static constexpr int kQTile = kRows * kLdQ, kVTile = kRows * kLdV, kSTile = D * kLdV;
  static constexpr int kUnits = (D / 16) * (BM / 16);  // 16 x 16 units of the state, dealt to the warps
  static constexpr int kUnitsPerWarp = (kUnits + kWarps - 1) / kWarps;
  static constexpr bool kScaled = std::is_same_v<T, simt::half>;
  static_assert(D % 16 == 0 && BM % 16 == 0, "tiles of 16");
  static_assert(kRows == 16 * kWarps, "one m16 row tile per warp");
};

// Lane addresses of ldmatrix.x4 (lane 8 j + i gives row i of matrix j):
//   a-order: matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15): an A fragment from
//            row-major m x k storage, or with .trans two B fragments (n tiles 0, 1) from k x n storage
//   b-order: matrices (0-7, 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15): two B fragments (n tiles 0, 1)
//            from n x k storage, or with .trans an A fragment from k x m storage
struct LaneAddress {
  int a_row, a_col, b_row, b_col;
  FF_DEVICE static LaneAddress of(int lane) {
    return {lane % 8 + (lane / 8) % 2 * 8, lane / 16 * 8, lane % 8 + lane / 16 * 8, (lane / 8) % 2 * 8};
  }
};

template <typename T>
FF_DEVICE void mma_pair(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
  simt::mma_m16n8k16<T>(d0, a, b0, d0);
  simt::mma_m16n8k16<T>(d1, a, b1, d1);
}

// Rows of one sequence: its inputs from its first row, and how many rows it has.
template <typename T>
struct SequenceRows {
  const T *q, *k, *v;
  T* out;
  int64_t q_row, k_row, v_row;  // row strides
  int64_t length;
};

template <typename T, int D, int BM>
struct CausalForwardBlock {
  using Tile = ForwardTile<T, D, BM>;

  const CausalForwardParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceRows<T> rows;
  int head, value_col;  // the head and the first value column of this block
  int64_t state_at;     // offset of this (sequence, head) in the state tensors, (N, H, D, M) / D * M
  simt::shared_ptr<T> q_s, k_s, v_s, s_hi, s_lo;
  simt::shared_ptr<float> z_s, qz_s, max_s;
  int warp, lane, g, t;
  LaneAddress at;
  float state[Tile::kUnitsPerWarp][2][4];  // this warp's units of S: two m16n8 accumulators each
  int state_exponent = 0;                  // the 16-bit parts of S in shared memory hold S 2^-e

  FF_DEVICE simt::shared_ptr<T> q_stage(int s) const { return q_s + s * Tile::kQTile; }
  FF_DEVICE simt::shared_ptr<T> k_stage(int s) const { return k_s + s * Tile::kQTile; }
  FF_DEVICE simt::shared_ptr<T> v_stage(int s) const { return v_s + s * Tile::kVTile; }

  // Row and column (within the value tile) of element e of accumulator `half` of state unit u.
  FF_DEVICE int unit_row(int u, int e) const { return u / (BM / 16) * 16 + g + e / 2 * 8; }
  FF_DEVICE int unit_col(int u, int half, int e) const { return u % (BM / 16) * 16 + half * 8 + 2 * t + e % 2; }
  FF_DEVICE int unit(int i) const { return warp + i * Tile::kWarps; }

  // cp.async of chunk c's q, k rows and v columns into stage s; rows past the sequence are zero-filled.
  FF_DEVICE void load_chunk(int64_t c, int s) const {
    const int64_t first = c * Tile::kRows, left = rows.length - first;
    const T* q = rows.q + first * rows.q_row;
    const T* k = rows.k + first * rows.k_row;
    const T* v = rows.v + first * rows.v_row;
    for (int piece = int(threadIdx.x); piece < Tile::kRows * D / 8; piece += Tile::kThreads) {
      const int r = piece / (D / 8), col = piece % (D / 8) * 8;
      const bool inside = r < left;
      simt::cp_async_16(q_stage(s) + r * Tile::kLdQ + col, inside ? q + r * rows.q_row + col : rows.q, inside);
      simt::cp_async_16(k_stage(s) + r * Tile::kLdQ + col, inside ? k + r * rows.k_row + col : rows.k, inside);
    }
    for (int piece = int(threadIdx.x); piece < Tile::kRows * BM / 8; piece += Tile::kThreads) {
      const int r = piece / (BM / 8), col = piece % (BM / 8) * 8;
      const bool inside = r < left;
      simt::cp_async_16(v_stage(s) + r * Tile::kLdV + col, inside ? v + r * rows.v_row + col : rows.v, inside);
    }
  }

  // q, k = phi(query), phi(key) in place; k rows past the sequence become 0.
  FF_DEVICE void apply_feature_map(int s, int64_t left) const {
    for (int e = int(threadIdx.x); e < Tile::kRows * D; e += Tile::kThreads) {
      const int at_ = e / D * Tile::kLdQ + e % D;
      const T query = q_stage(s)[at_], key = k_stage(s)[at_];
      q_stage(s)[at_] = T(portable::feature(p.feature_map, float(query)));
      k_stage(s)[at_] = T(e / D < left ? portable::feature(p.feature_map, float(key)) : 0.f);
    }
  }

  // qz_s[r] = <q_r, z> for the chunk's rows, two threads a row.
  FF_DEVICE void row_normalisers(int s) const {
    const int r = int(threadIdx.x) / 2, part = int(threadIdx.x) % 2;
    float sum = 0;
    for (int d = part * (D / 2); d < (part + 1) * (D / 2); ++d) {
      const T x = q_stage(s)[r * Tile::kLdQ + d];
      const float zd = z_s[d];
      sum += float(x) * zd;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    if (part == 0) {
      qz_s[r] = sum;
    }
  }

  // This warp's rows: num (2^-e scaled) into acc, the in-chunk score sums of its rows g and g + 8.
  FF_DEVICE void chunk_rows(int s, float (&acc)[BM / 8][4], float (&score_sum)[2]) const {
    const simt::shared_ptr<T> q_tile = q_stage(s) + (warp * 16 + at.a_row) * Tile::kLdQ + at.a_col;
    float scores[8][4] = {};
    for (int kk = 0; kk < D; kk += 16) {
      uint32_t a[4];
      simt::ldmatrix<4, false>(a, q_tile + kk);
      FF_UNROLL
      for (int np = 0; np < 4; ++np) {
        if (np <= warp) {  // key tiles past the diagonal are masked whole
          uint32_t b[4];
          simt::ldmatrix<4, false>(b, k_stage(s) + (np * 16 + at.b_row) * Tile::kLdQ + kk + at.b_col);
          mma_pair<T>(scores[2 * np], scores[2 * np + 1], a, b);
        }
      }
      FF_UNROLL
      for (int np = 0; np < BM / 16; ++np) {  // q_t^T S as q (S_hi + S_lo)
        uint32_t b[4];
        simt::ldmatrix<4, true>(b, s_hi + (kk + at.a_row) * Tile::kLdV + np * 16 + at.a_col);
        mma_pair<T>(acc[2 * np], acc[2 * np + 1], a, b);
        simt::ldmatrix<4, true>(b, s_lo + (kk + at.a_row) * Tile::kLdV + np * 16 + at.a_col);
        mma_pair<T>(acc[2 * np], acc[2 * np + 1], a, b);
      }
    }
    const float scale = Tile::kScaled ? ldexpf(1.f, -state_exponent) : 1.f;
    FF_UNROLL
    for (int np = 0; np < 4; ++np) {
      if (np <= warp) {
        uint32_t a[4];  // the causally masked scores of keys 16 np .. 16 np + 15 as an A fragment
        FF_UNROLL
        for (int half = 0; half < 2; ++half) {
          float(&c)[4] = scores[2 * np + half];
          FF_UNROLL
          for (int e = 0; e < 4; ++e) {
            const int row = warp * 16 + g + e / 2 * 8, key = np * 16 + half * 8 + 2 * t + e % 2;
            c[e] = key <= row ? c[e] : 0.f;
            score_sum[e / 2] += c[e];
          }
          a[2 * half] = simt::pack2(T(c[0] * scale), T(c[1] * scale));
          a[2 * half + 1] = simt::pack2(T(c[2] * scale), T(c[3] * scale));
        }
        FF_UNROLL
        for (int vp = 0; vp < BM / 16; ++vp) {
          uint32_t b[4];
          simt::ldmatrix<4, true>(b, v_stage(s) + (np * 16 + at.a_row) * Tile::kLdV + vp * 16 + at.a_col);
          mma_pair<T>(acc[2 * vp], acc[2 * vp + 1], a, b);
        }
      }
    }
    FF_UNROLL
    for (int e = 0; e < 2; ++e) {  // the four lanes of a row hold its score tiles' columns 2t, 2t + 1
      score_sum[e] += __shfl_xor_sync(0xffffffffu, score_sum[e], 1);
      score_sum[e] += __shfl_xor_sync(0xffffffffu, score_sum[e], 2);
    }
  }

  FF_DEVICE void write_rows(int64_t c, const float (&acc)[BM / 8][4], const float (&score_sum)[2]) const {
    const int64_t left = rows.length - c * Tile::kRows;
    const float unscale = Tile::kScaled ? ldexpf(1.f, state_exponent) : 1.f;
    FF_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int row = warp * 16 + g + e * 8;
      const float qz = qz_s[row];
      const float inv_den = p.normalize ? 1.f / (qz + score_sum[e] + p.eps) : 1.f;
      if (row < left) {
        T* out = rows.out + (c * Tile::kRows + row) * p.M;
        FF_UNROLL
        for (int nt = 0; nt < BM / 8; ++nt) {
          const float x0 = acc[nt][2 * e] * unscale * inv_den, x1 = acc[nt][2 * e + 1] * unscale * inv_den;
          *reinterpret_cast<uint32_t*>(out + nt * 8 + 2 * t) = simt::pack2(T(x0), T(x1));
        }
      }
    }
  }

  // S += k^T v and z += sum_r k_r over the chunk (padded rows are zero).
  FF_DEVICE void update_state(int s) {
    FF_UNROLL
    for (int i = 0; i < Tile::kUnitsPerWarp; ++i) {
      const int u = unit(i);
      if (u < Tile::kUnits) {
        const int d0 = u / (BM / 16) * 16, m0 = u % (BM / 16) * 16;
        for (int kk = 0; kk < Tile::kRows; kk += 16) {
          uint32_t a[4], b[4];
          simt::ldmatrix<4, true>(a, k_stage(s) + (kk + at.b_row) * Tile::kLdQ + d0 + at.b_col);
          simt::ldmatrix<4, true>(b, v_stage(s) + (kk + at.a_row) * Tile::kLdV + m0 + at.a_col);
          mma_pair<T>(state[i][0], state[i][1], a, b);
        }
      }
    }
    for (int d = int(threadIdx.x); d < D; d += Tile::kThreads) {
      float sum = 0;
      for (int r = 0; r < Tile::kRows; ++r) {
        const T key = k_stage(s)[r * Tile::kLdQ + d];
        sum += float(key);
      }
      const float zd = z_s[d];
      z_s[d] = zd + sum;
    }
  }

  // S_hi + S_lo = S 2^-e in shared memory, for the next chunk's q^T S. Half: e from the block's max |S|.
  FF_DEVICE void publish_state() {
    if constexpr (Tile::kScaled) {
      float largest = 0;
      FF_UNROLL
      for (int i = 0; i < Tile::kUnitsPerWarp; ++i) {
        FF_UNROLL
        for (int half = 0; half < 2; ++half) {
          FF_UNROLL
          for (int e = 0; e < 4; ++e) {
            largest = unit(i) < Tile::kUnits ? fmaxf(largest, fabsf(state[i][half][e])) : largest;
          }
        }
      }
      FF_UNROLL
      for (int offset = 16; offset > 0; offset /= 2) {
        largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
      }
      if (lane == 0) {
        max_s[warp] = largest;
      }
      __syncthreads();
      FF_UNROLL
      for (int w = 0; w < Tile::kWarps; ++w) {
        const float m = max_s[w];
        largest = fmaxf(largest, m);
      }
      state_exponent = 0;
      if (largest >= 16384.f && largest <= 3.0e38f) {  // |S 2^-e| < 2^14: its parts cannot overflow
        frexpf(largest, &state_exponent);
        state_exponent -= 14;
      }
    }
    const float scale = Tile::kScaled ? ldexpf(1.f, -state_exponent) : 1.f;
    FF_UNROLL
    for (int i = 0; i < Tile::kUnitsPerWarp; ++i) {
      const int u = unit(i);
      if (u < Tile::kUnits) {
        FF_UNROLL
        for (int half = 0; half < 2; ++half) {
          FF_UNROLL
          for (int e = 0; e < 4; ++e) {
            const float x = state[i][half][e] * scale;
            const T hi = T(x);
            const int at_ = unit_row(u, e) * Tile::kLdV + unit_col(u, half, e);
            s_hi[at_] = hi;
            s_lo[at_] = T(x - float(hi));
          }
        }
      }
    }
  }

  FF_DEVICE void load_state() {
    FF_UNROLL
    for (int i = 0; i < Tile::kUnitsPerWarp; ++i) {
      const int u = unit(i);
      FF_UNROLL
      for (int half = 0; half < 2; ++half) {
        FF_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int64_t at_ = state_at + int64_t(unit_row(u, e)) * p.M + value_col + unit_col(u, half, e);
          state[i][half][e] = p.kv0 != nullptr && u < Tile::kUnits ? p.kv0[at_] : 0.f;
        }
      }
    }
    for (int d = int(threadIdx.x); d < D; d += Tile::kThreads) {
      z_s[d] = p.z0 != nullptr ? p.z0[state_at / p.M + d] : 0.f;
    }
  }

  FF_DEVICE void store_state() const {
    FF_UNROLL
    for (int i = 0; i < Tile::kUnitsPerWarp; ++i) {
      const int u = unit(i);
      if (u < Tile::kUnits) {
        FF_UNROLL
        for (int half = 0; half < 2; ++half) {
          FF_UNROLL
          for (int e = 0; e < 4; ++e) {
            p.kv_final[state_at + int64_t(unit_row(u, e)) * p.M + value_col + unit_col(u, half, e)] =
                state[i][half][e];
          }
        }
      }
    }
    if (value_col == 0) {
      for (int d = int(threadIdx.x); d < D; d += Tile::kThreads) {
        p.z_final[state_at / p.M + d] = z_s[d];
      }
    }
  }

  FF_DEVICE void run() {
    load_state();
    publish_state();
    const int64_t chunks = (rows.length + Tile::kRows - 1) / Tile::kRows;
    if (chunks > 0) {
      load_chunk(0, 0);
      simt::cp_async_commit();
    }
    for (int64_t c = 0; c < chunks; ++c) {
      const int s = int(c % 2);
      if (c + 1 < chunks) {
        load_chunk(c + 1, 1 - s);  // that stage's last readers passed the barrier that ended chunk c - 1
      }
      simt::cp_async_commit();
      simt::cp_async_wait<1>();
      __syncthreads();
      apply_feature_map(s, rows.length - c * Tile::kRows);
      __syncthreads();
      row_normalisers(s);
      float acc[BM / 8][4] = {}, score_sum[2] = {0.f, 0.f};
      chunk_rows(s, acc, score_sum);
      __syncthreads();  // qz_s written; S_hi, S_lo and z_s read
      write_rows(c, acc, score_sum);
      update_state(s);
      publish_state();
      __syncthreads();  // the stage may be loaded again; S_hi, S_lo, z_s and qz_s may be rewritten
    }
    store_state();
  }
};

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kForwardThreads, 1) causal_forward_kernel(CausalForwardParams p) {
  using Tile = ForwardTile<T, D, BM>;
  FF_DYNAMIC_SHARED(T, tiles);
  FF_SHARED(float, z_s, D);
  FF_SHARED(float, qz_s, Tile::kRows);
  FF_SHARED(float, max_s, Tile::kWarps);
  const int tiles_per_head = p.M / BM;
  const int n = int(blockIdx.x) / tiles_per_head, head = int(blockIdx.y);
  const int value_col = int(blockIdx.x) % tiles_per_head * BM;
  const int64_t batch = p.cu_seqlens != nullptr ? 0 : n;
  const int64_t first = p.cu_seqlens != nullptr ? p.cu_seqlens[n] : 0;
  const int64_t length = p.cu_seqlens != nullptr ? p.cu_seqlens[n + 1] - first : p.L;
  const auto input = [&](const void* x, const int64_t(&stride)[3]) {
    return static_cast<const T*>(x) + batch * stride[0] + head * stride[1] + first * stride[2];
  };
  const SequenceRows<T> rows{input(p.q, p.q_stride),
                             input(p.k, p.k_stride),
                             input(p.v, p.v_stride) + value_col,
                             static_cast<T*>(p.out) + ((batch * p.H + head) * p.L + first) * p.M + value_col,
                             p.q_stride[2],
                             p.k_stride[2],
                             p.v_stride[2],
                             length};
  const int lane = int(threadIdx.x) % 32;
  CausalForwardBlock<T, D, BM> block{p,
                                     rows,
                                     head,
                                     value_col,
                                     (int64_t(n) * p.H + head) * D * p.M,
                                     tiles,
                                     tiles + 2 * Tile::kQTile,
                                     tiles + 4 * Tile::kQTile,
                                     tiles + 4 * Tile::kQTile + 2 * Tile::kVTile,
                                     tiles + 4 * Tile::kQTile + 2 * Tile::kVTile + Tile::kSTile,
                                     z_s,
                                     qz_s,
                                     max_s,
                                     int(threadIdx.x) / 32,
                                     lane,
                                     lane / 4,
                                     lane % 4,
                                     LaneAddress::of(lane),
                                     {},
                                     0};
  block.run();
}

template <typename T, int D, int BM>
void launch_causal_forward(const CausalForwardParams& p, simt::Stream stream) {
  const int64_t blocks = int64_t(p.N) * (p.M / BM);
  if (blocks > 0x7fffffff || p.H > 65535) {
    throw std::length_error("flowformer::causal_linear_attention: " + std::to_string(p.N) + " sequences x " +
                            std::to_string(p.H) + " heads exceed one CUDA launch");
  }
  if (blocks == 0 || p.H == 0) {
    return;
  }
  simt::launch("causal_forward", causal_forward_kernel<T, D, BM>,
               {simt::Dim3(unsigned(blocks), unsigned(p.H)), simt::Dim3(kForwardThreads),
                causal_forward_shared_bytes(D, BM), stream},
               p);
}

template <int D>
void CausalForward<D>::run(const CausalForwardParams& p, void* stream) {
#if defined(__CUDACC__)
  const simt::Stream s = static_cast<cudaStream_t>(stream);
#else
  const simt::Stream s{};
  (void)stream;
#endif
  const auto with_tile = [&](auto type) {
    using T = decltype(type);
    switch (value_tile(D, p.M)) {
      case 16:
        return launch_causal_forward<T, D, 16>(p, s);
      case 32:
        return launch_causal_forward<T, D, 32>(p, s);
      default:
        if constexpr (value_tile(D, 256) == 64) {
          return launch_causal_forward<T, D, 64>(p, s);
        }
    }
    throw std::invalid_argument("flowformer: no fused causal forward for D = " + std::to_string(D) +
                                ", M = " + std::to_string(p.M));
  };
  if (p.half) {
    with_tile(simt::half{});
  } else {
    with_tile(simt::bf16{});
  }
}

}  // namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD
