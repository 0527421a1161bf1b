// Portable items of the AFT ops (common/portable.h: one item = one CUDA thread, or one iteration of a
// host loop). Notation, per batch b and channel c: logits z_{t,t'} = k_{t'} + w'_{t,t'} over the
// positions t' in R(t) (all of them, or t' <= t when causal), where w' = w (window = 0) or, for
// AFT-local, w inside the window |t - t'| < window and 0 outside; y_t = softmax_{t'}(z) . v.
// Arrays are contiguous, in the accumulation type: k, v, y (B, S or L, C), w and E (L, S).
#pragma once

#include "common/portable.h"

namespace flowformer::portable {

// Which key positions t' a query position t sums over, and its bias there.
template <typename A>
struct AftRange {
  const A* w;  // (L, S)
  int64_t L, S, window;
  bool causal;

  FF_HD int64_t end(int64_t t) const { return causal ? t + 1 : S; }
  FF_HD bool in_window(int64_t t, int64_t j) const { return window == 0 || (t - j < window && j - t < window); }
  FF_HD A bias(int64_t t, int64_t j) const { return in_window(t, j) ? w[t * S + j] : A(0); }
};

// The exact softmax of the flagged elements (b, t, c) (flag != 0), where the fast factorised sums lost
// precision: an online softmax over t' in R(t) with a running maximum. Writes y and the statistics
// (maximum m, sum s of exp(z - m)) the backward needs. Items: B * L * C.
template <typename A>
struct AftRobustRows {
  AftRange<A> range;
  const A *k, *v;
  const bool* flag;
  int64_t C;
  A *y, *m_out, *s_out;

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
    const bool empty = softmax.s == A(0);  // no key position at all: the output is 0
    y[item] = empty ? A(0) : softmax.a / softmax.s;
    m_out[item] = empty ? A(0) : softmax.m;
    s_out[item] = empty ? A(1) : softmax.s;
  }
};

// AFT-local through exp(w') = exp(0) + (exp(w) - 1) inside the window, with K = exp(k - mk), the
// row-stabilised E = exp(w' - mw_t) and the sums over R(t) of K v and K (Akv, Ak: (B, L, C), prefix sums
// when causal): num = exp(-mw_t) Akv + sum over the window of (E - exp(-mw_t)) K v, den likewise. Flags
// the element when den lost more than 4 bits to cancellation, or underflowed. Items: B * L * C.
template <typename A>
struct AftLocalRows {
  AftRange<A> range;
  const A *E, *mw, *K, *v, *Akv, *Ak;
  int64_t C;
  A tiny;
  A *y, *den;
  bool* flag;

  FF_HD void operator()(int64_t item) const {
    const int64_t c = item % C, t = (item / C) % range.L, b = item / (C * range.L);
    const A base = exp_(-mw[t]);
    A num = base * Akv[item], d = base * Ak[item], positive = d;
    const int64_t lo = t - range.window + 1 > 0 ? t - range.window + 1 : 0;
    const int64_t hi = t + range.window < range.end(t) ? t + range.window : range.end(t);
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t at = (b * range.S + j) * C + c;
      const A e = E[t * range.S + j];
      num += (e - base) * K[at] * v[at];
      d += (e - base) * K[at];
      positive += e * K[at];
    }
    const bool bad = !(d >= tiny) || d < positive * A(0.0625);  // lost more than 4 bits to cancellation
    flag[item] = bad;
    den[item] = bad ? A(1) : d;
    y[item] = bad ? A(0) : num / d;
  }
};

// AFT-local backward through the window, for the elements not flagged: with G = dy / den and
// Hm = G y (zero at flagged elements) and GB, HB their sums over the t with t' in R(t) of
// exp(-mw_t) G (totals, or suffix sums when causal):
//   EG_t' = GB + sum over the t whose window holds t' of (E_{t,t'} - exp(-mw_t)) G_t, EH likewise,
//   dv_t' = K EG, dk_t' = K (v EG - EH). Items: B * S * C.
template <typename A>
struct AftLocalKeyGrads {
  AftRange<A> range;
  const A *E, *mw, *K, *v, *G, *Hm, *GB, *HB;
  int64_t C;
  A *dk, *dv;

  FF_HD void operator()(int64_t item) const {
    const int64_t c = item % C, j = (item / C) % range.S, b = item / (C * range.S);
    A eg = GB[item], eh = HB[item];
    const int64_t lo = range.causal ? j : (j - range.window + 1 > 0 ? j - range.window + 1 : 0);
    const int64_t hi = j + range.window < range.L ? j + range.window : range.L;
    for (int64_t t = lo; t < hi; ++t) {
      if (t - j >= range.window || j - t >= range.window) {
        continue;
      }
      const A factor = E[t * range.S + j] - exp_(-mw[t]);
      const int64_t at = (b * range.L + t) * C + c;
      eg += factor * G[at];
      eh += factor * Hm[at];
    }
    dv[item] = K[item] * eg;
    dk[item] = K[item] * (v[item] * eg - eh);
  }
};

