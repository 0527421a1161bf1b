// Pass 4 of non-causal Flow-Attention (DESIGN.md): the output, fused on tensor cores (bf16, half or float32
// inputs, float32 sums). One block of 4 warps walks one (segment, head, value tile of BM columns) of the
// queries in chunks of 64 rows; with q = phi(query), the keys' sums K, A and W (all segments' added), and per
// (sequence, head) the allocation factor L / S and the scale S / E of the competition:
//   I_i   = 1 / <q_i + e, K + e>,  a_i = sigmoid(<q_i + e, A + e> L / S)   a thread 16 bytes of a row, the row's
//                                                                          threads added by shuffles
//   out_i = a_i I_i (S / E) q_i^T W                                        mma, W as 16-bit parts (StateTile)
// for the valid queries i, 0 for the padded ones. The features replace the raw rows in shared memory. Three
// barriers a chunk: the tiles landed, the features and row scales, the chunk's end.
#pragma once

#include "flow_attention/blocks.cuh"

namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD {

template <typename T, int D, int BM>
struct QueryOutputBlock {
  using Q = ChunkTile<T, D>;
  using Rows = PieceRows<T, D>;
  using State = StateTile<T, D, BM>;
  using StateParts = SharedMatrix<T, D, BM>;
  static constexpr int kCount = Rows::kCount;
  static constexpr std::size_t kSharedElements = 2 * Q::kSize + 2 * StateParts::kSize;
  static_assert(kSharedElements == query_output_elements(D, BM), "the layout the host sizes");

  const QueryOutputParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;
  SideRows<T> side;
  T* out;             // the segment's first output row, at the block's value columns
  int64_t vectors_at;  // offset of this (sequence, head) in (N, H) arrays
  int value_col;
  Lane l;
  simt::shared_ptr<T> tiles;
  simt::shared_ptr<float> scale_s;    // the chunk's rows' a_i I_i S / E (kChunkRows)
  simt::shared_ptr<float> largest_s;  // kWarps
  State W;
  float k_e[kCount], a_e[kCount];  // K + e, A + e at the thread's columns
  float allocation, scale;

  FF_DEVICE Q q_tile(int stage) const { return {tiles + stage * Q::kSize}; }
  FF_DEVICE StateParts w_hi() const { return {tiles + 2 * Q::kSize}; }
  FF_DEVICE StateParts w_lo() const { return {tiles + 2 * Q::kSize + StateParts::kSize}; }

  template <FeatureMap F>
  FF_DEVICE void chunk(int64_t c, int stage) {
    const Q q = q_tile(stage);
    const int64_t left = span.length - c * kChunkRows;
    Rows::Pieces::each([&](int r, int col) {
      const bool kept = side.kept(c, r, left);
      float f[kCount];
      Rows::template features<F>(q, r, col, kept, f);
      const float sink = Rows::row_dot(f, k_e, p.eps), conserved = Rows::row_dot(f, a_e, p.eps);
      Piece<T> feature;
      FF_UNROLL
      for (int j = 0; j < kCount / 2; ++j) {
        feature.set_pair(j, f[2 * j], f[2 * j + 1]);
      }
      q.set_piece(r, col, feature);
      if (col == 0) {
        const float a = 1.f / (1.f + FeatureExp<T>{}(-conserved * allocation));
        scale_s[r] = kept ? a * scale / sink : 0.f;
      }
    });
    __syncthreads();
    RowTile<BM> num;  // 2^-e q W
    num.zero();
    State::template rows_times<true>(l, q, w_hi(), w_lo(), num);
    const float unscale = W.unscale();
    float row_scale[2];
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      row_scale[i] = scale_s[l.row(2 * i)] * unscale;
    }
    store_rows<T, BM>(l, out + c * kChunkRows * p.M, p.M, left,
                      [&](int n, int e) { return num.acc[n][e] * row_scale[e / 2]; });
    __syncthreads();  // the stage may be loaded again
  }

  FF_DEVICE void run() {
    W.load(l, p.W + vectors_at * D * p.M + value_col, p.M);
    W.publish(l, w_hi(), w_lo(), largest_s);
    Rows::load_columns(p.K + vectors_at * D, p.eps, k_e);
    Rows::load_columns(p.A + vectors_at * D, p.eps, a_e);
    allocation = simt::load_global(p.allocation + span.batch);
    scale = simt::load_global(p.scale + vectors_at);
    portable::with_feature_map(p.feature_map, [&](auto map) {
      walk_chunks(span.chunks(), false,
                  [&](int64_t c, int stage) {
                    load_rows(q_tile(stage), side.x, side.row_stride(p), c * kChunkRows, span.length);
                  },
                  [&](int64_t c, int stage) { chunk<decltype(map)::value>(c, stage); });
    });
  }
};

// At least one block a multiprocessor: without it ptxas spills a value to a lower register count (float32, D = 64).
template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) flow_query_output_kernel(QueryOutputParams p) {
  FF_DYNAMIC_SHARED(T, tiles);
  FF_SHARED(float, scale_s, kChunkRows);
  FF_SHARED(float, largest_s, kWarps);
  static_assert(kChunkRows + kWarps == kNoncausalStaticFloats, "the static shared memory the host counts");
  const BlockPlace at = BlockPlace::of<BM>(p, p);
  QueryOutputBlock<T, D, BM> block{p,
                                   at.span,
                                   SideRows<T>::of(p, at),
                                   at.output_rows<T>(p, p.out),
                                   int64_t(at.sequence) * p.H + at.head,
                                   at.value_col,
                                   Lane::of(int(threadIdx.x)),
                                   tiles,
                                   scale_s,
                                   largest_s,
                                   {},
                                   {},
                                   {},
                                   0.f,
                                   0.f};
  block.run();
}

template <int D>
void QueryOutput<D>::run(const QueryOutputParams& p, void* stream) {
  launch_value_tiles<D, ValueTiles<D, chunk::value_tile>>(p, "flow_query_output", "flow_attention", stream,
                                           [](auto type, auto tile) {
                                             using T = decltype(type);
                                             constexpr int BM = decltype(tile)::value;
                                             return std::pair{&flow_query_output_kernel<T, D, BM>,
                                                              QueryOutputBlock<T, D, BM>::kSharedElements * sizeof(T)};
                                           });
}

}  // namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD
