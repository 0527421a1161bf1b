// Where a backward block writes the gradients of its rows (GradientRows): dq or dk through the feature map's
// derivative, in the inputs' type or as its value tile's float share, and dv; for the backward kernels of every
// family on the chunk layer.
#pragma once

#include "chunk/inputs.h"
#include "chunk/row_ops.cuh"
#include "chunk/sequence.cuh"

#include <cstdint>

namespace flowformer::chunk::FF_SIMT_BUILD {

// The rows B H L of the (B, H, L, ...) inputs (B = 1 for packed sequences).
FF_DEVICE int64_t input_rows(const Inputs& p) { return int64_t(p.cu_seqlens != nullptr ? 1 : p.N) * p.H * p.L; }

// Where a backward block writes its gradients: the rows of its span (from rows_at in (B, H, L, ...) row arrays)
// of its value tile (value_col, of BM columns).
struct GradientRows {
  int64_t rows_at;
  int value_col, tile;  // tile: value_col / BM

  // Columns n0 .. n0 + N - 1 of the warp's rows of chunk c of dq or dk ((B, H, L, D), `grad`): in T, or as
  // floats to the block's tile's share (parts: Gradients::dq_parts or dk_parts, value tiles).
  template <typename T, int D, int N, typename Value>
  FF_DEVICE void store_d(const Lane& l, const Inputs& p, void* grad, float* parts, int64_t c, int n0,
                         int64_t left, const Value& value) const {
    const int64_t first = (rows_at + c * kChunkRows) * D + n0;
    if (parts != nullptr) {
      store_rows<float, N>(l, parts + tile * input_rows(p) * D + first, D, left, value);
    } else {
      store_rows<T, N>(l, static_cast<T*>(grad) + first, D, left, value);
    }
  }
  // store_d of the gradients of raw inputs: value(n, e, through) returns through(g, x) = g phi'(x) from the
  // gradient g of the feature phi(x) of the raw input x there (or a value of its own), phi = p.feature_map chosen
  // once, outside the loop.
  template <typename T, int D, int N, typename Value>
  FF_DEVICE void store_d_through_feature(const Lane& l, const Inputs& p, void* grad, float* parts, int64_t c, int n0,
                                         int64_t left, const Value& value) const {
    portable::with_feature_map(p.feature_map, [&](auto map) {
      const auto through = [](float g, float x) { return feature_gradient<decltype(map)::value, T>(g, x); };
      store_d<T, D, N>(l, p, grad, parts, c, n0, left, [&](int n, int e) { return value(n, e, through); });
    });
  }
  // The block's BM columns of the warp's rows of chunk c of dv ((B, H, L, M)).
  template <typename T, int BM, typename Value>
  FF_DEVICE void store_v(const Lane& l, const Inputs& p, void* dv, int64_t c, int64_t left,
                         const Value& value) const {
    store_rows<T, BM>(l, static_cast<T*>(dv) + (rows_at + c * kChunkRows) * p.M + value_col, p.M, left, value);
  }
};

}  // namespace flowformer::chunk::FF_SIMT_BUILD