// AFT-local gradient of the bias inside the window (unflagged elements):
//   dw_{t,t'} = E_{t,t'} sum_{b,c} K_{t'} (G_t v_{t'} - Hm_t). Items: L * (2 window - 1), the band.
template <typename A>
struct AftLocalBiasGrads {
  AftRange<A> range;
  const A *E, *K, *v, *G, *Hm;
  int64_t B, C;
  A* dw;  // (L, S), zero outside the band

  FF_HD void operator()(int64_t item) const {
    const int64_t width = 2 * range.window - 1;
    const int64_t t = item / width, j = t - range.window + 1 + item % width;
    if (j < 0 || j >= range.S || j >= range.end(t)) {
      return;
    }
    A sum = 0;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t at_t = (b * range.L + t) * C + c, at_j = (b * range.S + j) * C + c;
        sum += K[at_j] * (G[at_t] * v[at_j] - Hm[at_t]);
      }
    }
    dw[t * range.S + j] = E[t * range.S + j] * sum;
  }
};

// The flagged elements' share of the key and value gradients, gathered per key position t':
//   P = exp(z_{t,t'} - m_t) / s_t,  dv_t' += P dy_t,  dk_t' += P (v_t' - y_t) dy_t. Items: B * S * C.
template <typename A>
struct AftFlaggedKeyGrads {
  AftRange<A> range;
  const A *k, *v, *y, *m, *s, *dy;
  const bool* flag;
  int64_t C;
  A *dk, *dv;

  FF_HD void operator()(int64_t item) const {
    const int64_t c = item % C, j = (item / C) % range.S, b = item / (C * range.S);
    A gv = 0, gk = 0;
    for (int64_t t = range.causal ? j : 0; t < range.L; ++t) {
      const int64_t at = (b * range.L + t) * C + c;
      if (flag[at]) {
        const A p = exp_(k[item] + range.bias(t, j) - m[at]) / s[at];
        gv += p * dy[at];
        gk += p * (v[item] - y[at]) * dy[at];
      }
    }
    dv[item] += gv;
    dk[item] += gk;
  }
};

// The flagged elements' share of the bias gradient: dw_{t,t'} += sum_{b,c} P (v_t' - y_t) dy_t, inside
// the window. Items: L * S.
template <typename A>
struct AftFlaggedBiasGrads {
  AftRange<A> range;
  const A *k, *v, *y, *m, *s, *dy;
  const bool* flag;
  int64_t B, C;
  A* dw;

  FF_HD void operator()(int64_t item) const {
    const int64_t j = item % range.S, t = item / range.S;
    if (j >= range.end(t) || !range.in_window(t, j)) {
      return;
    }
    A sum = 0;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t at = (b * range.L + t) * C + c, at_j = (b * range.S + j) * C + c;
        if (flag[at]) {
          sum += exp_(k[at_j] + range.w[item] - m[at]) / s[at] * (v[at_j] - y[at]) * dy[at];
        }
      }
    }
    dw[item] += sum;
  }
};

// Causal AFT-simple, one (b, c) per item: the running-maximum recurrence
//   m_t = max(m_{t-1}, k_t), s_t = s_{t-1} exp(m_{t-1} - m_t) + exp(k_t - m_t), a_t likewise with v_t,
//   y_t = a_t / s_t; with dy given, also the reverse recurrence of the backward:
//   U_t = dy_t / s_t + exp(m_t - m_{t+1}) U_{t+1}, V_t likewise with dy_t y_t,
//   dv_t = exp(k_t - m_t) U_t, dk_t = exp(k_t - m_t) (v_t U_t - V_t). Items: B * C.
template <typename A>
struct AftSimpleCausalScan {
  const A *k, *v;
  const A* dy;  // nullptr: forward only
  int64_t L, C;
  A *y, *m, *s;  // (B, L, C): m and s are work space for the backward
  A *dk, *dv;

  FF_HD void operator()(int64_t item) const {
    const int64_t c = item % C, b = item / C;
    OnlineSoftmax<A> running;
    for (int64_t t = 0; t < L; ++t) {
      const int64_t at = (b * L + t) * C + c;
      running.add(k[at], v[at]);
      y[at] = running.a / running.s;
      m[at] = running.m;
      s[at] = running.s;
    }
    if (dy == nullptr) {
      return;
    }
    A U = 0, V = 0, next_m = 0;
    for (int64_t t = L - 1; t >= 0; --t) {
      const int64_t at = (b * L + t) * C + c;
      const A carry = t + 1 < L ? exp_(m[at] - next_m) : A(0);
      U = dy[at] / s[at] + carry * U;
      V = dy[at] * y[at] / s[at] + carry * V;
      next_m = m[at];
      const A p = exp_(k[at] - m[at]);
      dv[at] = p * U;
      dk[at] = p * (v[at] * U - V);
    }
  }
};

}  // namespace flowformer::portable
