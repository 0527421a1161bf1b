// Non-causal Flow-Attention, over valid queries i and valid keys j only (L_v, S_v their counts),
// q, k the features, e = eps added to both dot-product operands:
//   I_i = 1 / <q_i + e, sum_j k_j + e>         O_j = 1 / <k_j + e, sum_i q_i + e>
//   A   = sum_j O_j k_j                         B   = sum_i I_i q_i
//   a_i = sigmoid(<q_i + e, A + e> L_v / S_v)   c_j = S_v softmax_j(clamp(<k_j + e, B + e>))
//   g_i = a_i I_i    W = k^T (c v)  (D x M)     out = (g q) W
// Per (batch, head), in parallel: an O((L + S) D) pass for the scalars, which also writes the scaled
// rows c v (and g q for the backward); padded positions and empty slices get I = O = a = c = 0.
// The D x M products are batched matrix products: forward W and q W (rows then scaled by g);
// backward W, dW = (g q)^T dout, Z = dout W^T, U = v dW^T and k dW, then a second O((L + S) D) pass
// turns Z, U and k dW, in place, into dq = g Z + ..., dk = c U + ... and dv = c (k dW), with
// dg_i = <q_i, Z_i> and dc_j = <k_j, U_j>, and applies the chain rule of the feature map. The
// backward keeps g q and c v in the grad_q and grad_v buffers until the products overwrite them.
#include "flow_attention/cpu/flow_attention_cpu.h"

#include "common/cpu_vec.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace flowformer::flow_attention_cpu {
namespace {

// Per-slice scalars, stored as rows of one (B * H, width) tensor:
// I (L), a (L), O (S), r (S, the conserved source before the clamp), c (S), qsum, ksum, A, B (D each),
// and the valid counts L_v, S_v.
struct StatsLayout {
  int64_t L, S, D;
  int64_t width() const { return 2 * L + 3 * S + 4 * D + 2; }
};

// T is the element type, const-qualified for read-only access.
template <typename T>
struct SliceStats {
  T *I, *a, *O, *r, *c, *qsum, *ksum, *A, *B, *counts;

  SliceStats(T* row, const StatsLayout& lay)
      : I(row), a(I + lay.L), O(a + lay.L), r(O + lay.S), c(r + lay.S), qsum(c + lay.S), ksum(qsum + lay.D),
        A(ksum + lay.D), B(A + lay.D), counts(B + lay.D) {}

