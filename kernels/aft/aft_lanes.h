// Lane helpers shared by the windowed AFT items (aft_items.h, aft_conv_items.h): each item holds n <= V
// channels (ChannelBlock) in local arrays; these are its per-lane steps.
#pragma once

#include "common/portable.h"

namespace flowformer::portable {

// x += f a and y += f b over the lanes (a, b: the lanes' entries in one row).
template <int V, typename A, typename N>
FF_HD void add_scaled_pair(A (&x)[V], A (&y)[V], N n, A f, const A* a, const A* b) {
  for (int64_t l = 0; l < n; ++l) {
    x[l] += f * a[l];
    y[l] += f * b[l];
  }
}

// One window position's terms of the forward sums, with f = exp(w') - base and e = exp(w') (scaled):
// num += f K v, d += f K, positive += e K.
template <int V, typename A, typename N>
FF_HD void add_window_term(A (&num)[V], A (&d)[V], A (&positive)[V], N n, A f, A e, const A* K, const A* v) {
  for (int64_t l = 0; l < n; ++l) {
    num[l] += f * K[l] * v[l];
    d[l] += f * K[l];
    positive[l] += e * K[l];
  }
}

// The element's output from the window sums: flagged (den underflowed, or lost more than 4 bits to
// cancellation against the sum of the positive terms) or y = num / den.
template <int V, typename A, typename N>
FF_HD void store_rows(N n, const A (&num)[V], const A (&d)[V], const A (&positive)[V], A tiny, A* y, A* den,
                      bool* flag) {
  for (int64_t l = 0; l < n; ++l) {
    const bool bad = !(d[l] >= tiny) || d[l] < positive[l] * A(0.0625);
    flag[l] = bad;
    den[l] = bad ? A(1) : d[l];
    y[l] = bad ? A(0) : num[l] / d[l];
  }
}

// The key and value gradients from EG and EH: dv = K EG, dk = K (v EG - EH).
template <int V, typename A, typename N>
FF_HD void store_key_grads(N n, const A (&eg)[V], const A (&eh)[V], const A* K, const A* v, A* dk, A* dv) {
  for (int64_t l = 0; l < n; ++l) {
    dv[l] = K[l] * eg[l];
    dk[l] = K[l] * (v[l] * eg[l] - eh[l]);
  }
}

}  // namespace flowformer::portable
