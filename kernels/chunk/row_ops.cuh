// Block-wide passes over a chunk tile in shared memory, 16 bytes a thread at a time: the feature map phi (as a
// compile-time parameter, chosen once at run time), padding rows to zero, rows scaled into [-1, 1] by a power
// of two before 16-bit products; and phi' for the gradients.
#pragma once

#include "chunk/shared_tiles.cuh"
#include "common/feature_map_kind.h"
#include "common/portable.h"

#include <cmath>
#include <type_traits>

namespace flowformer::chunk::FF_SIMT_BUILD {

// The exponential of the feature maps of T inputs: simt::fast_exp for 16-bit inputs (its 2^-22 relative error is
// far below their rounding), expf for float inputs.
template <typename T>
struct FeatureExp {
  FF_DEVICE float operator()(float x) const {
    if constexpr (std::is_same_v<T, float>) {
      return expf(x);
    } else {
      return simt::fast_exp(x);
    }
  }
};

// feature = phi(raw) for the chunk's rows, phi = F; rows at or past `valid`, and rows r where pad[r] (pad: the
// chunk's padding flags, or null) become 0 (padding contributes nothing). 16 bytes a thread at a time.
template <FeatureMap F, typename T, int Width>
FF_DEVICE void apply_feature_map(const ChunkTile<T, Width>& raw, const ChunkTile<T, Width>& feature, int64_t valid,
                                 const bool* pad) {
  ThreadPieces<T, Width>::each([&](int r, int c) {
    const bool kept = r < valid && (pad == nullptr || !simt::load_global(pad + r));
    const Piece<T> x = raw.piece(r, c);
    Piece<T> y;
    FF_UNROLL
    for (int j = 0; j < Piece<T>::kCount / 2; ++j) {
      const auto phi = [&](int i) {
        const float fx = portable::feature<F>(float(x.x[i]), FeatureExp<T>{});  // then a select: no branch
        return kept ? fx : 0.f;
      };
      y.set_pair(j, phi(2 * j), phi(2 * j + 1));
    }
    feature.set_piece(r, c, y);
  });
}
// The same with the feature map f chosen at run time (once, outside the loop).
template <typename T, int Width>
FF_DEVICE void apply_feature_map(FeatureMap f, const ChunkTile<T, Width>& raw, const ChunkTile<T, Width>& feature,
                                 int64_t valid, const bool* pad = nullptr) {
  portable::with_feature_map(f, [&](auto map) { apply_feature_map<decltype(map)::value>(raw, feature, valid, pad); });
}

// Rows r of `tile` where pad[r] (the chunk's padding flags) become 0, for rows before `valid`: padded values
// count for nothing whatever they hold (NaN times a zero feature would not).
template <typename T, int Width>
FF_DEVICE void zero_padded_rows(const ChunkTile<T, Width>& tile, const bool* pad, int64_t valid) {
  Piece<T> zero;
  FF_UNROLL
  for (int j = 0; j < Piece<T>::kCount / 2; ++j) {
    zero.set_pair(j, 0.f, 0.f);
  }
  ThreadPieces<T, Width>::each([&](int r, int c) {
    if (r < valid && simt::load_global(pad + r)) {
      tile.set_piece(r, c, zero);
    }
  });
}

// e with 2^e at or above the largest |x[r][c]| scale(r) over the chunk, or 0 (all zero): the exponent of the
// power of two that brings the rows x_r scale(r) within [-1, 1] for 16-bit products. Block-wide: a barrier;
// largest_s: kWarps floats of shared memory.
template <typename T, int Width, typename Scale>
FF_DEVICE int chunk_exponent(const ChunkTile<T, Width>& x, const Scale& scale, simt::shared_ptr<float> largest_s) {
  static_assert(kThreads == 2 * kChunkRows, "two threads a row");
  const int r = int(threadIdx.x) / 2, part = int(threadIdx.x) % 2;  // warp w: rows 16 w .. 16 w + 15
  constexpr int kCount = Piece<T>::kCount;
  static_assert(Width / 2 % kCount == 0, "half a row in pieces");
  float largest = 0.f;
  for (int c = part * (Width / 2); c < (part + 1) * (Width / 2); c += kCount) {
    const Piece<T> p = x.piece(r, c);
    FF_UNROLL
    for (int j = 0; j < kCount; ++j) {
      largest = fmaxf(largest, fabsf(float(p.x[j])));
    }
  }
  int exponent = 0;
  frexpf(block_max(largest * scale(r), largest_s), &exponent);
  return exponent;
}

// x_r scale(r) 2^-e in place, e = chunk_exponent(x, scale): rows within [-1, 1] for 16-bit products (no overflow,
// no row's share lost to underflow). Returns e. Block-wide: ends with a barrier.
template <typename T, int Width, typename Scale>
FF_DEVICE int scale_rows_into_unit(const ChunkTile<T, Width>& x, const Scale& scale,
                                   simt::shared_ptr<float> largest_s) {
  const int e = chunk_exponent(x, scale, largest_s);  // its barrier: every read of x done
  const float down = ldexpf(1.f, -e);                 // a power of two: exact products
  ThreadPieces<T, Width>::each([&](int r, int c) {
    const float s = scale(r) * down;
    const Piece<T> p = x.piece(r, c);
    Piece<T> scaled;
    FF_UNROLL
    for (int j = 0; j < Piece<T>::kCount / 2; ++j) {
      scaled.set_pair(j, float(p.x[2 * j]) * s, float(p.x[2 * j + 1]) * s);
    }
    x.set_piece(r, c, scaled);
  });
  __syncthreads();
  return e;
}

// The gradient of a raw input x from that of its feature phi(x): grad phi'(x).
template <FeatureMap F, typename T>
FF_DEVICE float feature_gradient(float grad, float x) {
  return grad * portable::feature_derivative<F>(x, portable::feature<F>(x, FeatureExp<T>{}));
}

}  // namespace flowformer::chunk::FF_SIMT_BUILD