  T Lv() const { return counts[0]; }
  T Sv() const { return counts[1]; }
  bool empty() const { return Lv() == 0 || Sv() == 0; }
  T ratio() const { return Lv() / Sv(); }
};

// Where the pass writes the scaled rows the products need: c v (S x M) and, for the backward, g q (L x D).
template <typename T>
struct ScaledRows {
  T* cv;
  T* gq;  // nullptr in the forward
};

template <typename T>
FLOWFORMER_CPU_CLONES void compute_stats(const Slice<T>& in, const Params& p, T* row, const ScaledRows<T>& out) {
  const StatsLayout layout{in.L, in.S, in.D};
  SliceStats<T> st(row, layout);
  const int64_t width = layout.width();
  const int64_t L = in.L, S = in.S, D = in.D, M = in.M;
  const T eps = static_cast<T>(p.eps);
  const T clamp = static_cast<T>(p.clamp);
  std::fill(row, row + width, T(0));
  for (int64_t i = 0; i < L; ++i) {
    if (is_valid(in.query_pad, i)) {
      cpu::axpy(D, T(1), in.q + i * D, st.qsum);
      st.counts[0] += T(1);
    }
  }
  for (int64_t j = 0; j < S; ++j) {
    if (is_valid(in.key_pad, j)) {
      cpu::axpy(D, T(1), in.k + j * D, st.ksum);
      st.counts[1] += T(1);
    }
  }
  if (!st.empty()) {
    for (int64_t i = 0; i < L; ++i) {
      if (is_valid(in.query_pad, i)) {
        st.I[i] = T(1) / cpu::dot_eps(D, in.q + i * D, st.ksum, eps);
        cpu::axpy(D, st.I[i], in.q + i * D, st.B);
      }
    }
    for (int64_t j = 0; j < S; ++j) {
      if (is_valid(in.key_pad, j)) {
        st.O[j] = T(1) / cpu::dot_eps(D, in.k + j * D, st.qsum, eps);
        cpu::axpy(D, st.O[j], in.k + j * D, st.A);
      }
    }
    const T ratio = st.ratio();
    for (int64_t i = 0; i < L; ++i) {
      if (is_valid(in.query_pad, i)) {
        const T sink = cpu::dot_eps(D, in.q + i * D, st.A, eps);
        st.a[i] = T(1) / (T(1) + std::exp(-sink * ratio));
      }
      if (out.gq != nullptr) {
        cpu::scale(D, st.a[i] * st.I[i], in.q + i * D, out.gq + i * D);
      }
    }
    // Competition: c = S_v softmax(clamp(r)), with the maximum subtracted.
    T max_source = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < S; ++j) {
      if (is_valid(in.key_pad, j)) {
        st.r[j] = cpu::dot_eps(D, in.k + j * D, st.B, eps);
        st.c[j] = std::clamp(st.r[j], -clamp, clamp);
        max_source = std::max(max_source, st.c[j]);
      }
    }
    T total = 0;
    for (int64_t j = 0; j < S; ++j) {
      if (is_valid(in.key_pad, j)) {
        st.c[j] = std::exp(st.c[j] - max_source);
        total += st.c[j];
      }
    }
    const T scale = st.Sv() / total;
    for (int64_t j = 0; j < S; ++j) {
      st.c[j] *= scale;
    }
  }
  for (int64_t j = 0; j < S; ++j) {  // padded keys' rows zeroed, whatever v holds there
    if (!st.empty() && is_valid(in.key_pad, j)) {
      cpu::scale(M, st.c[j], in.v + j * M, out.cv + j * M);
    } else {
      std::fill(out.cv + j * M, out.cv + (j + 1) * M, T(0));
    }
  }
  if (st.empty() && out.gq != nullptr) {
    std::fill(out.gq, out.gq + L * D, T(0));
  }
}

// The scalars of every slice, the scaled rows and W = k^T (c v).
struct Shared {
  StatsLayout layout;
  at::Tensor stats;  // (B * H, width)
  at::Tensor cv;     // (B * H, S, M)
  at::Tensor gq;     // (B * H, L, D), or undefined in the forward
  at::Tensor W;      // (B * H, D, M)
};

// cv and gq: where to write c v and g q (the backward lends its gradient buffers); else allocated.
Shared compute_shared(const Features& in, at::Tensor cv, at::Tensor gq) {
  const int64_t BH = in.B * in.H;
  Shared sh{StatsLayout{in.L, in.S, in.D}, {}, std::move(cv), std::move(gq), {}};
  const int64_t width = sh.layout.width();
  const auto options = in.q.options();
  sh.stats = at::empty({BH, width}, options);
  if (!sh.cv.defined()) {
    sh.cv = at::empty({BH, in.S, in.M}, options);
  }
  const bool for_backward = sh.gq.defined();
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "flow_attention_noncausal_stats", [&] {
    scalar_t* stats = sh.stats.mutable_data_ptr<scalar_t>();
    scalar_t* cv = sh.cv.mutable_data_ptr<scalar_t>();
    scalar_t* gq = for_backward ? sh.gq.mutable_data_ptr<scalar_t>() : nullptr;
    in.for_slice_ranges([&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const ScaledRows<scalar_t> rows{cv + bh * in.S * in.M, gq != nullptr ? gq + bh * in.L * in.D : nullptr};
        compute_stats(in.slice<scalar_t>(bh), in.params, stats + bh * width, rows);
      }
    });
  });
  sh.W = at::bmm(in.k.view({BH, in.S, in.D}).transpose(1, 2), sh.cv);
  return sh;
}

// The backward's O((L + S) D) pass on one slice. On entry grad_q holds Z = dout W^T, grad_k holds
// U = v dW^T and grad_v holds k dW; on exit they hold the gradients with respect to query, key, value.
template <typename T>
FLOWFORMER_CPU_CLONES void backward_vectors(const Slice<T>& in, const Params& p, const T* row, T* grad_q,
                                            T* grad_k, T* grad_v, std::vector<T>& scratch) {
  const int64_t L = in.L, S = in.S, D = in.D, M = in.M;
  const SliceStats<const T> st(row, StatsLayout{L, S, D});
  for (int64_t j = 0; j < S; ++j) {
    cpu::scale_(M, st.c[j], grad_v + j * M);  // c = 0 at padded keys
  }
  if (st.empty()) {
    std::fill(grad_q, grad_q + L * D, T(0));
    std::fill(grad_k, grad_k + S * D, T(0));
    return;
  }
  const T eps = static_cast<T>(p.eps);
  const T clamp = static_cast<T>(p.clamp);
  scratch.assign(4 * D + L + S, T(0));
  T* dA = scratch.data();
  T* dB = dA + D;
  T* dqsum = dB + D;
  T* dksum = dqsum + D;
  T* dI = dksum + D;  // L: the gradient of I_i through out_i = a_i I_i ...
  T* dc = dI + L;     // S
  const T ratio = st.ratio();

  // out_i = g_i q_i^T W: dg_i = <q_i, Z_i>, dq_i = g_i Z_i; g_i = a_i I_i, a_i = sigmoid(<q_i + e, A + e> ratio).
  for (int64_t i = 0; i < L; ++i) {
    T* dq = grad_q + i * D;
    if (!is_valid(in.query_pad, i)) {
      std::fill(dq, dq + D, T(0));
      continue;
    }
    const T* q = in.q + i * D;
    const T dg = cpu::dot(D, q, dq);
    const T dsink = dg * st.I[i] * st.a[i] * (T(1) - st.a[i]) * ratio;
    dI[i] = dg * st.a[i];
    cpu::scale_(D, st.a[i] * st.I[i], dq);
    cpu::axpy_eps(D, dsink, st.A, eps, dq);
    cpu::axpy_eps(D, dsink, q, eps, dA);
  }
  // W = k^T (c v): dk_j = c_j U_j, dc_j = <k_j, U_j>; c = S_v softmax(clamp(r)).
  T mean_cdc = 0;
  for (int64_t j = 0; j < S; ++j) {
    if (is_valid(in.key_pad, j)) {
      dc[j] = cpu::dot(D, in.k + j * D, grad_k + j * D);
      mean_cdc += st.c[j] * dc[j];
    }
  }
  mean_cdc /= st.Sv();
  for (int64_t j = 0; j < S; ++j) {
    T* dk = grad_k + j * D;
    if (!is_valid(in.key_pad, j)) {
      std::fill(dk, dk + D, T(0));
      continue;
    }
    const T* k = in.k + j * D;
    cpu::scale_(D, st.c[j], dk);
    const T dsource = st.c[j] * (dc[j] - mean_cdc);
    const T dr = std::abs(st.r[j]) <= clamp ? dsource : T(0);
    cpu::axpy_eps(D, dr, st.B, eps, dk);
    cpu::axpy_eps(D, dr, k, eps, dB);
    // A = sum O k, O_j = 1 / <k_j + e, sum q + e>.
    const T dO = cpu::dot(D, dA, k);
    cpu::axpy(D, st.O[j], dA, dk);
    const T dw = -dO * st.O[j] * st.O[j];
    cpu::axpy_eps(D, dw, st.qsum, eps, dk);
    cpu::axpy_eps(D, dw, k, eps, dqsum);
  }
  // B = sum I q, I_i = 1 / <q_i + e, sum k + e>.
  for (int64_t i = 0; i < L; ++i) {
    if (!is_valid(in.query_pad, i)) {
      continue;
    }
    const T* q = in.q + i * D;
    T* dq = grad_q + i * D;
    const T dIi = dI[i] + cpu::dot(D, dB, q);
    cpu::axpy(D, st.I[i], dB, dq);
    const T du = -dIi * st.I[i] * st.I[i];
    cpu::axpy_eps(D, du, st.ksum, eps, dq);
    cpu::axpy_eps(D, du, q, eps, dksum);
    cpu::axpy(D, T(1), dqsum, dq);
    feature_map_backward_row(p.feature_map, D, in.query + i * D, q, dq);
  }
  for (int64_t j = 0; j < S; ++j) {
    if (is_valid(in.key_pad, j)) {
      T* dk = grad_k + j * D;
      cpu::axpy(D, T(1), dksum, dk);
      feature_map_backward_row(p.feature_map, D, in.key + j * D, in.k + j * D, dk);
    }
  }
}

// out rows *= g_i = a_i I_i (0 at padded queries and in empty slices).
template <typename T>
FLOWFORMER_CPU_CLONES void scale_output(const T* row, int64_t L, int64_t S, int64_t D, int64_t M, T* out) {
  const SliceStats<const T> st(row, StatsLayout{L, S, D});
  for (int64_t i = 0; i < L; ++i) {
    cpu::scale_(M, st.a[i] * st.I[i], out + i * M);
  }
}

}  // namespace

void noncausal_forward(const Features& in, at::Tensor& out) {
  const int64_t BH = in.B * in.H;
  // c v fits in the output buffer when S <= L: keep it there until q W overwrites it.
  at::Tensor cv_buffer;
  if (in.S <= in.L) {
    cv_buffer = out.view(-1).narrow(0, 0, BH * in.S * in.M).view({BH, in.S, in.M});
  }
  const Shared sh = compute_shared(in, /*cv=*/cv_buffer, /*gq=*/{});
  at::Tensor out3 = out.view({BH, in.L, in.M});
  at::bmm_out(out3, in.q.view({BH, in.L, in.D}), sh.W);
  const int64_t width = sh.layout.width();
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "flow_attention_noncausal_forward", [&] {
    const scalar_t* stats = sh.stats.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    in.for_slice_ranges([&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        scale_output(stats + bh * width, in.L, in.S, in.D, in.M, o + bh * in.L * in.M);
      }
    });
  });
}

void noncausal_backward(const Features& in, const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k,
                        at::Tensor& grad_v) {
  const int64_t BH = in.B * in.H;
  at::Tensor dq = grad_q.view({BH, in.L, in.D});
  at::Tensor dk = grad_k.view({BH, in.S, in.D});
  at::Tensor dv = grad_v.view({BH, in.S, in.M});
  const Shared sh = compute_shared(in, /*cv=*/dv, /*gq=*/dq);
  const at::Tensor dout = grad_out.view({BH, in.L, in.M});
  const at::Tensor dW = at::bmm(sh.gq.transpose(1, 2), dout);
  at::bmm_out(dq, dout, sh.W.transpose(1, 2));                           // Z, over g q
  at::bmm_out(dk, in.v.view({BH, in.S, in.M}), dW.transpose(1, 2));      // U
  at::bmm_out(dv, in.k.view({BH, in.S, in.D}), dW);                      // k dW, over c v

  const int64_t width = sh.layout.width();
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "flow_attention_noncausal_backward", [&] {
    const scalar_t* stats = sh.stats.const_data_ptr<scalar_t>();
    scalar_t* gq = dq.mutable_data_ptr<scalar_t>();
    scalar_t* gk = dk.mutable_data_ptr<scalar_t>();
    scalar_t* gv = dv.mutable_data_ptr<scalar_t>();
    in.for_slice_ranges([&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch;
      for (int64_t bh = begin; bh < end; ++bh) {
        backward_vectors(in.slice<scalar_t>(bh), in.params, stats + bh * width, gq + bh * in.L * in.D,
                         gk + bh * in.S * in.D, gv + bh * in.S * in.M, scratch);
      }
    });
  });
}

}  // namespace flowformer::flow_attention_cpu
