// The AFT ops (spec/aft.md) for any executor: dense products and per-channel reductions in ATen, and the
// items of kernels/aft/aft_items.h where the work is banded or must be exact. The CUDA backend runs them
// with CudaExecutor, the CPU backend with HostExecutor (EmulatedExecutor in its test mode): one implementation, tested on the CPU.
//
// aft_full, window = 0: with K = exp(k - max_t' k) and E = exp(w - max_t' w) (row-stabilised, zero above
// the diagonal when causal), num = E (K v) and den = E K: one matrix product of E with [K v, K] laid out
// (S, B, 2C), so that the batch folds into one GEMM. Where den < 2^-60 (2^-600 in float64) the factors
// underflowed: those elements are recomputed exactly by an online softmax (AftRobustRows) and their
// gradients gathered apart. window > 0 (AFT-local): exp(w') = base + F with F a band of width
// 2 window - 1 (AftBand), O(L window C) work and no (L, S) work space (AftLocalRows), the same fallback,
// also taken where the window's correction cancels the rest (more than 4 bits lost).
// Under autograd the forward also returns y (the softmax average before the gate) and lse (the log of
// its denominator), so that the backward needs no second forward: two products for window = 0.
// aft_simple: non-causal a softmax over positions per channel (ATen); causal a running-maximum scan.
// aft_conv: AFT-local on the image grid with a per-head s x s bias (kernels/aft/aft_conv_items.h), the
// same fallback.
#pragma once

#include "aft/aft_conv_items.h"
#include "aft/aft_items.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace flowformer::aft_portable {

using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using FullOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // out, y, lse
using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A is the accumulation type: float, or double for double inputs; V the channel lanes of the items
// that loop over a window (ChannelBlock).
template <typename Exec, typename A, int V>
class Aft {
 public:
  explicit Aft(const Exec& exec) : exec_(exec) {}

  // aft_full; with `stats`, also y and lse (else undefined), what full_backward needs.
  FullOutputs full_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                           bool causal, int64_t window, bool stats) const {
    const Full f = full_inputs(q, k, v, w, causal, window);
    const Biases e = biases(f);
    const Keys keys = exp_keys(f);
    Rows r = rows(f, e, keys);
    if (r.any_flagged && rescalable(f)) {
      r = rescaled_rows(f, e, rescaled_key_maxima(f));
    }
    at::Tensor lse;
    if (stats) {
      lse = at::empty({f.B, f.L, f.C}, f.k.options());
      at::log_out(lse, r.den);
      lse.add_(e.mw.view({1, -1, 1})).add_(r.mk);
    } else if (r.any_flagged) {
      lse = at::empty({f.B, f.L, f.C}, f.k.options());
    }
    if (r.any_flagged) {
      exec_(r.y.numel(), portable::AftRobustRows<A>{f.range, ptr(f.k), ptr(f.v),
                                                    r.flag.template const_data_ptr<bool>(), f.C, mut(r.y),
                                                    mut(lse)});
    }
    const at::Tensor out = (at::sigmoid(f.q) * r.y).to(q.scalar_type());
    return {out, stats ? r.y : at::Tensor(), stats ? lse : at::Tensor()};
  }

  Grads4 full_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& w, const at::Tensor& y_saved, const at::Tensor& lse_saved, bool causal,
                       int64_t window) const {
    const Full f = full_inputs(q, k, v, w, causal, window);
    const Biases e = biases(f);
    const Keys keys = exp_keys(f);
    const at::Tensor y = y_saved.contiguous(), lse = lse_saved.contiguous();
    // The denominator (scaled like the factors) and the flags of the forward: from lse for window = 0,
    // else recomputed through the band (the cancellation test needs the window's terms).
    at::Tensor den, flag, mk_rows;  // mk_rows: defined when the rescaled factorisation is used
    if (window == 0) {
      den = at::exp(lse - e.mw.view({1, -1, 1}) - keys.mk);
      flag = den.lt(tiny());
      if (rescalable(f) && flag.any().template item<bool>()) {
        mk_rows = rescaled_key_maxima(f);
        den = at::exp(lse - e.mw.view({1, -1, 1}) - mk_rows);
        flag = den.lt(tiny());
      }
    } else {
      const Rows r = rows(f, e, keys);
      den = r.den;
      flag = r.flag;
    }
    const bool any_flagged = flag.numel() > 0 && flag.any().template item<bool>();
    const at::Tensor gate = at::sigmoid(f.q);
    const at::Tensor dout = grad_out.to(acc());
    const at::Tensor dq = dout * y * gate * (1 - gate);
    const at::Tensor dy = (dout * gate).contiguous();
    const int64_t C = f.C, BC2 = f.B * 2 * f.C;
    at::Tensor dk = at::empty_like(f.k), dv = at::empty_like(f.v), dw;
    if (window == 0) {
      // Softmax gradients of the unflagged elements through G = dy / den and Hm = G y, laid out
      // (L, B, 2C) as [G, -Hm]: E^T [G, -Hm] in one product, dw = E (G (K v)^T - Hm K^T) summed over the
      // batch in another.
      const at::Tensor GH = at::empty({f.L, f.B, 2 * C}, f.k.options());
      at::Tensor G = GH.narrow(2, 0, C).permute({1, 0, 2}), Hn = GH.narrow(2, C, C).permute({1, 0, 2});
      at::div_out(G, dy, den);
      G.masked_fill_(flag, 0);
      at::mul_out(Hn, G, y);
      Hn.neg_();
      const int64_t gh_rows[] = {f.L, BC2}, x_rows[] = {f.S, BC2}, egh_rows[] = {f.S, f.B, 2 * C};
      if (mk_rows.defined()) {
        dw = rescaled_gradients(f, e, mk_rows, GH, dk, dv);
      } else {
        const at::Tensor EGH = transposed_bias_product(f, e.E, GH.view(gh_rows)).view(egh_rows);
        const at::Tensor EG = EGH.narrow(2, 0, C).permute({1, 0, 2}), EHn = EGH.narrow(2, C, C).permute({1, 0, 2});
        at::mul_out(dv, keys.K, EG);
        at::mul_out(dk, f.v, EG);
        dk.add_(EHn).mul_(keys.K);
        dw = bias_gradient_product(f, GH.view(gh_rows), keys.X.view(x_rows)).mul_(e.E);
      }
    } else {
      const at::Tensor G = at::where(flag, 0, dy / den).contiguous();
      const at::Tensor Hm = (G * y).contiguous();
      // The part outside the window: sums over the t with t' in R(t) of base_t G_t (suffix sums when causal).
      auto over_rows = [&](const at::Tensor& x) {
        const at::Tensor scaled = e.base.view({1, -1, 1}) * x;
        return (causal ? scaled.flip(1).cumsum(1).flip(1) : scaled.sum(1, true).expand_as(f.k)).contiguous();
      };
      const at::Tensor GB = over_rows(G), HB = over_rows(Hm);
      exec_(portable::ChannelBlock<V>::items(f.B * f.S, C, C),
            portable::AftLocalKeyGrads<A, V>{f.range, ptr(e.F), ptr(keys.K), ptr(f.v), ptr(G), ptr(Hm), ptr(GB),
                                             ptr(HB), C, mut(dk), mut(dv)});
      dw = at::empty_like(f.w);  // the band, made dense at the end
      exec_(f.L * (2 * window - 1), portable::AftLocalBiasGrads<A, V>{f.range, ptr(e.F), ptr(e.base), ptr(keys.K),
                                                                   ptr(f.v), ptr(G), ptr(Hm), f.B, C, mut(dw)});
    }
    if (any_flagged) {
      const bool* flags = flag.template const_data_ptr<bool>();  // contiguous (B, L, C) in both cases
      exec_(dk.numel(), portable::AftFlaggedKeyGrads<A>{f.range, ptr(f.k), ptr(f.v), ptr(y), ptr(lse), ptr(dy),
                                                        flags, C, mut(dk), mut(dv)});
      exec_(dw.numel(), portable::AftFlaggedBiasGrads<A>{f.range, ptr(f.k), ptr(f.v), ptr(y), ptr(lse), ptr(dy),
                                                         flags, f.B, C, mut(dw)});
    }
    dw = window == 0 ? dw.to(w.scalar_type()) : dense_bias_grad(f, dw, w);
    return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dw};
  }

  at::Tensor conv_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& weight) const {
    const Conv f = conv(q, k, v, weight);
    return (at::sigmoid(q.to(acc())) * f.y.view(q.sizes())).to(q.scalar_type());
  }

  Grads4 conv_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& weight) const {
    const Conv f = conv(q, k, v, weight);
    const at::Tensor gate = at::sigmoid(q.to(acc())).reshape(f.y.sizes());
    const at::Tensor dout = grad_out.to(acc()).reshape(f.y.sizes());
    const at::Tensor dq = dout * f.y * gate * (1 - gate);
    const at::Tensor dy = (dout * gate).contiguous();
    const at::Tensor G = at::where(f.flag, 0, dy / f.den).contiguous();
    const at::Tensor Hm = (G * f.y).contiguous();
    const at::Tensor GB = G.sum(1).contiguous(), HB = Hm.sum(1).contiguous();
    at::Tensor dk = at::empty_like(f.k), dv = at::empty_like(f.v);
    exec_(portable::ChannelBlock<V>::items(f.B * f.grid.positions(), f.grid.C, f.grid.C / f.grid.heads),
          portable::ConvKeyGrads<A, V>{f.grid, ptr(f.E), ptr(f.mw), ptr(f.K), ptr(f.v), ptr(G), ptr(Hm), ptr(GB),
                                       ptr(HB), mut(dk), mut(dv)});
    // The weight gradients as partial sums over chunks of positions, added in order.
    const int64_t chunks = f.grid.position_chunks();
    const int64_t partial_rows[] = {f.w.size(0), f.w.size(1), f.w.size(2), chunks};
    at::Tensor partial = at::empty(partial_rows, f.k.options());
    exec_(partial.numel(), portable::ConvWeightGrads<A, V>{f.grid, ptr(f.K), ptr(f.v), ptr(G), ptr(Hm), f.B,
                                                           mut(partial)});
    at::Tensor dw = f.E * partial.sum(-1);
    if (f.any_flagged) {
      const bool* flag = f.flag.template const_data_ptr<bool>();
      exec_(dk.numel(), portable::ConvFlaggedKeyGrads<A>{f.grid, ptr(f.k), ptr(f.v), ptr(f.y), ptr(f.lse),
                                                         ptr(dy), flag, mut(dk), mut(dv)});
      exec_(partial.numel(), portable::ConvFlaggedWeightGrads<A>{f.grid, ptr(f.k), ptr(f.v), ptr(f.y),
                                                                 ptr(f.lse), ptr(dy), flag, f.B, mut(partial)});
      dw += partial.sum(-1);
    }
    return {dq.view(q.sizes()).to(q.scalar_type()), dk.view(k.sizes()).to(k.scalar_type()),
            dv.view(v.sizes()).to(v.scalar_type()), dw.to(weight.scalar_type())};
  }

  at::Tensor simple_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) const {
    const at::Tensor y = simple(k, v, causal, {}).y;
    return (at::sigmoid(q.to(acc())) * y).to(q.scalar_type());
  }

  Grads3 simple_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         bool causal) const {
    const at::Tensor gate = at::sigmoid(q.to(acc()));
    const at::Tensor dout = grad_out.to(acc());
    const at::Tensor dy = dout * gate;
    const Simple s = simple(k, v, causal, dy);
    const at::Tensor dq = dout * s.y * gate * (1 - gate);
    return {dq.to(q.scalar_type()), s.dk.to(k.scalar_type()), s.dv.to(v.scalar_type())};
  }

 private:
  static at::ScalarType acc() { return c10::CppTypeToScalarType<A>::value; }
  static const A* ptr(const at::Tensor& t) {
    TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.scalar_type() == acc());
    return t.const_data_ptr<A>();
  }
  static A* mut(at::Tensor& t) {
    TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.scalar_type() == acc());
    return t.mutable_data_ptr<A>();
  }
  static A tiny() { return std::is_same_v<A, double> ? A(2.4e-181) : A(8.7e-19); }  // 2^-600, 2^-60

  struct Full {
    at::Tensor q, k, v, w;  // inputs in the accumulation type, contiguous; w stored as AftRange says
    portable::AftRange<A> range;
    int64_t B, L, S, C;
  };

  // Row maxima mw of w' over R(t); window = 0: E = exp(w - mw) (L, S), zero outside R(t); window > 0:
  // base and the band F of AftBand.
  struct Biases {
    at::Tensor mw, E, base, F;
  };

  // mk = max over positions of k (B, 1, C), K = exp(k - mk) and K v (B, S, C); window = 0: views of
  // X = [K v, K] laid out (S, B, 2C), the right-hand side of the products; else contiguous.
  struct Keys {
    at::Tensor mk, K, Kv, X;
  };

  // y (B, L, C) contiguous (flagged elements: left to AftRobustRows), den (scaled by exp(-mw_t - mk)),
  // flag (contiguous).
  struct Rows {
    at::Tensor y, den, flag;
    at::Tensor mk;  // the key maxima den is scaled by: (B, 1, C), or (B, L, C) when rescaled
    bool any_flagged;
  };

  Full full_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, bool causal,
                   int64_t window) const {
    Full f;
    f.q = q.to(acc());
    f.k = k.to(acc()).contiguous();
    f.v = v.to(acc()).contiguous();
    f.B = k.size(0);
    f.L = q.size(1);
    f.S = k.size(1);
    f.C = k.size(2);
    if (window == 0) {
      f.w = w.to(acc()).contiguous();
    } else {  // the band of AftRange, gathered before the conversion: no (L, S) copy
      const int64_t band[] = {f.L, 2 * window - 1};
      f.w = f.S == 0 ? at::zeros(band, f.k.options())
                     : at::gather(w, 1, band_keys(f.L, window, w.device()).clamp(0, f.S - 1)).to(acc());
    }
    f.range = {ptr(f.w), f.L, f.S, window, causal};
    return f;
  }

  // The key position j = t - window + 1 + o of each band entry (t, o), as an (L, 2 window - 1) index.
  static at::Tensor band_keys(int64_t L, int64_t window, const c10::Device& device) {
    const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
    return at::arange(L, opts).view({-1, 1}) + at::arange(2 * window - 1, opts).view({1, -1}) - (window - 1);
  }

  // The dense (L, S) gradient, in the biases' dtype, of a band gradient (zero outside R(t)).
  static at::Tensor dense_bias_grad(const Full& f, const at::Tensor& band, const at::Tensor& w) {
    const at::Tensor j = band_keys(f.L, f.range.window, w.device());
    const at::Tensor t = at::arange(f.L, j.options()).view({-1, 1}).expand_as(j);
    const at::Tensor inside = (j >= 0).logical_and_(f.range.causal ? j <= t : j < f.S);
    at::Tensor dense = at::zeros({f.L * f.S}, w.options());
    dense.index_put_({(t * f.S + j).masked_select(inside)}, band.masked_select(inside).to(w.scalar_type()));
    return dense.view({f.L, f.S});
  }

  Biases biases(const Full& f) const {
    Biases e;
    const auto opts = f.w.options();
    if (f.range.window > 0) {
      e.mw = at::empty({f.L}, opts);
      e.base = at::empty({f.L}, opts);
      e.F = at::empty({f.L, 2 * f.range.window - 1}, opts);
      exec_(f.L, portable::AftBand<A>{f.range, mut(e.mw), mut(e.base), mut(e.F)});
      return e;
    }
    at::Tensor biases = f.w;
    if (f.range.causal) {
      biases = biases.masked_fill(at::ones({f.L, f.S}, opts.dtype(at::kBool)).triu(1), -INFINITY);
    }
    e.mw = f.L > 0 && f.S > 0 ? biases.amax(1) : at::zeros({f.L}, opts);
    e.E = at::exp(biases - e.mw.view({-1, 1}));
    return e;
  }

  Keys exp_keys(const Full& f) const {
    Keys keys;
    const auto opts = f.k.options();
    keys.mk = f.S > 0 ? f.k.amax(1, true) : at::zeros({f.B, 1, f.C}, opts);
    if (f.range.window > 0) {
      keys.K = at::exp(f.k - keys.mk);
      keys.Kv = keys.K * f.v;
      return keys;
    }
    keys.X = key_factors(f, keys.mk, f.S);
    keys.Kv = keys.X.narrow(2, 0, f.C).permute({1, 0, 2});
    keys.K = keys.X.narrow(2, f.C, f.C).permute({1, 0, 2});
    return keys;
  }

  // [K v, K] for the first n key positions with K = exp(k - mk) (mk broadcast over them), laid out
  // (n, B, 2C): the right-hand side of the window = 0 products.
  static at::Tensor key_factors(const Full& f, const at::Tensor& mk, int64_t n) {
    at::Tensor X = at::empty({n, f.B, 2 * f.C}, f.k.options());
    at::Tensor K = X.narrow(2, f.C, f.C).permute({1, 0, 2}), Kv = X.narrow(2, 0, f.C).permute({1, 0, 2});
    at::exp_out(K, f.k.narrow(1, 0, n) - mk);
    at::mul_out(Kv, K, f.v.narrow(1, 0, n));
    return X;
  }

  // The three products of window = 0 with E (L, S). Causal E is zero above the diagonal (L == S): the
  // rows are split into blocks [r0, r1) that only need the key positions below r1, about half the work.
  std::vector<std::pair<int64_t, int64_t>> row_blocks(const Full& f) const {
    std::vector<std::pair<int64_t, int64_t>> blocks;
    const int64_t rows = f.range.causal ? std::max<int64_t>(128, (f.L + 7) / 8) : std::max<int64_t>(f.L, 1);
    for (int64_t r0 = 0; r0 < f.L; r0 += rows) {
      blocks.emplace_back(r0, std::min(f.L, r0 + rows));
    }
    return blocks;
  }

  // E X: (L, S) (S, N) -> (L, N).
  at::Tensor bias_product(const Full& f, const at::Tensor& E, const at::Tensor& X) const {
    if (!f.range.causal) {
      return at::mm(E, X);
    }
    at::Tensor out = at::empty({f.L, X.size(1)}, X.options());
    for (const auto& [r0, r1] : row_blocks(f)) {
      at::Tensor rows = out.narrow(0, r0, r1 - r0);
      at::mm_out(rows, E.narrow(0, r0, r1 - r0).narrow(1, 0, r1), X.narrow(0, 0, r1));
    }
    return out;
  }

  // E^T Y: (L, S)^T (L, N) -> (S, N); causal: output rows [c0, c1) need the rows t >= c0 of Y.
  at::Tensor transposed_bias_product(const Full& f, const at::Tensor& E, const at::Tensor& Y) const {
    if (!f.range.causal) {
      return at::mm(E.t(), Y);
    }
    at::Tensor out = at::empty({f.S, Y.size(1)}, Y.options());
    for (const auto& [c0, c1] : row_blocks(f)) {
      at::Tensor rows = out.narrow(0, c0, c1 - c0);
      at::mm_out(rows, E.narrow(0, c0, f.L - c0).narrow(1, c0, c1 - c0).t(), Y.narrow(0, c0, f.L - c0));
    }
    return out;
  }

  // Y X^T: (L, N) (S, N)^T -> (L, S); causal: zero above the diagonal's blocks (E is zero there).
  at::Tensor bias_gradient_product(const Full& f, const at::Tensor& Y, const at::Tensor& X) const {
    if (!f.range.causal) {
      return at::mm(Y, X.t());
    }
    at::Tensor out = at::zeros({f.L, f.S}, Y.options());
    for (const auto& [r0, r1] : row_blocks(f)) {
      out.narrow(0, r0, r1 - r0).narrow(1, 0, r1).copy_(at::mm(Y.narrow(0, r0, r1 - r0), X.narrow(0, 0, r1).t()));
    }
    return out;
  }

  Rows rows(const Full& f, const Biases& e, const Keys& keys) const {
    if (f.range.window == 0) {
      const int64_t x_rows[] = {f.S, f.B * 2 * f.C};
      return product_rows(f, bias_product(f, e.E, keys.X.view(x_rows)), keys.mk);
    }
    Rows r;
    const auto opts = f.k.options();
    const int64_t rows[] = {f.B, f.L, f.C};
    r.y = at::empty(rows, opts);
    r.flag = at::empty(rows, opts.dtype(at::kBool));
    // The sums over R(t) of K v and K: prefix sums when causal, else totals.
    auto over_range = [&](const at::Tensor& x) {
      return (f.range.causal ? x.cumsum(1) : x.sum(1, true).expand(rows)).contiguous();
    };
    const at::Tensor Akv = over_range(keys.Kv), Ak = over_range(keys.K);
    r.den = at::empty(rows, opts);
    exec_(portable::ChannelBlock<V>::items(f.B * f.L, f.C, f.C),
          portable::AftLocalRows<A, V>{f.range, ptr(e.F), ptr(e.base), ptr(keys.K), ptr(f.v), ptr(Akv), ptr(Ak), f.C,
                                       tiny(), mut(r.y), mut(r.den), r.flag.template mutable_data_ptr<bool>()});
    r.mk = keys.mk;
    r.any_flagged = r.flag.numel() > 0 && r.flag.any().template item<bool>();
    return r;
  }

  // Rows from the window = 0 product [num, den] (L, B * 2C), scaled by the key maxima mk.
  Rows product_rows(const Full& f, const at::Tensor& num_den, const at::Tensor& mk) const {
    Rows r;
    const int64_t rows[] = {f.B, f.L, f.C}, nd_rows[] = {f.L, f.B, 2 * f.C};
    r.y = at::empty(rows, f.k.options());
    r.flag = at::empty(rows, f.k.options().dtype(at::kBool));
    r.den = num_den.view(nd_rows).narrow(2, f.C, f.C).permute({1, 0, 2});
    at::lt_out(r.flag, r.den, tiny());  // NaN only from non-finite inputs: it propagates
    at::div_out(r.y, num_den.view(nd_rows).narrow(2, 0, f.C).permute({1, 0, 2}), r.den);
    r.mk = mk;
    r.any_flagged = r.flag.numel() > 0 && r.flag.any().template item<bool>();
    return r;
  }

  // Causal window = 0: keys that rise along the sequence make K = exp(k - max_t' k) underflow in the early
  // rows, where max_t' k lies in the future. Before the exact per-element path, such inputs get a
  // rescaled factorisation: blocks of 32 rows, each with its own key maxima over the keys it sums over
  // (t' < r1), so that only elements that underflow within their block are left for AftRobustRows.
  static constexpr int64_t kRescaledRows = 32;

  static bool rescalable(const Full& f) { return f.range.causal && f.range.window == 0 && f.L > kRescaledRows; }

  // max_{t' < r1(t)} k for the row t in block [r0, r1), (B, L, C).
  static at::Tensor rescaled_key_maxima(const Full& f) {
    const at::Tensor prefix = std::get<0>(f.k.cummax(1));
    const auto index = at::TensorOptions().dtype(at::kLong).device(f.k.device());
    const at::Tensor ends = (at::arange(f.L, index).div(kRescaledRows, "floor") + 1).mul_(kRescaledRows).sub_(1)
                                .clamp_max_(f.L - 1);
    return prefix.index_select(1, ends);
  }

  // key_factors of the keys t' < r1 with the maxima of block [r0, r1).
  static at::Tensor block_factors(const Full& f, const at::Tensor& mk_rows, int64_t r1) {
    return key_factors(f, mk_rows.narrow(1, r1 - 1, 1), r1);
  }

  template <typename Fn>
  static void for_rescaled_blocks(const Full& f, const Fn& fn) {
    for (int64_t r0 = 0; r0 < f.L; r0 += kRescaledRows) {
      fn(r0, std::min(f.L, r0 + kRescaledRows));
    }
  }

  Rows rescaled_rows(const Full& f, const Biases& e, const at::Tensor& mk_rows) const {
    const int64_t BC2 = f.B * 2 * f.C;
    at::Tensor num_den = at::empty({f.L, BC2}, f.k.options());
    for_rescaled_blocks(f, [&](int64_t r0, int64_t r1) {
      at::Tensor rows = num_den.narrow(0, r0, r1 - r0);
      at::mm_out(rows, e.E.narrow(0, r0, r1 - r0).narrow(1, 0, r1), block_factors(f, mk_rows, r1).view({r1, BC2}));
    });
    return product_rows(f, num_den, mk_rows);
  }

  // The backward's three products in the rescaled factorisation, block by block: dv, dk (accumulated over
  // the blocks in order) and the returned dw, from GH = [G, -Hm] laid out (L, B, 2C).
  at::Tensor rescaled_gradients(const Full& f, const Biases& e, const at::Tensor& mk_rows, const at::Tensor& GH,
                                at::Tensor& dk, at::Tensor& dv) const {
    const int64_t C = f.C, BC2 = f.B * 2 * C;
    dk.zero_();
    dv.zero_();
    at::Tensor dw = at::zeros({f.L, f.S}, f.k.options());
    for_rescaled_blocks(f, [&](int64_t r0, int64_t r1) {
      const at::Tensor X = block_factors(f, mk_rows, r1), GHr = GH.narrow(0, r0, r1 - r0).reshape({r1 - r0, BC2});
      const at::Tensor Er = e.E.narrow(0, r0, r1 - r0).narrow(1, 0, r1);
      const at::Tensor P = at::mm(Er.t(), GHr).view({r1, f.B, 2 * C});
      const at::Tensor PG = P.narrow(2, 0, C).permute({1, 0, 2}), PHn = P.narrow(2, C, C).permute({1, 0, 2});
      const at::Tensor K = X.narrow(2, C, C).permute({1, 0, 2});
      dv.narrow(1, 0, r1).addcmul_(K, PG);
      dk.narrow(1, 0, r1).add_(K * (f.v.narrow(1, 0, r1) * PG + PHn));
      dw.narrow(0, r0, r1 - r0).narrow(1, 0, r1).copy_(at::mm(GHr, X.view({r1, BC2}).t()).mul_(Er));
    });
    return dw;
  }

  struct Conv {
    at::Tensor k, v, w;        // (B, P, C) with P = Hi Wi positions, and the (heads, s, s) weight
    at::Tensor E, mw, K;       // exp(w - mw_h), the per-head maxima of (0, w^h), exp(k - max_p k)
    at::Tensor y, den, flag;   // (B, P, C)
    at::Tensor lse;            // log of the softmax denominator of the flagged elements
    portable::ConvGrid<A> grid;
    int64_t B;
    bool any_flagged;
  };

  Conv conv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& weight) const {
    Conv f;
    f.B = k.size(0);
    const int64_t Hi = k.size(1), Wi = k.size(2), C = k.size(3), heads = weight.size(0), s = weight.size(1);
    const int64_t flat[] = {f.B, Hi * Wi, C};
    f.k = k.to(acc()).reshape(flat).contiguous();
    f.v = v.to(acc()).reshape(flat).contiguous();
    f.w = weight.to(acc()).contiguous();
    f.grid = {ptr(f.w), Hi, Wi, s, heads, C};
    f.mw = f.w.view({heads, -1}).amax(1).clamp_min(0).contiguous();  // positions outside N(p) have bias 0
    f.E = at::exp(f.w - f.mw.view({-1, 1, 1})).contiguous();
    const at::Tensor mk = Hi * Wi > 0 ? f.k.amax(1, true) : at::zeros({f.B, 1, C}, f.k.options());
    f.K = at::exp(f.k - mk).contiguous();
    const at::Tensor Akv = (f.K * f.v).sum(1).contiguous(), Ak = f.K.sum(1).contiguous();
    f.y = at::empty_like(f.k);
    f.den = at::empty_like(f.k);
    f.flag = at::empty(flat, f.k.options().dtype(at::kBool));
    exec_(portable::ChannelBlock<V>::items(f.B * Hi * Wi, C, C / heads),
          portable::ConvLocalRows<A, V>{f.grid, ptr(f.E), ptr(f.mw), ptr(f.K), ptr(f.v), ptr(Akv), ptr(Ak), tiny(),
                                        mut(f.y), mut(f.den), f.flag.template mutable_data_ptr<bool>()});
    f.any_flagged = f.flag.numel() > 0 && f.flag.any().template item<bool>();
    if (f.any_flagged) {
      f.lse = at::zeros_like(f.y);
      exec_(f.y.numel(), portable::ConvRobustRows<A>{f.grid, ptr(f.k), ptr(f.v),
                                                     f.flag.template const_data_ptr<bool>(), mut(f.y),
                                                     mut(f.lse)});
    }
    return f;
  }

  struct Simple {
    at::Tensor y, dk, dv;  // (B, L, C); dk and dv when a gradient dy was given
  };

  Simple simple(const at::Tensor& k, const at::Tensor& v, bool causal, const at::Tensor& dy) const {
    Simple r;
    const at::Tensor ka = k.to(acc()).contiguous(), va = v.to(acc()).contiguous();
    if (!causal) {  // P = softmax over positions: y = sum P v; dv = P sum_t dy_t; dk = P (v - y) sum_t dy_t
      const at::Tensor P = ka.numel() > 0 ? at::softmax(ka, 1) : ka;
      r.y = (P * va).sum(1, true);
      if (dy.defined()) {
        const at::Tensor dy_sum = dy.sum(1, true);
        r.dv = P * dy_sum;
        r.dk = P * (va - r.y) * dy_sum;
      }
      return r;
    }
    const int64_t B = ka.size(0), L = ka.size(1), C = ka.size(2);
    r.y = at::empty_like(ka);
    at::Tensor m = at::empty_like(ka), s = at::empty_like(ka);
    const at::Tensor dyc = dy.defined() ? dy.contiguous() : at::Tensor();
    if (dy.defined()) {
      r.dk = at::empty_like(ka);
      r.dv = at::empty_like(ka);
    }
    exec_(portable::ChannelBlock<V>::items(B, C, C),
          portable::AftSimpleCausalScan<A, V>{ptr(ka), ptr(va), dy.defined() ? ptr(dyc) : nullptr, L, C, mut(r.y),
                                              mut(m), mut(s), dy.defined() ? mut(r.dk) : nullptr,
                                              dy.defined() ? mut(r.dv) : nullptr});
    return r;
  }

  const Exec& exec_;
};

// Runs fn(Aft<Exec, A, V>) for the accumulation type of `input`, with the executor's channel lanes V; or,
// when `emulate` and an Emulation executor is given (the CPU backend's test mode), fn(Aft<Emulation, A, 1>):
// the GPU's item kernel and layout in the SIMT emulator.
template <typename Emulation, typename Exec, typename Fn>
auto with_aft(const Exec& exec, const at::Tensor& input, bool emulate, const Fn& fn) {
  const bool wide = input.scalar_type() == at::kDouble;
  if constexpr (!std::is_void_v<Emulation>) {
    if (emulate) {
      const Emulation emulation{};
      return wide ? fn(Aft<Emulation, double, Emulation::kLanes>(emulation))
                  : fn(Aft<Emulation, float, Emulation::kLanes>(emulation));
    }
  }
  constexpr int V = Exec::kLanes;
  return wide ? fn(Aft<Exec, double, V>(exec)) : fn(Aft<Exec, float, V>(exec));
}

}  // namespace flowformer::aft_portable
