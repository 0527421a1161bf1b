// One decoding step of causal linear attention (L = 1) as a single launch, with no chunk machinery:
//   S' = S + k v^T    z' = z + k    out = q^T S' / (q^T z' + eps)   (or q^T S' without normalisation)
// Items: BH * M for out, then BH * D * M for S', then BH * D for z'. q and k are read through phi.
#pragma once

#include "common/portable.h"

namespace flowformer::portable {

template <typename T, typename A>
struct DecodeStep {
  Rows<T> q, k, v;    // (B, H, 1, D), (B, H, 1, D), (B, H, 1, M)
  int64_t BH;
  const A* kv;        // (BH, D, M) state before the step, or nullptr (zeros)
  const A* z;         // (BH, D), or nullptr
  bool normalize;
  A eps;
  T* out;             // (BH, M)
  A* kv_out;          // (BH, D, M)
  A* z_out;           // (BH, D)

  static constexpr int64_t items(int64_t BH, int64_t D, int64_t M) { return BH * (M + D * M + D); }

  FF_HD A state(int64_t bh, int64_t d, int64_t m) const {
    const int64_t D = q.width, M = v.width;
    return (kv != nullptr ? kv[(bh * D + d) * M + m] : A(0)) +
           k.template get<A>(bh, 0, d) * v.template get<A>(bh, 0, m);
  }
  FF_HD A normaliser(int64_t bh, int64_t d) const {
    return (z != nullptr ? z[bh * q.width + d] : A(0)) + k.template get<A>(bh, 0, d);
  }

  FF_HD void operator()(int64_t item) const {
    const int64_t D = q.width, M = v.width;
    if (item < BH * M) {
      const int64_t m = item % M, bh = item / M;
      A num = 0, den = eps;
      for (int64_t d = 0; d < D; ++d) {
        const A qd = q.template get<A>(bh, 0, d);
        num += qd * state(bh, d, m);
        den += qd * normaliser(bh, d);
      }
      out[item] = static_cast<T>(normalize ? num / den : num);
      return;
    }
    item -= BH * M;
    if (item < BH * D * M) {
      const int64_t m = item % M, d = (item / M) % D, bh = item / (D * M);
      kv_out[item] = state(bh, d, m);
      return;
    }
    item -= BH * D * M;
    z_out[item] = normaliser(item / D, item % D);
  }
};

}  // namespace flowformer::portable
