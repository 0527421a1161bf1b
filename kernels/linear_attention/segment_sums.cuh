// Sums of keys and values per segment, fused on tensor cores (bf16, half or float32 inputs, float32 sums). One block
// of 4 warps walks one (segment, head, value tile of BM columns) in chunks of 64 rows, with k = phi(key):
//   kv = sum_j k_j v_j^T,  z = sum_j k_j   (mma into float accumulators that stay in registers: StateTile's vector)
// over the segment's rows j that are not padding (padded rows of k and v are zeroed in shared memory, so
// that whatever they hold contributes nothing). It is the state pass of the causal split schedule and the
// reduction of the non-causal op, whose host adds the segments' sums in their order.
#pragma once

#include "linear_attention/blocks.cuh"

namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD {

template <typename T, int D, int BM>
struct SegmentSumsBlock {
  using K = ChunkTile<T, D>;
  using V = ChunkTile<T, BM>;
  static constexpr std::size_t kSharedElements = 2 * K::kSize + 2 * V::kSize;
  static_assert(kSharedElements * sizeof(T) == segment_sums_shared_bytes(D, BM, sizeof(T)),
                "the layout the host sizes");

  const SegmentSumsParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;
  const T *k, *v;     // the segment's first row (v: of the block's value columns)
  const bool* pad;    // the segment's first padding flag, or null
  int value_col;
  int64_t sums_at;    // offset of this (segment, head) in the (N G, H, D, M) sums
  Lane l;
  simt::shared_ptr<T> tiles;
  StateTile<T, D, BM, /*Vector=*/true> S;

  FF_DEVICE K k_tile(int stage) const { return {tiles + stage * K::kSize}; }
  FF_DEVICE V v_tile(int stage) const { return {tiles + 2 * K::kSize + stage * V::kSize}; }

  FF_DEVICE void load_chunk(int64_t c, int stage) const {
    load_rows(k_tile(stage), k, p.k_stride[2], c * kChunkRows, span.length);
    load_rows(v_tile(stage), v, p.v_stride[2], c * kChunkRows, span.length);
  }

  FF_DEVICE void chunk(int64_t c, int stage) {
    const bool* chunk_pad = pad != nullptr ? pad + c * kChunkRows : nullptr;
    apply_feature_map(p.feature_map, k_tile(stage), k_tile(stage), span.length - c * kChunkRows, chunk_pad);
    if (chunk_pad != nullptr) {
      zero_padded_rows(v_tile(stage), chunk_pad, span.length - c * kChunkRows);
    }
    __syncthreads();
    S.add_product(l, k_tile(stage), v_tile(stage));
    __syncthreads();  // the stage may be loaded again
  }

  FF_DEVICE void run() {
    S.load(l, nullptr, 0);
    walk_chunks(span.chunks(), false, [&](int64_t c, int stage) { load_chunk(c, stage); },
                [&](int64_t c, int stage) { chunk(c, stage); });
    S.store(l, p.kv + sums_at + value_col, p.M);
    if (value_col == 0) {
      S.store_vector(l, p.z + sums_at / p.M);
    }
  }
};

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) segment_sums_kernel(SegmentSumsParams p) {
  FF_DYNAMIC_SHARED(T, tiles);
  const BlockPlace at = BlockPlace::of<BM>(p, p);
  SegmentSumsBlock<T, D, BM> block{p,
                                   at.span,
                                   at.span.rows<T>(p.k, p.k_stride, at.head),
                                   at.span.rows<T>(p.v, p.v_stride, at.head) + at.value_col,
                                   p.key_pad != nullptr ? p.key_pad + at.span.batch * p.L + at.span.first : nullptr,
                                   at.value_col,
                                   at.state_at(p, at.unit),
                                   Lane::of(int(threadIdx.x)),
                                   tiles,
                                   {}};
  block.run();
}

template <int D>
void SegmentSums<D>::run(const SegmentSumsParams& p, void* stream) {
  launch_forward_like<D>(p, "segment_sums", "linear_attention", stream, [](auto type, auto tile) {
    using Block = SegmentSumsBlock<decltype(type), D, decltype(tile)::value>;
    return std::pair{&segment_sums_kernel<decltype(type), D, decltype(tile)::value>,
                     Block::kSharedElements * sizeof(decltype(type))};
  });
}

}  // namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD
