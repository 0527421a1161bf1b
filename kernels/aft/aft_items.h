// Portable items of the AFT ops (common/portable.h: one item = one CUDA thread, or one iteration of a
// host loop). Notation, per batch b and channel c: logits z_{t,t'} = k_{t'} + w'_{t,t'} over the
// positions t' in R(t) (all of them, or t' <= t when causal), where w' = w (window = 0) or, for
// AFT-local, w inside the window |t - t'| < window and 0 outside; y_t = softmax_{t'}(z) . v.
// Arrays are contiguous, in the accumulation type: k, v, y (B, S or L, C); w as AftRange stores it.
#pragma once

#include "aft/aft_lanes.h"
#include "common/portable.h"

namespace flowformer::portable {

// Which key positions t' a query position t sums over, and its bias there. The biases are stored dense,
// (L, S), for window = 0; for AFT-local as the band around the diagonal, (L, 2 window - 1), entry (t, o)
// holding w_{t, t - window + 1 + o} (no (L, S) work space).
template <typename A>
struct AftRange {
  const A* w;
  int64_t L, S, window;
  bool causal;

  FF_HD int64_t end(int64_t t) const { return causal ? t + 1 : S; }
  FF_HD bool in_window(int64_t t, int64_t j) const { return window == 0 || (t - j < window && j - t < window); }
  FF_HD int64_t width() const { return window == 0 ? S : 2 * window - 1; }  // stored biases per row
  FF_HD int64_t bias_index(int64_t t, int64_t j) const {
    return window == 0 ? t * S + j : t * width() + j - t + window - 1;
  }
  FF_HD int64_t key_of(int64_t index) const {  // the key position j of a stored bias
    const int64_t t = index / width();
    return window == 0 ? index % S : t - window + 1 + index % width();
  }
  FF_HD A bias(int64_t t, int64_t j) const { return in_window(t, j) ? w[bias_index(t, j)] : A(0); }
};

// AFT-local's biases through the band (AftRange stores w as the band, so no (L, S) work space): per row
// t, mw_t = the maximum of w' over R(t) (w inside the window; 0 if R(t) reaches outside it), base_t =
// exp(-mw_t) if R(t) reaches outside the window, else 0, and F_{t,o} = exp(w_{t,j} - mw_t) - base_t for
// j = t - window + 1 + o in R(t) (else 0): exp(w'_{t,j} - mw_t) = base_t + F_{t,o}. Items: L.
template <typename A>
struct AftBand {
  AftRange<A> range;
  A *mw, *base, *F;  // (L), (L), (L, 2 window - 1)

  FF_HD void operator()(int64_t t) const {
    const int64_t width = 2 * range.window - 1, first = t - range.window + 1;
    const int64_t end = range.end(t);
    const bool outside = end > 0 && (first > 0 || t + range.window < end);
    A m = outside ? A(0) : -INFINITY;
    for (int64_t j = first > 0 ? first : 0; j < end && j < t + range.window; ++j) {
      m = range.w[t * width + j - first] > m ? range.w[t * width + j - first] : m;
    }
    m = m == -INFINITY ? A(0) : m;
    const A b = outside ? exp_(-m) : A(0);
    for (int64_t o = 0; o < width; ++o) {
      const int64_t j = first + o;
      F[t * width + o] = (j >= 0 && j < end) ? exp_(range.w[t * width + o] - m) - b : A(0);
    }
    mw[t] = m;
    base[t] = b;
  }
};

// The exact softmax of the flagged elements (b, t, c) (flag != 0), where the fast factorised sums lost
// precision: an online softmax over t' in R(t) with a running maximum. Writes y and lse = log sum_t'
// exp(z) (the backward's P = exp(z - lse)). Items: B * L * C.
template <typename A>
struct AftRobustRows {
  AftRange<A> range;
  const A *k, *v;
  const bool* flag;
  int64_t C;
  A *y, *lse;

  FF_HD void operator()(int64_t item) const {
    if (!flag[item]) {
      return;
    }
    const int64_t c = item % C, t = (item / C) % range.L, b = item / (C * range.L);
    OnlineSoftmax<A> softmax;
    for (int64_t j = 0; j < range.end(t); ++j) {
      const int64_t at = (b * range.S + j) * C + c;
      softmax.add(k[at] + range.bias(t, j), v[at]);
    }
    y[item] = softmax.average();
    lse[item] = softmax.log_sum();
  }
};

// AFT-local through the band (AftBand), with K = exp(k - mk) and the sums over R(t) of K v and K (Akv,
// Ak: (B, L, C), prefix sums when causal): num = base_t Akv + sum over the window of F K v, den likewise.
// Flags the element when den lost more than 4 bits to cancellation, or underflowed.
// Items: ChannelBlock<V>::items(B * L, C, C).
template <typename A, int V>
struct AftLocalRows {
  AftRange<A> range;
  const A *F, *base, *K, *v, *Akv, *Ak;
  int64_t C;
  A tiny;
  A *y, *den;
  bool* flag;

  FF_HD void operator()(int64_t item) const {
    const ChannelBlock<V> lanes(item, C, C);
    const int64_t t = lanes.row % range.L, b = lanes.row / range.L, out = lanes.row * C + lanes.c0;
    const int64_t width = 2 * range.window - 1, first = t - range.window + 1;
    const int64_t lo = first > 0 ? first : 0;
    const int64_t hi = t + range.window < range.end(t) ? t + range.window : range.end(t);
    const A bt = base[t];
    lanes.run([&](auto n) {
      A num[V], d[V], positive[V];
      for (int64_t l = 0; l < n; ++l) {
        num[l] = bt * Akv[out + l];
        d[l] = bt * Ak[out + l];
        positive[l] = d[l];
      }
      for (int64_t j = lo; j < hi; ++j) {
        const A f = F[t * width + j - first], e = f + bt;
        const A *Kj = K + (b * range.S + j) * C + lanes.c0, *vj = v + (b * range.S + j) * C + lanes.c0;
        add_window_term(num, d, positive, n, f, e, Kj, vj);
      }
      store_rows(n, num, d, positive, tiny, y + out, den + out, flag + out);
    });
  }
};

// AFT-local backward through the window, for the elements not flagged: with G = dy / den and
// Hm = G y (zero at flagged elements) and GB, HB their sums over the t with t' in R(t) of base_t G_t
// (totals, or suffix sums when causal):
//   EG_t' = GB + sum over the t whose window holds t' of F_{t,t'} G_t, EH likewise,
//   dv_t' = K EG, dk_t' = K (v EG - EH). Items: ChannelBlock<V>::items(B * S, C, C).
template <typename A, int V>
struct AftLocalKeyGrads {
  AftRange<A> range;
  const A *F, *K, *v, *G, *Hm, *GB, *HB;
  int64_t C;
  A *dk, *dv;

  FF_HD void operator()(int64_t item) const {
    const ChannelBlock<V> lanes(item, C, C);
    const int64_t j = lanes.row % range.S, b = lanes.row / range.S, out = lanes.row * C + lanes.c0;
    const int64_t width = 2 * range.window - 1;
    const int64_t lo = range.causal ? j : (j - range.window + 1 > 0 ? j - range.window + 1 : 0);
    const int64_t hi = j + range.window < range.L ? j + range.window : range.L;
    lanes.run([&](auto n) {
      A eg[V], eh[V];
      for (int64_t l = 0; l < n; ++l) {
        eg[l] = GB[out + l];
        eh[l] = HB[out + l];
      }
      for (int64_t t = lo; t < hi; ++t) {
        const A f = F[t * width + j - t + range.window - 1];
        const A *Gt = G + (b * range.L + t) * C + lanes.c0, *Ht = Hm + (b * range.L + t) * C + lanes.c0;
        add_scaled_pair(eg, eh, n, f, Gt, Ht);
      }
      store_key_grads(n, eg, eh, K + out, v + out, dk + out, dv + out);
    });
  }
};

// AFT-local gradient of the bias inside the window (unflagged elements):
//   dw_{t,t'} = (base_t + F_{t,t'}) sum_{b,c} K_{t'} (G_t v_{t'} - Hm_t). Items: L * (2 window - 1), the band.
template <typename A, int V>
struct AftLocalBiasGrads {
  AftRange<A> range;
  const A *F, *base, *K, *v, *G, *Hm;
  int64_t B, C;
  A* dw;  // the band (L, 2 window - 1), like the biases

  FF_HD void operator()(int64_t item) const {
    const int64_t t = item / range.width(), j = range.key_of(item);
    if (j < 0 || j >= range.end(t)) {
      dw[item] = 0;
      return;
    }
    A lanes[V] = {};
    for (int64_t b = 0; b < B; ++b) {
      const A *Kj = K + (b * range.S + j) * C, *vj = v + (b * range.S + j) * C;
      const A *Gt = G + (b * range.L + t) * C, *Ht = Hm + (b * range.L + t) * C;
      add_to_lanes(lanes, C, [&](int64_t c) { return Kj[c] * (Gt[c] * vj[c] - Ht[c]); });
    }
    dw[item] = (base[t] + F[item]) * lanes_total(lanes);
  }
};

// The flagged elements' share of the key and value gradients, gathered per key position t':
//   P = exp(z_{t,t'} - lse_t),  dv_t' += P dy_t,  dk_t' += P (v_t' - y_t) dy_t. Items: B * S * C.
template <typename A>
struct AftFlaggedKeyGrads {
  AftRange<A> range;
  const A *k, *v, *y, *lse, *dy;
  const bool* flag;
  int64_t C;
  A *dk, *dv;

  FF_HD void operator()(int64_t item) const {
    const int64_t c = item % C, j = (item / C) % range.S, b = item / (C * range.S);
    A gv = 0, gk = 0;
    for (int64_t t = range.causal ? j : 0; t < range.L; ++t) {
      const int64_t at = (b * range.L + t) * C + c;
      if (flag[at]) {
        const A p = exp_(k[item] + range.bias(t, j) - lse[at]);
        gv += p * dy[at];
        gk += p * (v[item] - y[at]) * dy[at];
      }
    }
    dv[item] += gv;
    dk[item] += gk;
  }
};

// The flagged elements' share of the bias gradient: dw_{t,t'} += sum_{b,c} P (v_t' - y_t) dy_t, inside
// the window; dw is stored like the biases. Items: L * range.width().
template <typename A>
struct AftFlaggedBiasGrads {
  AftRange<A> range;
  const A *k, *v, *y, *lse, *dy;
  const bool* flag;
  int64_t B, C;
  A* dw;

  FF_HD void operator()(int64_t item) const {
    const int64_t t = item / range.width(), j = range.key_of(item);
    if (j < 0 || j >= range.end(t)) {
      return;
    }
    A sum = 0;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t at = (b * range.L + t) * C + c, at_j = (b * range.S + j) * C + c;
        if (flag[at]) {
          sum += exp_(k[at_j] + range.w[item] - lse[at]) * (v[at_j] - y[at]) * dy[at];
        }
      }
    }
    dw[item] += sum;
  }
};

// Causal AFT-simple, per (b, c): the running-maximum recurrence
//   m_t = max(m_{t-1}, k_t), s_t = s_{t-1} exp(m_{t-1} - m_t) + exp(k_t - m_t), a_t likewise with v_t,
//   y_t = a_t / s_t; with dy given, also the reverse recurrence of the backward:
//   U_t = dy_t / s_t + exp(m_t - m_{t+1}) U_{t+1}, W_t likewise with dy_t y_t,
//   dv_t = exp(k_t - m_t) U_t, dk_t = exp(k_t - m_t) (v_t U_t - W_t).
// An item scans the n <= V channels of its ChannelBlock together (contiguous rows on the CPU).
// Items: ChannelBlock<V>::items(B, C, C).
template <typename A, int V>
struct AftSimpleCausalScan {
  const A *k, *v;
  const A* dy;  // nullptr: forward only
  int64_t L, C;
  A *y, *m, *s;  // (B, L, C): m and s are work space for the backward
  A *dk, *dv;

  FF_HD void operator()(int64_t item) const {
    const ChannelBlock<V> lanes(item, C, C);
    const int64_t first = lanes.row * L * C + lanes.c0;  // (b, t = 0, c0)
    lanes.run([&](auto n) {
      OnlineSoftmax<A> running[V];
      for (int64_t t = 0; t < L; ++t) {
        const int64_t at = first + t * C;
        for (int64_t l = 0; l < n; ++l) {
          running[l].add(k[at + l], v[at + l]);
          y[at + l] = running[l].a / running[l].s;
          m[at + l] = running[l].m;
          s[at + l] = running[l].s;
        }
      }
      if (dy == nullptr) {
        return;
      }
      A U[V] = {}, W[V] = {};
      for (int64_t t = L - 1; t >= 0; --t) {
        const int64_t at = first + t * C;
        for (int64_t l = 0; l < n; ++l) {
          const A carry = t + 1 < L ? exp_(m[at + l] - m[at + C + l]) : A(0);
          U[l] = dy[at + l] / s[at + l] + carry * U[l];
          W[l] = dy[at + l] * y[at + l] / s[at + l] + carry * W[l];
          const A p = exp_(k[at + l] - m[at + l]);
          dv[at + l] = p * U[l];
          dk[at + l] = p * (v[at + l] * U[l] - W[l]);
        }
      }
    });
  }
};

}  // namespace flowformer::portable
