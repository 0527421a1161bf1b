// The output of every row from one state per sequence (non-causal linear attention), fused on tensor cores
// (bf16, half or float32 inputs, float32 state and sums). One block of 4 warps walks one (segment, head, value tile of
// BM columns) in chunks of 64 rows; with q = phi(query) and the sequence's sums (S, z):
//   num_t = q_t^T S     mma, S as 16-bit parts (StateTile: 2^-e scaled for half)
//   den_t = <q_t, z> + eps   (1 without normalisation; z published beside S: one more n8 tile)   out_t = num_t / den_t
// Warp w owns the chunk rows 16 w .. 16 w + 15; the q tiles of chunk c + 1 load by cp.async meanwhile.
#pragma once

#include "linear_attention/blocks.cuh"

namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD {

template <typename T, int D, int BM>
struct StateOutputBlock {
  using Q = ChunkTile<T, D>;
  using State = StateTile<T, D, BM, /*Vector=*/true>;  // (S, z)
  using StateParts = SharedMatrix<T, D, BM>;
  static constexpr std::size_t kSharedElements = 2 * Q::kSize + 2 * StateParts::kSize;
  static_assert(kSharedElements * sizeof(T) == state_output_shared_bytes(D, BM, sizeof(T)),
                "the layout the host sizes");

  const StateOutputParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;
  const T* q;   // the segment's first row
  T* out;       // its first output row, at the block's value columns
  int64_t state_at;  // offset of this (sequence, head) in the (N, H, D, M) state, at the block's value columns
  Lane l;
  simt::shared_ptr<T> tiles;
  simt::shared_ptr<float> largest_s;
  State S;

  FF_DEVICE Q q_tile(int stage) const { return {tiles + stage * Q::kSize}; }
  FF_DEVICE StateParts s_hi() const { return {tiles + 2 * Q::kSize}; }
  FF_DEVICE StateParts s_lo() const { return {tiles + 2 * Q::kSize + StateParts::kSize}; }

  FF_DEVICE void chunk(int64_t c, int stage) const {
    const int64_t left = span.length - c * kChunkRows;
    apply_feature_map(p.feature_map, q_tile(stage), q_tile(stage), left);
    __syncthreads();
    RowTile<State::kWidth> num;  // 2^-e q S; its last n8 tile 2^-e <q_t, z> in every column
    num.zero();
    State::template rows_times<true>(l, q_tile(stage), s_hi(), s_lo(), num);
    float scale[2];
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const float qz = num.acc[BM / 8][2 * i] * S.unscale();
      scale[i] = S.unscale() / (p.normalize ? qz + p.eps : 1.f);
    }
    store_rows<T, BM>(l, out + c * kChunkRows * p.M, p.M, left,
                      [&](int n, int e) { return num.acc[n][e] * scale[e / 2]; });
    __syncthreads();  // the stage may be loaded again
  }

  FF_DEVICE void run() {
    S.load(l, p.kv + state_at, p.M, p.z + state_at / p.M);  // value_col < M
    S.publish(l, s_hi(), s_lo(), largest_s);
    walk_chunks(span.chunks(), false,
                [&](int64_t c, int stage) { load_rows(q_tile(stage), q, p.q_stride[2], c * kChunkRows, span.length); },
                [&](int64_t c, int stage) { chunk(c, stage); });
  }
};

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) state_output_kernel(StateOutputParams p) {
  FF_DYNAMIC_SHARED(T, tiles);
  FF_SHARED(float, largest_s, kWarps);
  const BlockPlace at = BlockPlace::of<BM>(p, p);
  StateOutputBlock<T, D, BM> block{p,
                                   at.span,
                                   at.span.rows<T>(p.q, p.q_stride, at.head),
                                   at.output_rows<T>(p, p.out),
                                   at.state_at(p, at.sequence) + at.value_col,
                                   Lane::of(int(threadIdx.x)),
                                   tiles,
                                   largest_s,
                                   {}};
  block.run();
}

template <int D>
void StateOutput<D>::run(const StateOutputParams& p, void* stream) {
  launch_forward_like<D>(p, "state_output", "linear_attention", stream, [](auto type, auto tile) {
    using Block = StateOutputBlock<decltype(type), D, decltype(tile)::value>;
    return std::pair{&state_output_kernel<decltype(type), D, decltype(tile)::value>,
                     Block::kSharedElements * sizeof(decltype(type))};
  });
}

}  // namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD
