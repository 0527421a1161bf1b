// Portable items of aft_conv (spec/aft.md, AFT-conv): AFT-local on a Hi x Wi grid of positions (flattened
// p = y Wi + x) with a per-head s x s relative bias w^h, zero-padded at the borders. Per batch b and
// channel c (of head h), with K = exp(k - max_p k) and E^h = exp(w^h - mw_h), base_h = exp(-mw_h):
//   num_p = base_h sum_{all p'} K v + sum_{p' in N(p)} (E^h_{p'-p} - base_h) K_{p'} v_{p'}, den likewise.
// Kernel offset convention: p' = p + (dy, dx) uses w^h[dy + s/2, dx + s/2]. Arrays are contiguous, in
// the accumulation type: k, v, y, ... (B, Hi * Wi, C), w and E (heads, s, s).
#pragma once

#include "aft/aft_lanes.h"
#include "common/portable.h"

namespace flowformer::portable {

template <typename A>
struct ConvGrid {
  const A* w;  // (heads, s, s)
  int64_t Hi, Wi, s, heads, C;

  FF_HD int64_t positions() const { return Hi * Wi; }
  FF_HD int64_t head(int64_t c) const { return c / (C / heads); }
  // The kernel index of the offset from p to p2, or -1 outside the s x s neighbourhood.
  FF_HD int64_t offset(int64_t p, int64_t p2) const {
    const int64_t r = s / 2, dy = p2 / Wi - p / Wi, dx = p2 % Wi - p % Wi;
    return (dy < -r || dy > r || dx < -r || dx > r) ? -1 : (dy + r) * s + dx + r;
  }
  // The position p + (oy - s/2, ox - s/2) for the kernel index o = oy s + ox, or -1 outside the grid.
  FF_HD int64_t shifted(int64_t p, int64_t o) const {
    const int64_t y = p / Wi + o / s - s / 2, x = p % Wi + o % s - s / 2;
    return (y < 0 || y >= Hi || x < 0 || x >= Wi) ? -1 : y * Wi + x;
  }
  FF_HD A bias(int64_t p, int64_t p2, int64_t c) const {
    const int64_t o = offset(p, p2);
    return o < 0 ? A(0) : w[head(c) * s * s + o];
  }

  // The weight-gradient items: one per (head h, kernel index o, chunk of 64 positions p), their partial
  // sums added in a fixed order afterwards (enough items to fill a GPU; deterministic).
  FF_HD int64_t position_chunks() const { return (positions() + 63) / 64; }
  FF_HD int64_t weight_of(int64_t item) const { return item / position_chunks(); }  // h * s * s + o
  // Calls row(at, at2) for every (b, p) of the item's chunk whose p2 = p + offset o lies on the grid, with
  // at and at2 the offsets of head h's first channel at p and p2.
  template <typename Row>
  FF_HD void for_each_offset_pair(int64_t item, int64_t B, const Row& row) const {
    const int64_t P = positions(), ss = s * s, o = weight_of(item) % ss, h = weight_of(item) / ss;
    const int64_t begin = item % position_chunks() * 64, end = begin + 64 < P ? begin + 64 : P;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t p2 = shifted(p, o);
        if (p2 >= 0) {
          row((b * P + p) * C + h * (C / heads), (b * P + p2) * C + h * (C / heads));
        }
      }
    }
  }
};

// The exact softmax of the flagged elements: an online softmax over all positions; writes y and
// lse = log sum exp(z) (the backward's P = exp(z - lse)). Items: B * P * C.
template <typename A>
struct ConvRobustRows {
  ConvGrid<A> grid;
  const A *k, *v;
  const bool* flag;
  A *y, *lse;

  FF_HD void operator()(int64_t item) const {
    if (!flag[item]) {
      return;
    }
    const int64_t C = grid.C, P = grid.positions();
    const int64_t c = item % C, p = (item / C) % P, b = item / (C * P);
    OnlineSoftmax<A> softmax;
    for (int64_t p2 = 0; p2 < P; ++p2) {
      const int64_t at = (b * P + p2) * C + c;
      softmax.add(k[at] + grid.bias(p, p2, c), v[at]);
    }
    y[item] = softmax.average();
    lse[item] = softmax.log_sum();
  }
};

// The fast path: num and den through the neighbourhood; flags elements whose den underflowed or lost
// more than 4 bits to cancellation. Akv, Ak: (B, C) sums over all positions.
// Items: ChannelBlock<V>::items(B * P, C, C / heads).
template <typename A, int V>
struct ConvLocalRows {
  ConvGrid<A> grid;
  const A *E, *mw, *K, *v, *Akv, *Ak;
  A tiny;
  A *y, *den;
  bool* flag;

  FF_HD void operator()(int64_t item) const {
    const int64_t C = grid.C, P = grid.positions(), ss = grid.s * grid.s;
    const ChannelBlock<V> lanes(item, C, C / grid.heads);
    const int64_t p = lanes.row % P, b = lanes.row / P, h = grid.head(lanes.c0), out = lanes.row * C + lanes.c0;
    const A base = exp_(-mw[h]);
    lanes.run([&](auto n) {
      A num[V], d[V], positive[V];
      for (int64_t l = 0; l < n; ++l) {
        num[l] = base * Akv[b * C + lanes.c0 + l];
        d[l] = base * Ak[b * C + lanes.c0 + l];
        positive[l] = d[l];
      }
      for (int64_t o = 0; o < ss; ++o) {
        const int64_t p2 = grid.shifted(p, o);
        if (p2 < 0) {
          continue;
        }
        const A e = E[h * ss + o], f = e - base;
        const A *K2 = K + (b * P + p2) * C + lanes.c0, *v2 = v + (b * P + p2) * C + lanes.c0;
        add_window_term(num, d, positive, n, f, e, K2, v2);
      }
      store_rows(n, num, d, positive, tiny, y + out, den + out, flag + out);
    });
  }
};

// Key and value gradients of the unflagged elements, G = dy / den, Hm = G y, GB and HB their sums over
// all positions (B, C): EG_p' = base_h GB + sum_{p: p' in N(p)} (E_{p'-p} - base_h) G_p, EH likewise;
// dv = K EG, dk = K (v EG - EH). Items: ChannelBlock<V>::items(B * P, C, C / heads).
template <typename A, int V>
struct ConvKeyGrads {
  ConvGrid<A> grid;
  const A *E, *mw, *K, *v, *G, *Hm, *GB, *HB;
  A *dk, *dv;

  FF_HD void operator()(int64_t item) const {
    const int64_t C = grid.C, P = grid.positions(), ss = grid.s * grid.s;
    const ChannelBlock<V> lanes(item, C, C / grid.heads);
    const int64_t p2 = lanes.row % P, b = lanes.row / P, h = grid.head(lanes.c0), out = lanes.row * C + lanes.c0;
    const A base = exp_(-mw[h]);
    lanes.run([&](auto n) {
      A eg[V], eh[V];
      for (int64_t l = 0; l < n; ++l) {
        eg[l] = base * GB[b * C + lanes.c0 + l];
        eh[l] = base * HB[b * C + lanes.c0 + l];
      }
      for (int64_t o = 0; o < ss; ++o) {  // p = p2 - offset o: the mirrored kernel index
        const int64_t p = grid.shifted(p2, ss - 1 - o);
        if (p < 0) {
          continue;
        }
        const A f = E[h * ss + o] - base;
        const A *Gp = G + (b * P + p) * C + lanes.c0, *Hp = Hm + (b * P + p) * C + lanes.c0;
        add_scaled_pair(eg, eh, n, f, Gp, Hp);
      }
      store_key_grads(n, eg, eh, K + out, v + out, dk + out, dv + out);
    });
  }
};

// The weight gradient of the unflagged elements, dw^h_o = E^h_o sum_{b, c in h, p} K_{p+o} (G_p v_{p+o} - Hm_p),
// without the factor E^h_o: one partial sum per item. Items: heads * s * s * grid.position_chunks().
template <typename A, int V>
struct ConvWeightGrads {
  ConvGrid<A> grid;
  const A *K, *v, *G, *Hm;
  int64_t B;
  A* partial;

  FF_HD void operator()(int64_t item) const {
    const int64_t per_head = grid.C / grid.heads;
    A lanes[V] = {};
    grid.for_each_offset_pair(item, B, [&](int64_t at, int64_t at2) {
      const A *Gp = G + at, *Hp = Hm + at, *K2 = K + at2, *v2 = v + at2;
      add_to_lanes(lanes, per_head, [&](int64_t c) { return K2[c] * (Gp[c] * v2[c] - Hp[c]); });
    });
    partial[item] = lanes_total(lanes);
  }
};

// The flagged elements' share of the key and value gradients, gathered per key position p':
// P = exp(k_p' + w'_{p,p'} - lse_p), dv_p' += P dy_p, dk_p' += P (v_p' - y_p) dy_p. Items: B * P * C.
template <typename A>
struct ConvFlaggedKeyGrads {
  ConvGrid<A> grid;
  const A *k, *v, *y, *lse, *dy;
  const bool* flag;
  A *dk, *dv;

  FF_HD void operator()(int64_t item) const {
    const int64_t C = grid.C, P = grid.positions();
    const int64_t c = item % C, p2 = (item / C) % P, b = item / (C * P);
    A gv = 0, gk = 0;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t at = (b * P + p) * C + c;
      if (flag[at]) {
        const A prob = exp_(k[item] + grid.bias(p, p2, c) - lse[at]);
        gv += prob * dy[at];
        gk += prob * (v[item] - y[at]) * dy[at];
      }
    }
    dv[item] += gv;
    dk[item] += gk;
  }
};

// The flagged elements' share of the weight gradient, dw^h_o += sum P (v_{p+o} - y_p) dy_p: one partial
// sum per item. Items: heads * s * s * grid.position_chunks().
template <typename A>
struct ConvFlaggedWeightGrads {
  ConvGrid<A> grid;
  const A *k, *v, *y, *lse, *dy;
  const bool* flag;
  int64_t B;
  A* partial;

  FF_HD void operator()(int64_t item) const {
    const int64_t per_head = grid.C / grid.heads;
    const A w = grid.w[grid.weight_of(item)];
    A sum = 0;
    grid.for_each_offset_pair(item, B, [&](int64_t at, int64_t at2) {
      for (int64_t c = 0; c < per_head; ++c) {
        if (flag[at + c]) {
          sum += exp_(k[at2 + c] + w - lse[at + c]) * (v[at2 + c] - y[at + c]) * dy[at + c];
        }
      }
    });
    partial[item] = sum;
  }
};

}  // namespace flowformer::portable
