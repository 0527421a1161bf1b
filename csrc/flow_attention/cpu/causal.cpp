// Causal Flow-Attention on one (batch, head) as a single scan over valid positions t, with n_t the
// number of valid positions up to t, q and k the features, e = eps on both operands:
//   K_t = sum k, Q_t = sum q (prefix)     I_t = n_t / <q_t + e, K_t + e>   O_t = n_t / <k_t + e, Q_t + e>
//   A_t = sum O k, B_t = sum I q          a_t = sigmoid(<q_t + e, A_t + e> / n_t)
//   r_t = <k_t + e, B_t + e> / n_t        c_t = n_t exp(clamp(r_t)) / sum_{j<=t} exp(clamp(r_j))
//   S_t = sum_{j<=t} k_j (c_j v_j)^T      out_t = (a_t I_t / n_t) q_t^T S_t
// State O(D M): the softmax denominator is kept against a running maximum m_t (E_t = sum exp(. - m_t)).
// Backward: one forward scan (dq through S_t, and the D-vector prefixes K, Q, B kept per position),
// then one reverse scan carrying R = sum_{t'>=t} q (g dout)^T and the reverse sums of the prefix
// gradients; the softmax gradient uses P_t = sum_{t'>=t} dc c exp(m_t - m_t') / E_t', a recurrence
// whose factors exp(m_t - m_{t+1}) <= 1 cannot overflow.
#include "flow_attention/cpu/flow_attention_cpu.h"

#include "common/cpu_vec.h"
#include "flow_attention/state_layout.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace flowformer::flow_attention_cpu {
namespace {

// The per-position scalars of one valid position.
template <typename T>
struct Step {
  T n, I, O, a, c, r, m, E;
  T g() const { return a * I / n; }  // the row scale of the output
};

template <typename T>
struct ScanState {
  std::vector<T> K, Q, A, B, S;  // D, D, D, D, D x M
};

// The state of an empty prefix.
template <typename T>
ScanState<T> empty_state(int64_t D, int64_t M) {
  return {std::vector<T>(D, T(0)), std::vector<T>(D, T(0)), std::vector<T>(D, T(0)), std::vector<T>(D, T(0)),
          std::vector<T>(D * M, T(0))};
}

template <typename T>
Step<T> empty_step() {
  return {T(0), T(0), T(0), T(0), T(0), T(0), -std::numeric_limits<T>::infinity(), T(0)};
}

// Runs the scan from the state (s, st) of the positions before this slice and calls
// on_step(t, step, state) at every valid position t, once the state includes t; leaves the final state.
// Inlined into its callers, so that it is compiled for the instruction set of their clone.
template <typename T, typename OnStep>
FLOWFORMER_INLINE void causal_scan(const Slice<T>& in, const Params& p, Step<T>& s, ScanState<T>& st,
                                   OnStep on_step) {
  const int64_t L = in.L, D = in.D, M = in.M;
  const T eps = static_cast<T>(p.eps);
  const T clamp = static_cast<T>(p.clamp);
  for (int64_t t = 0; t < L; ++t) {
    if (!is_valid(in.query_pad, t) || !is_valid(in.key_pad, t)) {
      continue;
    }
    const T* q = in.q + t * D;
    const T* k = in.k + t * D;
    s.n += T(1);
    cpu::axpy(D, T(1), k, st.K.data());
    cpu::axpy(D, T(1), q, st.Q.data());
    s.I = s.n / cpu::dot_eps(D, q, st.K.data(), eps);
    s.O = s.n / cpu::dot_eps(D, k, st.Q.data(), eps);
    cpu::axpy(D, s.O, k, st.A.data());
    cpu::axpy(D, s.I, q, st.B.data());
    const T sink = cpu::dot_eps(D, q, st.A.data(), eps) / s.n;
    s.r = cpu::dot_eps(D, k, st.B.data(), eps) / s.n;
    const T source = std::clamp(s.r, -clamp, clamp);
    s.a = T(1) / (T(1) + std::exp(-sink));
    const T m = std::max(s.m, source);
    s.E = s.E * std::exp(s.m - m) + std::exp(source - m);
    s.m = m;
    s.c = s.n * std::exp(source - m) / s.E;
    cpu::rank1_update(D, M, s.c, k, in.v + t * M, st.S.data());
    on_step(t, s, st);
  }
}

template <typename T>
FLOWFORMER_CPU_CLONES void forward_slice(const Slice<T>& in, const Params& p, T* out) {
  const int64_t D = in.D, M = in.M;
  std::fill(out, out + in.L * M, T(0));
  Step<T> step = empty_step<T>();
  ScanState<T> state = empty_state<T>(D, M);
  causal_scan(in, p, step, state, [&](int64_t t, const Step<T>& s, const ScanState<T>& st) {
    cpu::vec_mat(D, M, s.g(), in.q + t * D, st.S.data(), out + t * M);
  });
}

// The forward from a packed recurrent state (state_layout.h), which it advances past this slice.
template <typename T>
FLOWFORMER_CPU_CLONES void forward_slice_with_state(const Slice<T>& in, const Params& p, T* packed, T* out) {
  const int64_t D = in.D, M = in.M;
  const RecurrentState layout{D, M};
  std::fill(out, out + in.L * M, T(0));
  Step<T> step = empty_step<T>();
  step.n = packed[layout.n()];
  step.m = packed[layout.n()] > 0 ? packed[layout.m()] : -std::numeric_limits<T>::infinity();
  step.E = packed[layout.E()];
  ScanState<T> state = empty_state<T>(D, M);
  const std::pair<std::vector<T>*, int64_t> fields[] = {{&state.K, layout.K()}, {&state.Q, layout.Q()},
                                                        {&state.A, layout.A()}, {&state.B, layout.B()},
                                                        {&state.S, layout.S()}};
  for (auto [field, offset] : fields) {
    std::copy(packed + offset, packed + offset + field->size(), field->begin());
  }
  causal_scan(in, p, step, state, [&](int64_t t, const Step<T>& s, const ScanState<T>& st) {
    cpu::vec_mat(D, M, s.g(), in.q + t * D, st.S.data(), out + t * M);
  });
  packed[layout.n()] = step.n;
  packed[layout.m()] = step.n > 0 ? step.m : T(0);
  packed[layout.E()] = step.E;
  for (auto [field, offset] : fields) {
    std::copy(field->begin(), field->end(), packed + offset);
  }
}

// Work space of the backward, reused across the slices of one call.
template <typename T>
struct BackwardScratch {
  std::vector<Step<T>> steps;
  std::vector<T> dg, dsink, K, Q, B, y;
};

template <typename T>
FLOWFORMER_CPU_CLONES void backward_slice(const Slice<T>& in, const Params& p, BackwardScratch<T>& ws,
                                          const T* grad_out, T* grad_q, T* grad_k, T* grad_v) {
  const int64_t L = in.L, D = in.D, M = in.M;
  const T eps = static_cast<T>(p.eps);
  const T clamp = static_cast<T>(p.clamp);
  std::fill(grad_q, grad_q + L * D, T(0));
  std::fill(grad_k, grad_k + L * D, T(0));
  std::fill(grad_v, grad_v + L * M, T(0));

  // Forward scan: keep the scalars and the prefixes K, Q, B of every position; dq through S_t and A_t.
  ws.steps.resize(L);
  for (auto* vec : {&ws.dg, &ws.dsink}) {
    vec->resize(L);
  }
  for (auto* vec : {&ws.K, &ws.Q, &ws.B}) {
    vec->resize(L * D);
  }
  ws.y.resize(M);
  auto& [steps, dg, dsink, K, Q, B, y] = ws;
  Step<T> first = empty_step<T>();
  ScanState<T> state = empty_state<T>(D, M);
  causal_scan(in, p, first, state, [&](int64_t t, const Step<T>& s, const ScanState<T>& st) {
    const T* q = in.q + t * D;
    const T* dout = grad_out + t * M;
    T* dq = grad_q + t * D;
    cpu::vec_mat(D, M, T(1), q, st.S.data(), y.data());
    dg[t] = cpu::dot(M, dout, y.data());
    cpu::mat_vec_acc(D, M, s.g(), st.S.data(), dout, dq);
    dsink[t] = dg[t] * s.I / s.n * s.a * (T(1) - s.a) / s.n;  // d loss / d <q + e, A + e>
    cpu::axpy_eps(D, dsink[t], st.A.data(), eps, dq);
    steps[t] = s;
    std::copy(st.K.begin(), st.K.end(), &K[t * D]);
    std::copy(st.Q.begin(), st.Q.end(), &Q[t * D]);
    std::copy(st.B.begin(), st.B.end(), &B[t * D]);
  });

  // Reverse scan.
  std::vector<T> R(D * M, T(0)), RA(D, T(0)), RB(D, T(0)), RK(D, T(0)), RQ(D, T(0)), dw(M);
  T P = 0;
  T m_next = 0;
  bool has_next = false;
  for (int64_t t = L - 1; t >= 0; --t) {
    if (!is_valid(in.query_pad, t) || !is_valid(in.key_pad, t)) {
      continue;
    }
    const Step<T>& s = steps[t];
    const T* q = in.q + t * D;
    const T* k = in.k + t * D;
    const T* v = in.v + t * M;
    const T* dout = grad_out + t * M;
    T* dq = grad_q + t * D;
    T* dk = grad_k + t * D;

    // S_t = sum k (c v)^T: dk, dv and dc.
    cpu::rank1_update(D, M, s.g(), q, dout, R.data());
    cpu::vec_mat(D, M, T(1), k, R.data(), dw.data());
    cpu::mat_vec_acc(D, M, s.c, R.data(), v, dk);
    T* dv = grad_v + t * M;
    for (int64_t mm = 0; mm < M; ++mm) {
      dv[mm] = s.c * dw[mm];
    }
    const T dc = cpu::dot(M, dw.data(), v);

    // c_t = n_t e_t / sum_{j<=t} e_j.
    P = dc * s.c / s.E + (has_next ? std::exp(s.m - m_next) * P : T(0));
    const T dsource = dc * s.c - (s.c * s.E / s.n) * P;
    const T dr = std::abs(s.r) <= clamp ? dsource / s.n : T(0);
    m_next = s.m;
    has_next = true;

    // r_t = <k_t + e, B_t + e> / n_t and B_t = sum I q.
    cpu::axpy_eps(D, dr, &B[t * D], eps, dk);
    cpu::axpy_eps(D, dr, k, eps, RB.data());
    const T dI = dg[t] * s.a / s.n + cpu::dot(D, RB.data(), q);
    cpu::axpy(D, s.I, RB.data(), dq);

    // sink_t = <q_t + e, A_t + e> / n_t and A_t = sum O k.
    cpu::axpy_eps(D, dsink[t], q, eps, RA.data());
    const T dO = cpu::dot(D, RA.data(), k);
    cpu::axpy(D, s.O, RA.data(), dk);

    // I_t = n_t / <q_t + e, K_t + e> and K_t = sum k.
    const T du = -dI * s.I * s.I / s.n;
    cpu::axpy_eps(D, du, &K[t * D], eps, dq);
    cpu::axpy_eps(D, du, q, eps, RK.data());
    cpu::axpy(D, T(1), RK.data(), dk);

    // O_t = n_t / <k_t + e, Q_t + e> and Q_t = sum q.
    const T dw_out = -dO * s.O * s.O / s.n;
    cpu::axpy_eps(D, dw_out, &Q[t * D], eps, dk);
    cpu::axpy_eps(D, dw_out, k, eps, RQ.data());
    cpu::axpy(D, T(1), RQ.data(), dq);

    feature_map_backward_row(p.feature_map, D, in.query + t * D, q, dq);
    feature_map_backward_row(p.feature_map, D, in.key + t * D, k, dk);
  }
}

}  // namespace

