// A chunk's rows read 16 bytes a thread at a time (ThreadPieces: a thread's pieces share one range of columns,
// and the kPerRow threads of a row are consecutive lanes of one warp), for the passes that need whole rows but
// no product: a piece's features as floats, a row's dot product added over its lanes by shuffles (row_sum), and
// column sums that each thread keeps in registers over a segment and the block adds at its end in a fixed order
// (store_column_sums). A warp reads whole rows: no bank conflicts, no barrier.
#pragma once

#include "chunk/row_ops.cuh"

namespace flowformer::chunk::FF_SIMT_BUILD {

template <typename T, int Width>
struct PieceRows {
  using Pieces = ThreadPieces<T, Width>;
  static constexpr int kCount = Pieces::kCount, kPerRow = Pieces::kPerRow;
  static_assert(32 % kPerRow == 0, "a row's threads in one warp");

  // The sum of x over the threads of this thread's row; each of them gets it.
  FF_DEVICE static float row_sum(float x) {
    FF_UNROLL
    for (int offset = kPerRow / 2; offset > 0; offset /= 2) {
      x += __shfl_xor_sync(0xffffffffu, x, offset);
    }
    return x;
  }
  // f = phi(x) of the piece of row r at column c (phi = F), or zeros where !kept.
  template <FeatureMap F>
  FF_DEVICE static void features(const ChunkTile<T, Width>& x, int r, int c, bool kept, float (&f)[kCount]) {
    const Piece<T> raw = x.piece(r, c);
    FF_UNROLL
    for (int i = 0; i < kCount; ++i) {
      const float fx = portable::feature<F>(float(raw.x[i]), FeatureExp<T>{});
      f[i] = kept ? fx : 0.f;
    }
  }
  // <f + eps, y> over the row (y: this thread's columns of a vector, eps already added to it).
  FF_DEVICE static float row_dot(const float (&f)[kCount], const float (&y)[kCount], float eps) {
    float dot = 0.f;
    FF_UNROLL
    for (int i = 0; i < kCount; ++i) {
      dot += (f[i] + eps) * y[i];
    }
    return row_sum(dot);
  }
  // y[i] = v[c + i] + eps for this thread's columns c.. of a global vector of Width floats.
  FF_DEVICE static void load_columns(const float* v, float eps, float (&y)[kCount]) {
    FF_UNROLL
    for (int i = 0; i < kCount; ++i) {
      y[i] = simt::load_global(v + Pieces::column() + i) + eps;
    }
  }
  // out[0 .. Width) = the sums acc of this thread's columns added over the threads of each column range in
  // thread order, through scratch (kThreads x kCount floats of shared memory, free: after the block's last
  // barrier that ends its reads of what it overlays). Block-wide: one barrier.
  FF_DEVICE static void store_column_sums(const float (&acc)[kCount], simt::shared_ptr<float> scratch, float* out) {
    FF_UNROLL
    for (int i = 0; i < kCount; ++i) {
      scratch[int(threadIdx.x) * kCount + i] = acc[i];
    }
    __syncthreads();
    for (int c = int(threadIdx.x); c < Width; c += kThreads) {
      float sum = 0.f;
      for (int t = c / kCount; t < kThreads; t += kPerRow) {
        sum += scratch[t * kCount + c % kCount];
      }
      simt::store_global(out + c, sum);
    }
  }
};

}  // namespace flowformer::chunk::FF_SIMT_BUILD
