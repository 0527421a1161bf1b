// The AFT ops (spec/aft.md) for any executor: dense products and per-channel reductions in ATen, and the
// items of aft_items.h where the work is banded or must be exact. The CUDA backend runs them with
// CudaExecutor, the CPU backend with HostExecutor: one implementation, tested on the CPU.
//
// aft_full, window = 0: with K = exp(k - max_t' k) and E = exp(w - max_t' w) (row-stabilised, zero above
// the diagonal when causal), num = E (K v) and den = E K: two matrix products sharing E. Where
// den < 2^-60 (2^-600 in float64) the factors underflowed: those elements are recomputed exactly by an
// online softmax (AftRobustRows) and their gradients gathered apart. window > 0 (AFT-local):
// exp(w') = 1 + (exp(w) - 1) inside the window, O(L window C) work (AftLocalRows), the same fallback,
// also taken where the window's correction cancels the rest (more than 4 bits lost).
// aft_simple: non-causal a softmax over positions per channel (ATen); causal a running-maximum scan.
// aft_conv: AFT-local on the image grid with a per-head s x s bias (aft_conv_items.h), the same fallback.
#pragma once

#include "aft/aft_conv_items.h"
#include "aft/aft_items.h"

#include <ATen/ATen.h>

#include <tuple>

namespace flowformer::aft_portable {

using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A is the accumulation type: float, or double for double inputs.
template <typename Exec, typename A>
class Aft {
 public:
  explicit Aft(const Exec& exec) : exec_(exec) {}

  at::Tensor full_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                          bool causal, int64_t window) const {
    const Full f = full(q, k, v, w, causal, window);
    return (at::sigmoid(f.q) * f.y).to(q.scalar_type());
  }

  Grads4 full_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& w, bool causal, int64_t window) const {
    const Full f = full(q, k, v, w, causal, window);
    const at::Tensor gate = at::sigmoid(f.q);
    const at::Tensor dout = grad_out.to(acc());
    const at::Tensor dq = dout * f.y * gate * (1 - gate);
    const at::Tensor dy = (dout * gate).contiguous();
    // Softmax gradients of the unflagged elements through G = dy / den and Hm = G y.
    const at::Tensor G = at::where(f.flag, 0, dy / f.den).contiguous();
    const at::Tensor Hm = (G * f.y).contiguous();
    at::Tensor dk, dv, dw;
    if (window == 0) {
      // One product for E^T G and E^T Hm, one for dw = E (G (K v)^T - Hm K^T) summed over the batch.
      const int64_t C = f.C;
      const at::Tensor GH = at::cat({G, Hm}, 2);  // (B, L, 2C)
      const at::Tensor EGH = at::matmul(f.E.t(), GH);
      const at::Tensor EG = EGH.narrow(2, 0, C), EH = EGH.narrow(2, C, C);
      dv = (f.K * EG).contiguous();
      dk = (f.K * (f.v * EG - EH)).contiguous();
      const at::Tensor right = at::cat({f.K * f.v, -f.K}, 2);  // (B, S, 2C)
      const int64_t rows[] = {f.L, f.B * 2 * C}, cols[] = {f.S, f.B * 2 * C};
      dw = (f.E * at::matmul(GH.permute({1, 0, 2}).reshape(rows), right.permute({1, 0, 2}).reshape(cols).t()))
               .contiguous();
    } else {
      // The part outside the window: sums over the t with t' in R(t) of exp(-mw_t) G_t (suffix sums when causal).
      const at::Tensor base = at::exp(-f.mw).view({1, -1, 1});
      auto over_rows = [&](const at::Tensor& x) {
        const at::Tensor scaled = base * x;
        return (causal ? scaled.flip(1).cumsum(1).flip(1) : scaled.sum(1, true).expand_as(f.k)).contiguous();
      };
      const at::Tensor GB = over_rows(G), HB = over_rows(Hm);
      dk = at::empty_like(f.k);
      dv = at::empty_like(f.v);
      exec_(dk.numel(), portable::AftLocalKeyGrads<A>{f.range, ptr(f.E), ptr(f.mw), ptr(f.K), ptr(f.v), ptr(G),
                                                      ptr(Hm), ptr(GB), ptr(HB), f.C, mut(dk), mut(dv)});
      dw = at::zeros_like(f.E);
      exec_(f.L * (2 * window - 1), portable::AftLocalBiasGrads<A>{f.range, ptr(f.E), ptr(f.K), ptr(f.v), ptr(G),
                                                                   ptr(Hm), f.B, f.C, mut(dw)});
    }
    if (f.any_flagged) {
      exec_(dk.numel(), portable::AftFlaggedKeyGrads<A>{f.range, ptr(f.k), ptr(f.v), ptr(f.y), ptr(f.m), ptr(f.s),
                                                        ptr(dy), f.flag.template const_data_ptr<bool>(), f.C, mut(dk),
                                                        mut(dv)});
      exec_(dw.numel(), portable::AftFlaggedBiasGrads<A>{f.range, ptr(f.k), ptr(f.v), ptr(f.y), ptr(f.m),
                                                         ptr(f.s), ptr(dy), f.flag.template const_data_ptr<bool>(), f.B,
                                                         f.C, mut(dw)});
    }
    return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dw.to(w.scalar_type())};
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
    at::Tensor dk = at::empty_like(f.k), dv = at::empty_like(f.v), dw = at::empty_like(f.w);
    exec_(dk.numel(), portable::ConvKeyGrads<A>{f.grid, ptr(f.E), ptr(f.mw), ptr(f.K), ptr(f.v), ptr(G), ptr(Hm),
                                                ptr(GB), ptr(HB), mut(dk), mut(dv)});
    exec_(dw.numel(), portable::ConvWeightGrads<A>{f.grid, ptr(f.E), ptr(f.K), ptr(f.v), ptr(G), ptr(Hm), f.B,
                                                   mut(dw)});
    if (f.any_flagged) {
      const bool* flag = f.flag.template const_data_ptr<bool>();
      exec_(dk.numel(), portable::ConvFlaggedKeyGrads<A>{f.grid, ptr(f.k), ptr(f.v), ptr(f.y), ptr(f.m), ptr(f.s),
                                                         ptr(dy), flag, mut(dk), mut(dv)});
      exec_(dw.numel(), portable::ConvFlaggedWeightGrads<A>{f.grid, ptr(f.k), ptr(f.v), ptr(f.y), ptr(f.m),
                                                            ptr(f.s), ptr(dy), flag, f.B, mut(dw)});
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
    at::Tensor q, k, v, w;        // inputs in the accumulation type, contiguous
    at::Tensor E, mw;             // (L, S) row-stabilised exp of the biases (0 outside R(t)); row maxima (L)
    at::Tensor K;                 // exp(k - max over positions), (B, S, C)
    at::Tensor y, den, flag;      // (B, L, C); flag: computed exactly by AftRobustRows
    at::Tensor m, s;              // softmax statistics of the flagged elements
    portable::AftRange<A> range;
    int64_t B, L, S, C;
    bool any_flagged;
  };

  Full full(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, bool causal,
            int64_t window) const {
    Full f;
    f.q = q.to(acc());
    f.k = k.to(acc()).contiguous();
    f.v = v.to(acc()).contiguous();
    f.w = w.to(acc()).contiguous();
    f.B = k.size(0);
    f.L = q.size(1);
    f.S = k.size(1);
    f.C = k.size(2);
    f.range = {ptr(f.w), f.L, f.S, window, causal};
    const auto opts = f.k.options();
    // w' (the bias outside the window is 0), -inf outside R(t); its row maxima; E = exp(w' - mw).
    at::Tensor biases = f.w;
    if (window > 0) {
      const at::Tensor t = at::arange(f.L, opts.dtype(at::kLong)).view({-1, 1});
      const at::Tensor j = at::arange(f.S, opts.dtype(at::kLong)).view({1, -1});
      biases = at::where((t - j).abs() < window, f.w, 0);
    }
    if (causal) {
      biases = biases.masked_fill(at::ones({f.L, f.S}, opts.dtype(at::kBool)).triu(1), -INFINITY);
    }
    f.mw = f.L > 0 && f.S > 0 ? std::get<0>(biases.max(1)).contiguous() : at::zeros({f.L}, opts);
    f.E = at::exp(biases - f.mw.view({-1, 1})).contiguous();
    const at::Tensor mk = f.S > 0 ? std::get<0>(f.k.max(1, true)) : at::zeros({f.B, 1, f.C}, opts);
    f.K = at::exp(f.k - mk).contiguous();
    if (window == 0) {
      const at::Tensor num_den = at::matmul(f.E, at::cat({f.K * f.v, f.K}, 2));  // one product: (B, L, 2C)
      const at::Tensor den = num_den.narrow(2, f.C, f.C);
      f.flag = (den < tiny()).logical_or(den.isnan()).contiguous();
      f.den = at::where(f.flag, 1, den).contiguous();
      f.y = at::where(f.flag, 0, num_den.narrow(2, 0, f.C) / f.den).contiguous();
    } else {
      // The sums over R(t) of K v and K: prefix sums when causal, else totals.
      const int64_t rows[] = {f.B, f.L, f.C};
      auto over_range = [&](const at::Tensor& x) {
        return (causal ? x.cumsum(1) : x.sum(1, true).expand(rows)).contiguous();
      };
      const at::Tensor Akv = over_range(f.K * f.v), Ak = over_range(f.K);
      f.y = at::empty({f.B, f.L, f.C}, opts);
      f.den = at::empty_like(f.y);
      f.flag = at::empty({f.B, f.L, f.C}, opts.dtype(at::kBool));
      exec_(f.y.numel(), portable::AftLocalRows<A>{f.range, ptr(f.E), ptr(f.mw), ptr(f.K), ptr(f.v), ptr(Akv),
                                                   ptr(Ak), f.C, tiny(), mut(f.y), mut(f.den),
                                                   f.flag.template mutable_data_ptr<bool>()});
    }
    f.any_flagged = f.flag.numel() > 0 && f.flag.any().template item<bool>();
    if (f.any_flagged) {
      f.m = at::zeros_like(f.y);
      f.s = at::ones_like(f.y);
      exec_(f.y.numel(), portable::AftRobustRows<A>{f.range, ptr(f.k), ptr(f.v), f.flag.template const_data_ptr<bool>(),
                                                    f.C, mut(f.y), mut(f.m), mut(f.s)});
    }
    return f;
  }

  struct Conv {
    at::Tensor k, v, w;        // (B, P, C) with P = Hi Wi positions, and the (heads, s, s) weight
    at::Tensor E, mw, K;       // exp(w - mw_h), the per-head maxima of (0, w^h), exp(k - max_p k)
    at::Tensor y, den, flag;   // (B, P, C)
    at::Tensor m, s;           // softmax statistics of the flagged elements
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
    const at::Tensor mk = Hi * Wi > 0 ? std::get<0>(f.k.max(1, true)) : at::zeros({f.B, 1, C}, f.k.options());
    f.K = at::exp(f.k - mk).contiguous();
    const at::Tensor Akv = (f.K * f.v).sum(1).contiguous(), Ak = f.K.sum(1).contiguous();
    f.y = at::empty_like(f.k);
    f.den = at::empty_like(f.k);
    f.flag = at::empty(flat, f.k.options().dtype(at::kBool));
    exec_(f.y.numel(), portable::ConvLocalRows<A>{f.grid, ptr(f.E), ptr(f.mw), ptr(f.K), ptr(f.v), ptr(Akv), ptr(Ak),
                                                  tiny(), mut(f.y), mut(f.den),
                                                  f.flag.template mutable_data_ptr<bool>()});
    f.any_flagged = f.flag.numel() > 0 && f.flag.any().template item<bool>();
    if (f.any_flagged) {
      f.m = at::zeros_like(f.y);
      f.s = at::ones_like(f.y);
      exec_(f.y.numel(), portable::ConvRobustRows<A>{f.grid, ptr(f.k), ptr(f.v),
                                                     f.flag.template const_data_ptr<bool>(), mut(f.y), mut(f.m),
                                                     mut(f.s)});
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
    exec_(B * C, portable::AftSimpleCausalScan<A>{ptr(ka), ptr(va), dy.defined() ? ptr(dyc) : nullptr, L, C,
                                                  mut(r.y), mut(m), mut(s),
                                                  dy.defined() ? mut(r.dk) : nullptr,
                                                  dy.defined() ? mut(r.dv) : nullptr});
    return r;
  }

  const Exec& exec_;
};

// Runs fn(Aft<Exec, A>) for the accumulation type of `input`.
template <typename Exec, typename Fn>
auto with_aft(const Exec& exec, const at::Tensor& input, const Fn& fn) {
  if (input.scalar_type() == at::kDouble) {
    return fn(Aft<Exec, double>(exec));
  }
  return fn(Aft<Exec, float>(exec));
}

}  // namespace flowformer::aft_portable
