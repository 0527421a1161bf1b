// Pass 3 of non-causal Flow-Attention (DESIGN.md): the competition's sums, fused on tensor cores (bf16, half or
// float32 inputs, float32 sums), and pass 2's keys' side. One block of 4 warps walks one (segment, head, value tile
// of BM columns) of the keys in chunks of 64 rows; with k = phi(key), Q = sum_i q_i, B = sum_i I_i q_i and the
// running maximum m:
//   A   += O_j k_j,  O_j = 1 / <k_j + e, Q + e>   a thread 16 bytes of a row, the row's threads added by shuffles,
//   Oh_j = clamp(<k_j + e, B + e>)                 the sums in registers (PieceRows)
//   m    = max(m, max_j Oh_j)                      the warps' maxima through shared memory (one barrier)
//   w_j  = exp(Oh_j - m),  E = E f + sum_j w_j,  W = W f + k^T (w v)   f = exp(m_before - m), mma
// over the segment's valid keys j (w_j = 0 for the others; padded rows of v zeroed); the rows w_j k_j replace k
// in shared memory (w_j <= 1: within the inputs' range) before the product. Four barriers a chunk. Taking A here
// (it is needed only by pass 4) spares pass 2 a read of the keys; the first value tile's blocks take it.
#pragma once

#include "flow_attention/blocks.cuh"

namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD {

template <typename T, int D, int BM>
struct KeySumsBlock {
  using K = ChunkTile<T, D>;
  using V = ChunkTile<T, BM>;
  using Rows = PieceRows<T, D>;
  static constexpr int kCount = Rows::kCount;
  static constexpr std::size_t kSharedElements = 2 * K::kSize + 2 * V::kSize;
  static_assert(kSharedElements == key_sums_elements(D, BM), "the layout the host sizes");
  static_assert(kSharedElements * sizeof(T) >= kThreads * kCount * sizeof(float), "room for the column sums");

  const KeySumsParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;
  SideRows<T> side;
  const T* v;         // the segment's first value row, at the block's value columns
  const float *Q, *B;  // the (sequence, head)'s D floats of each
  Lane l;
  simt::shared_ptr<T> tiles;
  simt::shared_ptr<float> oh_s;       // the chunk's Oh (kChunkRows; -inf where not valid)
  simt::shared_ptr<float> largest_s;  // the warps' maxima (kWarps)
  StateTile<T, D, BM> W;
  float b[kCount], q_e[kCount];  // B + e, Q + e at the thread's columns
  float a[kCount];               // the thread's rows' share of A at its columns
  float m, e_sum;   // the running maximum; the thread's rows' share of E (threads at column 0)

  FF_DEVICE K k_tile(int stage) const { return {tiles + stage * K::kSize}; }
  FF_DEVICE V v_tile(int stage) const { return {tiles + 2 * K::kSize + stage * V::kSize}; }

  FF_DEVICE void load_chunk(int64_t c, int stage) const {
    load_rows(k_tile(stage), side.x, side.row_stride(p), c * kChunkRows, span.length);
    load_rows(v_tile(stage), v, p.v_stride[2], c * kChunkRows, span.length);
  }

  template <FeatureMap F>
  FF_DEVICE void chunk(int64_t c, int stage) {
    const K k = k_tile(stage);
    const int64_t left = span.length - c * kChunkRows;
    if (side.pad != nullptr) {
      zero_padded_rows(v_tile(stage), side.pad + c * kChunkRows, left);
    }
    // A in the first value tile's blocks only (the block's uniform choice, from its place: no register kept)
    const bool takes_A = int(blockIdx.x) % (p.M / BM) == 0;
    float largest = -INFINITY;
    Rows::Pieces::each([&](int r, int col) {
      const bool kept = side.kept(c, r, left);
      float f[kCount];
      Rows::template features<F>(k, r, col, kept, f);
      const float dot = Rows::row_dot(f, b, p.eps);  // every lane of the row
      const float oh = kept ? fminf(fmaxf(dot, -p.clamp), p.clamp) : -INFINITY;
      if (takes_A) {
        const float source = Rows::row_dot(f, q_e, p.eps);  // every lane of the row
        const float O = kept ? 1.f / source : 0.f;
        FF_UNROLL
        for (int i = 0; i < kCount; ++i) {
          a[i] += O * f[i];
        }
      }
      largest = fmaxf(largest, oh);
      if (col == 0) {
        oh_s[r] = oh;
      }
    });
    const float top = fmaxf(m, block_max(largest, largest_s));
    if (top > m) {  // the block's uniform choice: the sums so far against the new maximum
      const float f = FeatureExp<T>{}(m - top);  // exp(-inf) = 0
      W.for_all(l, [&](float& x) { x *= f; });
      e_sum *= f;
      m = top;
    }
    Rows::Pieces::each([&](int r, int col) {
      const float oh = oh_s[r];
      const float w = oh == -INFINITY ? 0.f : FeatureExp<T>{}(oh - m);
      float f[kCount];
      Rows::template features<F>(k, r, col, oh != -INFINITY, f);  // zeros where not kept: w = 0 times them
      Piece<T> weighted;
      FF_UNROLL
      for (int j = 0; j < kCount / 2; ++j) {
        weighted.set_pair(j, w * f[2 * j], w * f[2 * j + 1]);
      }
      k.set_piece(r, col, weighted);
      if (col == 0) {
        e_sum += w;
      }
    });
    __syncthreads();
    W.add_product(l, k, v_tile(stage));
    __syncthreads();  // the stage may be loaded again
  }

  FF_DEVICE void run() {
    W.load(l, nullptr, 0);
    Rows::load_columns(B, p.eps, b);
    Rows::load_columns(Q, p.eps, q_e);
    FF_UNROLL
    for (int i = 0; i < kCount; ++i) {
      a[i] = 0.f;
    }
    portable::with_feature_map(p.feature_map, [&](auto map) {
      walk_chunks(span.chunks(), false, [&](int64_t c, int stage) { load_chunk(c, stage); },
                  [&](int64_t c, int stage) { chunk<decltype(map)::value>(c, stage); });
    });
    // the block's place and lane recomputed: nothing but the sums kept across the walk (no spill)
    const BlockPlace at = BlockPlace::of<BM>(p, p);
    const Lane lane = Lane::of(int(threadIdx.x));
    const int64_t sums_at = int64_t(at.unit) * p.H + at.head;  // this (segment, head) in (N G, H) arrays
    W.store(lane, p.W + sums_at * D * p.M + at.value_col, p.M);
    // E: the threads' shares added over each warp, then the warps' in order
    FF_UNROLL
    for (int offset = 16; offset > 0; offset /= 2) {
      e_sum += __shfl_xor_sync(0xffffffffu, e_sum, offset);
    }
    __syncthreads();  // the last chunk's reads of largest_s are done
    if (lane.lane == 0) {
      largest_s[lane.warp] = e_sum;
    }
    __syncthreads();
    if (at.value_col == 0) {  // the block's uniform choice: one value tile writes the segment's A
      Rows::store_column_sums(a, simt::shared_cast<float>(tiles), p.A + sums_at * D);  // after the walk's last barrier
    }
    if (threadIdx.x == 0 && at.value_col == 0) {
      float E = 0.f;
      FF_UNROLL
      for (int w = 0; w < kWarps; ++w) {
        E += largest_s[w];
      }
      simt::store_global(p.max + sums_at, m);
      simt::store_global(p.E + sums_at, E);
    }
  }
};

// At least one block a multiprocessor: without it ptxas spills a value to a lower register count (16-bit, D = 64).
template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) flow_key_sums_kernel(KeySumsParams p) {
  FF_DYNAMIC_SHARED(T, tiles);
  FF_SHARED(float, oh_s, kChunkRows);
  FF_SHARED(float, largest_s, kWarps);
  static_assert(kChunkRows + kWarps == kNoncausalStaticFloats, "the static shared memory the host counts");
  const BlockPlace at = BlockPlace::of<BM>(p, p);
  KeySumsBlock<T, D, BM> block{p,
                               at.span,
                               SideRows<T>::of(p, at),
                               at.span.rows<T>(p.v, p.v_stride, at.head) + at.value_col,
                               p.Q + (int64_t(at.sequence) * p.H + at.head) * D,
                               p.B + (int64_t(at.sequence) * p.H + at.head) * D,
                               Lane::of(int(threadIdx.x)),
                               tiles,
                               oh_s,
                               largest_s,
                               {},
                               {},
                               {},
                               {},
                               -INFINITY,
                               0.f};
  block.run();
}

template <int D>
void KeySums<D>::run(const KeySumsParams& p, void* stream) {
  launch_value_tiles<D, ValueTiles<D, chunk::value_tile>>(p, "flow_key_sums", "flow_attention", stream, [](auto type, auto tile) {
    using T = decltype(type);
    constexpr int BM = decltype(tile)::value;
    return std::pair{&flow_key_sums_kernel<T, D, BM>, KeySumsBlock<T, D, BM>::kSharedElements * sizeof(T)};
  });
}

}  // namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD
