// Causal Flow-Attention on one (batch, head) as a single scan over valid positions t, with n_t the
// number of valid positions up to t, q = phi(query), k = phi(key), e = eps on both operands:
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

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace flowformer::flow_attention_cpu {
namespace {

// The per-position scalars of one valid position.
template <typename T>
struct Step {
  T n, I, O, a, c, r, m, E;
  T g() const { return a * I / n; }  // the row scale of the output
};

// Runs the scan and calls on_step(t, step, q, k, state) at every valid position t, after the state
// includes t. `q` and `k` are the featurised rows of t.
template <typename T>
struct ScanState {
  std::vector<T> K, Q, A, B, S;  // D, D, D, D, D x M
};

template <typename T, typename OnStep>
void causal_scan(const Slice<T>& in, const Params& p, OnStep on_step) {
  const int64_t L = in.L, D = in.D, M = in.M;
  const T eps = static_cast<T>(p.eps);
  const T clamp = static_cast<T>(p.clamp);
  ScanState<T> st{std::vector<T>(D, T(0)), std::vector<T>(D, T(0)), std::vector<T>(D, T(0)),
                  std::vector<T>(D, T(0)), std::vector<T>(D * M, T(0))};
  std::vector<T> q(D), k(D);
  Step<T> s{T(0), T(0), T(0), T(0), T(0), T(0), -std::numeric_limits<T>::infinity(), T(0)};
  for (int64_t t = 0; t < L; ++t) {
    if (!is_valid(in.query_pad, t) || !is_valid(in.key_pad, t)) {
      continue;
    }
    featurize(p.feature_map, D, in.query + t * D, q.data());
    featurize(p.feature_map, D, in.key + t * D, k.data());
    s.n += T(1);
    cpu::axpy(D, T(1), k.data(), st.K.data());
    cpu::axpy(D, T(1), q.data(), st.Q.data());
    s.I = s.n / cpu::dot_eps(D, q.data(), st.K.data(), eps);
    s.O = s.n / cpu::dot_eps(D, k.data(), st.Q.data(), eps);
    cpu::axpy(D, s.O, k.data(), st.A.data());
    cpu::axpy(D, s.I, q.data(), st.B.data());
    const T sink = cpu::dot_eps(D, q.data(), st.A.data(), eps) / s.n;
    s.r = cpu::dot_eps(D, k.data(), st.B.data(), eps) / s.n;
    const T source = std::clamp(s.r, -clamp, clamp);
    s.a = T(1) / (T(1) + std::exp(-sink));
    const T m = std::max(s.m, source);
    s.E = s.E * std::exp(s.m - m) + std::exp(source - m);
    s.m = m;
    s.c = s.n * std::exp(source - m) / s.E;
    cpu::rank1_update(D, M, s.c, k.data(), in.value + t * M, st.S.data());
    on_step(t, s, q.data(), k.data(), st);
  }
}

}  // namespace

template <typename T>
void causal_forward(const Slice<T>& in, const Params& p, T* out) {
  const int64_t D = in.D, M = in.M;
  std::fill(out, out + in.L * M, T(0));
  causal_scan(in, p, [&](int64_t t, const Step<T>& s, const T* q, const T*, const ScanState<T>& st) {
    cpu::vec_mat(D, M, s.g(), q, st.S.data(), out + t * M);
  });
}

template <typename T>
void causal_backward(const Slice<T>& in, const Params& p, const T* grad_out, T* grad_query, T* grad_key,
                     T* grad_value) {
  const int64_t L = in.L, D = in.D, M = in.M;
  const T eps = static_cast<T>(p.eps);
  const T clamp = static_cast<T>(p.clamp);
  std::fill(grad_query, grad_query + L * D, T(0));
  std::fill(grad_key, grad_key + L * D, T(0));
  std::fill(grad_value, grad_value + L * M, T(0));

  // Forward scan: keep the scalars and the prefixes K, Q, B of every position; dq through S_t and A_t.
  std::vector<Step<T>> steps(L);
  std::vector<T> dg(L), dsink(L), K(L * D), Q(L * D), B(L * D), y(M);
  causal_scan(in, p, [&](int64_t t, const Step<T>& s, const T* q, const T*, const ScanState<T>& st) {
    const T* dout = grad_out + t * M;
    T* dq = grad_query + t * D;
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
  std::vector<T> R(D * M, T(0)), RA(D, T(0)), RB(D, T(0)), RK(D, T(0)), RQ(D, T(0)), q(D), k(D), dw(M);
  T P = 0;
  T m_next = 0;
  bool has_next = false;
  for (int64_t t = L - 1; t >= 0; --t) {
    if (!is_valid(in.query_pad, t) || !is_valid(in.key_pad, t)) {
      continue;
    }
    const Step<T>& s = steps[t];
    const T* v = in.value + t * M;
    const T* dout = grad_out + t * M;
    T* dq = grad_query + t * D;
    T* dk = grad_key + t * D;
    featurize(p.feature_map, D, in.query + t * D, q.data());
    featurize(p.feature_map, D, in.key + t * D, k.data());

    // S_t = sum k (c v)^T: dk, dv and dc.
    cpu::rank1_update(D, M, s.g(), q.data(), dout, R.data());
    cpu::vec_mat(D, M, T(1), k.data(), R.data(), dw.data());
    cpu::mat_vec_acc(D, M, s.c, R.data(), v, dk);
    T* dv = grad_value + t * M;
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
    cpu::axpy_eps(D, dr, k.data(), eps, RB.data());
    const T dI = dg[t] * s.a / s.n + cpu::dot(D, RB.data(), q.data());
    cpu::axpy(D, s.I, RB.data(), dq);

    // sink_t = <q_t + e, A_t + e> / n_t and A_t = sum O k.
    cpu::axpy_eps(D, dsink[t], q.data(), eps, RA.data());
    const T dO = cpu::dot(D, RA.data(), k.data());
    cpu::axpy(D, s.O, RA.data(), dk);

    // I_t = n_t / <q_t + e, K_t + e> and K_t = sum k.
    const T du = -dI * s.I * s.I / s.n;
    cpu::axpy_eps(D, du, &K[t * D], eps, dq);
    cpu::axpy_eps(D, du, q.data(), eps, RK.data());
    cpu::axpy(D, T(1), RK.data(), dk);

    // O_t = n_t / <k_t + e, Q_t + e> and Q_t = sum q.
    const T dw_out = -dO * s.O * s.O / s.n;
    cpu::axpy_eps(D, dw_out, &Q[t * D], eps, dk);
    cpu::axpy_eps(D, dw_out, k.data(), eps, RQ.data());
    cpu::axpy(D, T(1), RQ.data(), dq);

    chain_feature_map(p.feature_map, D, in.query + t * D, dq);
    chain_feature_map(p.feature_map, D, in.key + t * D, dk);
  }
}

template void causal_forward<float>(const Slice<float>&, const Params&, float*);
template void causal_forward<double>(const Slice<double>&, const Params&, double*);
template void causal_backward<float>(const Slice<float>&, const Params&, const float*, float*, float*, float*);
template void causal_backward<double>(const Slice<double>&, const Params&, const double*, double*, double*,
                                      double*);

}  // namespace flowformer::flow_attention_cpu
