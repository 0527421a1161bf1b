// The last item of the Flow-Attention backward: the gradient of query (or key) at row r is
//   phi'(x_r) * ( s_r base_r + sum over terms of mult_r (V_r + outer_r) )
// where each term's vector V_r is a running sum over the rows of x's partner (keys for the query
// gradient, queries for the key gradient): V_r = start + sum over rows j <= r (or j >= r, suffix) of
// w_j src_j, with `start` the sum over earlier (later) chunks; without w, V_r = start (a total).
// One item owns one column d of one chunk: it walks the chunk's rows once per term, accumulating in
// the float workspace `base`, then writes the gradient. Padded rows get 0.
#pragma once

#include "common/chunk_items.h"

namespace flowformer::portable {

template <typename A>
struct RunningTerm {
  Shared<A> start;   // (BH, groups, D)
  const A* w;        // (BH, n) row weights, zero at padded rows; nullptr: no running part
  bool suffix;
  const A* mult;     // (BH, n); nullptr: 1
  A outer;           // added to every element of V_r ...
  const A* outer_rows;  // ... and this per-row value (BH, n), or nullptr
};

template <typename T, typename A>
struct AssembleGradient {
  static constexpr int kMaxTerms = 4;
  Rows<T> x;            // the input whose gradient this is (phi' of it is applied)
  Rows<T> src;          // the rows the running sums add up
  A* base;              // (BH, n, D) workspace, overwritten
  const A* base_scale;  // (BH, n)
  RunningTerm<A> terms[kMaxTerms];
  int num_terms;
  int64_t chunk;
  T* out;  // (BH, n, D) contiguous

  FF_HD void operator()(int64_t item) const {
    const int64_t D = x.width, n = x.n;
    const int64_t nc = num_chunks(n, chunk);
    const int64_t d = item % D;
    const int64_t c = (item / D) % nc;
    const int64_t bh = item / (D * nc);
    const int64_t r0 = c * chunk, r1 = min_(n, r0 + chunk);
    A* b = base + bh * n * D + d;
    for (int64_t r = r0; r < r1; ++r) {
      b[r * D] *= base_scale[bh * n + r];
    }
    for (int k = 0; k < num_terms; ++k) {
      const RunningTerm<A>& term = terms[k];
      A running = term.start.at(bh, r0, n)[d];
      for (int64_t s = 0; s < r1 - r0; ++s) {
        const int64_t r = term.suffix ? r1 - 1 - s : r0 + s;
        const int64_t at = bh * n + r;
        if (term.w != nullptr && term.w[at] != A(0)) {
          running += term.w[at] * src.template get<A>(bh, r, d);
        }
        const A outer = term.outer + (term.outer_rows != nullptr ? term.outer_rows[at] : A(0));
        b[r * D] += (term.mult != nullptr ? term.mult[at] : A(1)) * (running + outer);
      }
    }
    for (int64_t r = r0; r < r1; ++r) {
      A grad = 0;
      if (x.valid(bh, r)) {
        const A raw = x.template raw<A>(bh, r, d);
        grad = feature_derivative(x.feature_map, raw, feature(x.feature_map, raw)) * b[r * D];
      }
      out[(bh * n + r) * D + d] = static_cast<T>(grad);
    }
  }
};

}  // namespace flowformer::portable