void causal_forward(const Features& in, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "flow_attention_causal_forward", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    in.for_slice_ranges([&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        forward_slice(in.slice<scalar_t>(bh), in.params, o + bh * in.L * in.M);
      }
    });
  });
}

void causal_forward_with_state(const Features& in, at::Tensor& out, at::Tensor& state) {
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "flow_attention_causal_state", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    scalar_t* packed = state.mutable_data_ptr<scalar_t>();
    const int64_t size = state.size(-1);
    in.for_slice_ranges([&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        forward_slice_with_state(in.slice<scalar_t>(bh), in.params, packed + bh * size, o + bh * in.L * in.M);
      }
    });
  });
}

void causal_backward(const Features& in, const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k,
                     at::Tensor& grad_v) {
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "flow_attention_causal_backward", [&] {
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gq = grad_q.mutable_data_ptr<scalar_t>();
    scalar_t* gk = grad_k.mutable_data_ptr<scalar_t>();
    scalar_t* gv = grad_v.mutable_data_ptr<scalar_t>();
    const int64_t L = in.L, D = in.D, M = in.M;
    in.for_slice_ranges([&](int64_t begin, int64_t end) {
      BackwardScratch<scalar_t> ws;
      for (int64_t bh = begin; bh < end; ++bh) {
        backward_slice(in.slice<scalar_t>(bh), in.params, ws, g + bh * L * M, gq + bh * L * D, gk + bh * L * D,
                       gv + bh * L * M);
      }
    });
  });
}

}  // namespace flowformer::flow_attention_cpu
