// Causal linear attention, forward, fused on tensor cores (bf16, half or float32 inputs, float32 state and sums).
// One block of 4 warps walks one (sequence, head, value tile of BM columns) through its sequence in chunks
// of 64 rows. With q, k = phi(query), phi(key) and (S, z) the state before chunk c, for its rows t:
//   G[t, j] = <q_t, k_j> for the chunk's rows j <= t            mma, float accumulators
//   num_t   = q_t^T S + sum_j G[t, j] v_j                        mma: S as 16-bit parts (StateTile), G rounded
//                                                                (float32: S and G as they are, 3 tf32 products)
//   den_t   = <q_t, z> + sum_j G[t, j] + eps                     <q_t, z>: one more n8 tile of q_t^T S (z
//                                                                published beside S), the row sums: G's registers
//   out_t   = num_t / den_t   (num_t without normalisation)
//   S += k^T v,  z += k^T 1   (mma into float accumulators that stay in registers; StateTile's vector)
// Warp w owns the chunk rows 16 w .. 16 w + 15 (so only the key tiles up to its diagonal are multiplied)
// and a quarter of the state's 16 x 16 units; one A fragment of q_t serves G and both parts of S. The q, k, v
// tiles of chunk c + 1 are loaded by cp.async while chunk c is computed; the feature map is applied in shared
// memory, 16 bytes a thread at a time (rows past the sequence get phi(k) = 0). Three barriers a chunk.
// With segments (the split schedule, fused_kernels.h) a block walks one segment from its incoming state (the
// segments' sums come from segment_sums.cuh). For half inputs the state's 16-bit parts are scaled by 2^-e
// (e > 0 only once |S| reaches 2^14) so that they cannot overflow; the chunk's G is scaled alike and num
// is multiplied back by 2^e.
#pragma once

#include "linear_attention/blocks.cuh"

#include <stdexcept>
#include <string>

namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD {

template <typename T, int D, int BM>
struct CausalForwardBlock {
  using Q = ChunkTile<T, D>;
  using V = ChunkTile<T, BM>;
  using State = StateTile<T, D, BM, /*Vector=*/true>;  // (S, z)
  using StateParts = SharedMatrix<T, D, BM>;
  static constexpr std::size_t kSharedElements = 4 * Q::kSize + 2 * V::kSize + 2 * StateParts::kSize;
  static_assert(kSharedElements * sizeof(T) == causal_forward_shared_bytes(D, BM, sizeof(T)),
                "the layout the host sizes");

  const CausalForwardParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;
  const T *q, *k, *v;  // the sequence's first row (v: of the block's value columns)
  T* out;
  int value_col;
  int64_t state_at;  // offset of this (sequence, head) in the state tensors (N, H, D, M)
  Lane l;
  simt::shared_ptr<T> tiles;
  simt::shared_ptr<float> largest_s;
  State S;

  FF_DEVICE Q q_tile(int stage) const { return {tiles + stage * Q::kSize}; }
  FF_DEVICE Q k_tile(int stage) const { return {tiles + (2 + stage) * Q::kSize}; }
  FF_DEVICE V v_tile(int stage) const { return {tiles + 4 * Q::kSize + stage * V::kSize}; }
  FF_DEVICE StateParts s_hi() const { return {tiles + 4 * Q::kSize + 2 * V::kSize}; }
  FF_DEVICE StateParts s_lo() const { return {tiles + 4 * Q::kSize + 2 * V::kSize + StateParts::kSize}; }

  FF_DEVICE void load_chunk(int64_t c, int stage) const {
    const int64_t first = c * kChunkRows;
    load_rows(q_tile(stage), q, p.q_stride[2], first, span.length);
    load_rows(k_tile(stage), k, p.k_stride[2], first, span.length);
    load_rows(v_tile(stage), v, p.v_stride[2], first, span.length);
  }

  // The warp's rows of chunk c: out = num / den, num = q S + (masked q k^T) v, den = q z + row sums + eps.
  FF_DEVICE void chunk_rows(int64_t c, int stage) const {
    const Q q = q_tile(stage), k = k_tile(stage);
    Scores<true> G;
    RowTile<State::kWidth> num;  // 2^-e (q S, then + G v); its last n8 tile 2^-e <q_t, z> in every column
    num.zero();
    scores_and_state_rows<State>(l, q, k, s_hi(), s_lo(), G, num);
    G.mask(l, [](int, int) { return 0.f; });
    float score_sum[2] = {0.f, 0.f};
    G.s.row_sums(score_sum);
    G.template times<T>(l, v_tile(stage), S.scale(), num);
    const int64_t left = span.length - c * kChunkRows;
    float scale[2];
    FF_UNROLL
    for (int i = 0; i < 2; ++i) {
      const float qz = num.acc[BM / 8][2 * i] * S.unscale();
      scale[i] = S.unscale() / (p.normalize ? qz + score_sum[i] + p.eps : 1.f);
    }
    store_rows<T, BM>(l, out + c * kChunkRows * p.M, p.M, left,
                      [&](int n, int e) { return num.acc[n][e] * scale[e / 2]; });
  }

  FF_DEVICE void run() {
    S.load(l, p.kv0 != nullptr ? p.kv0 + state_at + value_col : nullptr, p.M,
           p.z0 != nullptr ? p.z0 + state_at / p.M : nullptr);
    S.publish(l, s_hi(), s_lo(), largest_s);
    walk_chunks(span.chunks(), false, [&](int64_t c, int stage) { load_chunk(c, stage); },
                [&](int64_t c, int stage) {
                  const int64_t left = span.length - c * kChunkRows;
                  apply_feature_map(p.feature_map, k_tile(stage), k_tile(stage), left);
                  apply_feature_map(p.feature_map, q_tile(stage), q_tile(stage), left);
                  __syncthreads();
                  chunk_rows(c, stage);
                  S.add_product(l, k_tile(stage), v_tile(stage));
                  __syncthreads();  // the stage may be loaded again, the state's parts rewritten
                  S.publish(l, s_hi(), s_lo(), largest_s);  // read after the next chunk's first barrier
                });
    if (p.kv_final == nullptr) {
      return;
    }
    S.store(l, p.kv_final + state_at + value_col, p.M);
    if (value_col == 0) {
      S.store_vector(l, p.z_final + state_at / p.M);
    }
  }
};

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads, 1) causal_forward_kernel(CausalForwardParams p) {
  using Block = CausalForwardBlock<T, D, BM>;
  FF_DYNAMIC_SHARED(T, tiles);
  FF_SHARED(float, largest_s, kWarps);
  const BlockPlace at = BlockPlace::of<BM>(p, p);
  Block block{p,
              at.span,
              at.span.rows<T>(p.q, p.q_stride, at.head),
              at.span.rows<T>(p.k, p.k_stride, at.head),
              at.span.rows<T>(p.v, p.v_stride, at.head) + at.value_col,
              at.output_rows<T>(p, p.out),
              at.value_col,
              at.state_at(p, at.unit),
              Lane::of(int(threadIdx.x)),
              tiles,
              largest_s,
              {}};
  block.run();
}

template <int D>
void CausalForward<D>::run(const CausalForwardParams& p, void* stream) {
  launch_forward_like<D>(p, "causal_forward", "causal_linear_attention", stream, [](auto type, auto tile) {
    using Block = CausalForwardBlock<decltype(type), D, decltype(tile)::value>;
    return std::pair{&causal_forward_kernel<decltype(type), D, decltype(tile)::value>,
                     Block::kSharedElements * sizeof(decltype(type))};
  });
}

}  // namespace flowformer::linear_attention_kernels::FF_SIMT_BUILD
