// Passes 1 and 2 of non-causal Flow-Attention (DESIGN.md), CUDA cores, memory-bound. One block of 4 warps walks
// one (segment, head) of one side's rows x (phi(query) or phi(key)) in chunks of 64 rows and writes
//   sums = sum_j w_j x_j  over the segment's valid rows j,  w_j = 1                         (pass 1: Q, K)
//                                                           w_j = 1 / <x_j + e, Y + e>      (pass 2: B, A)
// with Y the other side's sum (I_i = 1 / <q_i + e, K + e>, O_j = 1 / <k_j + e, Q + e>). A thread reads 16 bytes
// of a row at a time (PieceRows), the row's threads add their parts of <x_j + e, Y + e> by shuffles, and each
// thread keeps its columns' sums in registers until the segment ends: no barrier a chunk but the walk's.
#pragma once

#include "flow_attention/blocks.cuh"

namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD {

template <typename T, int D>
struct VectorSumsBlock {
  using X = ChunkTile<T, D>;
  using Rows = PieceRows<T, D>;
  static constexpr int kCount = Rows::kCount;
  static constexpr std::size_t kSharedElements = 2 * X::kSize;
  static_assert(kSharedElements == vector_sums_elements(D), "the layout the host sizes");
  static_assert(kSharedElements * sizeof(T) >= kThreads * kCount * sizeof(float), "room for the column sums");

  const VectorSumsParams p;  // a copy: a kernel parameter's address would put it in local memory
  SequenceSpan span;
  SideRows<T> side;
  const float* other;  // the (sequence, head)'s D floats of Y, or nullptr (pass 1)
  float* sums;         // the (segment, head)'s D floats
  simt::shared_ptr<T> tiles;
  float y[kCount];    // Y + e at the thread's columns (pass 2)
  float acc[kCount];  // the thread's rows' sums at its columns

  FF_DEVICE X tile(int stage) const { return {tiles + stage * X::kSize}; }

  template <FeatureMap F>
  FF_DEVICE void chunk(int64_t c, int stage) {
    const int64_t left = span.length - c * kChunkRows;
    Rows::Pieces::each([&](int r, int col) {
      const bool kept = side.kept(c, r, left);
      float f[kCount];
      Rows::template features<F>(tile(stage), r, col, kept, f);
      float w = 1.f;
      if (other != nullptr) {
        const float dot = Rows::row_dot(f, y, p.eps);
        w = kept ? 1.f / dot : 0.f;
      }
      FF_UNROLL
      for (int i = 0; i < kCount; ++i) {
        acc[i] += w * f[i];
      }
    });
    __syncthreads();  // the stage may be loaded again
  }

  FF_DEVICE void run() {
    FF_UNROLL
    for (int i = 0; i < kCount; ++i) {
      acc[i] = 0.f;
      y[i] = 0.f;
    }
    if (other != nullptr) {
      Rows::load_columns(other, p.eps, y);
    }
    portable::with_feature_map(p.feature_map, [&](auto map) {
      walk_chunks(span.chunks(), false,
                  [&](int64_t c, int stage) { load_rows(tile(stage), side.x, side.row_stride(p), c * kChunkRows, span.length); },
                  [&](int64_t c, int stage) { chunk<decltype(map)::value>(c, stage); });
    });
    Rows::store_column_sums(acc, simt::shared_cast<float>(tiles), sums);
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flow_vector_sums_kernel(VectorSumsParams p) {
  FF_DYNAMIC_SHARED(T, tiles);
  const BlockPlace at = BlockPlace::of_unit(p, p);
  VectorSumsBlock<T, D> block{p,
                              at.span,
                              SideRows<T>::of(p, at),
                              p.other != nullptr ? p.other + (int64_t(at.sequence) * p.H + at.head) * D : nullptr,
                              p.sums + (int64_t(at.unit) * p.H + at.head) * D,
                              tiles,
                              {},
                              {}};
  block.run();
}

template <int D>
void VectorSums<D>::run(const VectorSumsParams& p, void* stream) {
  launch_units<D>(p, "flow_vector_sums", "flow_attention", stream, [](auto type) {
    using T = decltype(type);
    return std::pair{&flow_vector_sums_kernel<T, D>, VectorSumsBlock<T, D>::kSharedElements * sizeof(T)};
  });
}

}  // namespace flowformer::flow_attention_kernels::FF_SIMT_BUILD
