// Non-causal Flow-Attention on one (batch, head), over valid queries i and valid keys j only
// (L_v, S_v their counts), q = phi(query), k = phi(key), e = eps added to both dot-product operands:
//   I_i = 1 / <q_i + e, sum_j k_j + e>         O_j = 1 / <k_j + e, sum_i q_i + e>
//   A   = sum_j O_j k_j                         B   = sum_i I_i q_i
//   a_i = sigmoid(<q_i + e, A + e> L_v / S_v)   c_j = S_v softmax_j(clamp(<k_j + e, B + e>))
//   W   = sum_j k_j (c_j v_j)^T  (D x M)        out_i = a_i I_i q_i^T W
// The backward runs the same four reductions in reverse: dW = sum_i q_i (a_i I_i dout_i)^T feeds
// dk and dv; the softmax, dB, dA, d(sum k) and d(sum q) gradients are D-vectors reduced in two
// further O((L + S) D) passes.
#include "flow_attention/cpu/flow_attention_cpu.h"

#include "common/cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace flowformer::flow_attention_cpu {
namespace {

// Everything the output and the gradients need, recomputed from the inputs.
template <typename T>
struct Stats {
  std::vector<T> fq, fk;           // phi(query) L x D, phi(key) S x D (padded rows unused)
  std::vector<T> qsum, ksum, A, B;  // D each
  std::vector<T> I, a;             // L: sink incoming, sink allocation
  std::vector<T> O, r, c;          // S: source outgoing, conserved source before the clamp, competition
  std::vector<T> W;                // D x M
  int64_t Lv = 0, Sv = 0;
  T ratio = 0;                     // L_v / S_v

  bool empty() const { return Lv == 0 || Sv == 0; }
};

template <typename T>
void compute_stats(const Slice<T>& in, const Params& p, Stats<T>& st) {
  const int64_t L = in.L, S = in.S, D = in.D, M = in.M;
  const T eps = static_cast<T>(p.eps);
  const T clamp = static_cast<T>(p.clamp);
  st.fq.assign(L * D, T(0));
  st.fk.assign(S * D, T(0));
  st.qsum.assign(D, T(0));
  st.ksum.assign(D, T(0));
  st.A.assign(D, T(0));
  st.B.assign(D, T(0));
  st.I.assign(L, T(0));
  st.a.assign(L, T(0));
  st.O.assign(S, T(0));
  st.r.assign(S, T(0));
  st.c.assign(S, T(0));
  st.W.assign(D * M, T(0));
  st.Lv = 0;
  st.Sv = 0;
  for (int64_t i = 0; i < L; ++i) {
    if (is_valid(in.query_pad, i)) {
      featurize(p.feature_map, D, in.query + i * D, &st.fq[i * D]);
      cpu::axpy(D, T(1), &st.fq[i * D], st.qsum.data());
      ++st.Lv;
    }
  }
  for (int64_t j = 0; j < S; ++j) {
    if (is_valid(in.key_pad, j)) {
      featurize(p.feature_map, D, in.key + j * D, &st.fk[j * D]);
      cpu::axpy(D, T(1), &st.fk[j * D], st.ksum.data());
      ++st.Sv;
    }
  }
  if (st.empty()) {
    return;
  }
  st.ratio = static_cast<T>(st.Lv) / static_cast<T>(st.Sv);
  for (int64_t i = 0; i < L; ++i) {
    if (is_valid(in.query_pad, i)) {
      st.I[i] = T(1) / cpu::dot_eps(D, &st.fq[i * D], st.ksum.data(), eps);
      cpu::axpy(D, st.I[i], &st.fq[i * D], st.B.data());
    }
  }
  for (int64_t j = 0; j < S; ++j) {
    if (is_valid(in.key_pad, j)) {
      st.O[j] = T(1) / cpu::dot_eps(D, &st.fk[j * D], st.qsum.data(), eps);
      cpu::axpy(D, st.O[j], &st.fk[j * D], st.A.data());
    }
  }
  for (int64_t i = 0; i < L; ++i) {
    if (is_valid(in.query_pad, i)) {
      const T sink = cpu::dot_eps(D, &st.fq[i * D], st.A.data(), eps);
      st.a[i] = T(1) / (T(1) + std::exp(-sink * st.ratio));
    }
  }
  // Competition: c = S_v * softmax(clamp(r)), with the maximum subtracted.
  T max_source = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < S; ++j) {
    if (is_valid(in.key_pad, j)) {
      st.r[j] = cpu::dot_eps(D, &st.fk[j * D], st.B.data(), eps);
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
  const T scale = static_cast<T>(st.Sv) / total;
  for (int64_t j = 0; j < S; ++j) {
    if (is_valid(in.key_pad, j)) {
      st.c[j] *= scale;
      cpu::rank1_update(D, M, st.c[j], &st.fk[j * D], in.value + j * M, st.W.data());
    }
  }
}

}  // namespace

template <typename T>
void noncausal_forward(const Slice<T>& in, const Params& p, T* out) {
  Stats<T> st;
  compute_stats(in, p, st);
  for (int64_t i = 0; i < in.L; ++i) {
    T* row = out + i * in.M;
    if (st.empty() || !is_valid(in.query_pad, i)) {
      std::fill(row, row + in.M, T(0));
    } else {
      cpu::vec_mat(in.D, in.M, st.a[i] * st.I[i], &st.fq[i * in.D], st.W.data(), row);
    }
  }
}

template <typename T>
void noncausal_backward(const Slice<T>& in, const Params& p, const T* grad_out, T* grad_query, T* grad_key,
                        T* grad_value) {
  const int64_t L = in.L, S = in.S, D = in.D, M = in.M;
  const T eps = static_cast<T>(p.eps);
  std::fill(grad_query, grad_query + L * D, T(0));
  std::fill(grad_key, grad_key + S * D, T(0));
  std::fill(grad_value, grad_value + S * M, T(0));
  Stats<T> st;
  compute_stats(in, p, st);
  if (st.empty()) {
    return;
  }
  std::vector<T> dW(D * M, T(0)), dA(D, T(0)), dB(D, T(0)), dqsum(D, T(0)), dksum(D, T(0));
  std::vector<T> y(M), dI(L, T(0)), dc(S, T(0));

  // Queries: out_i = g_i q_i^T W with g_i = a_i I_i.
  for (int64_t i = 0; i < L; ++i) {
    if (!is_valid(in.query_pad, i)) {
      continue;
    }
    const T* q = &st.fq[i * D];
    const T* dout = grad_out + i * M;
    T* dq = grad_query + i * D;
    const T g = st.a[i] * st.I[i];
    cpu::vec_mat(D, M, T(1), q, st.W.data(), y.data());
    const T dg = cpu::dot(M, dout, y.data());
    cpu::mat_vec_acc(D, M, g, st.W.data(), dout, dq);
    cpu::rank1_update(D, M, g, q, dout, dW.data());
    const T dsink = dg * st.I[i] * st.a[i] * (T(1) - st.a[i]) * st.ratio;
    cpu::axpy_eps(D, dsink, q, eps, dA.data());
    cpu::axpy_eps(D, dsink, st.A.data(), eps, dq);
    dI[i] = dg * st.a[i];
  }

  // Keys: W = sum_j k_j (c_j v_j)^T.
  T mean_cdc = 0;
  for (int64_t j = 0; j < S; ++j) {
    if (!is_valid(in.key_pad, j)) {
      continue;
    }
    T* dv = grad_value + j * M;
    const T* v = in.value + j * M;
    cpu::vec_mat(D, M, T(1), &st.fk[j * D], dW.data(), y.data());
    dc[j] = cpu::dot(M, y.data(), v);
    for (int64_t m = 0; m < M; ++m) {
      dv[m] = st.c[j] * y[m];
    }
    cpu::mat_vec_acc(D, M, st.c[j], dW.data(), v, grad_key + j * D);
    mean_cdc += st.c[j] * dc[j];
  }
  mean_cdc /= static_cast<T>(st.Sv);
  const T clamp = static_cast<T>(p.clamp);
  for (int64_t j = 0; j < S; ++j) {
    if (!is_valid(in.key_pad, j)) {
      continue;
    }
    const T* k = &st.fk[j * D];
    T* dk = grad_key + j * D;
    const T dsource = st.c[j] * (dc[j] - mean_cdc);
    const T dr = std::abs(st.r[j]) <= clamp ? dsource : T(0);
    cpu::axpy_eps(D, dr, st.B.data(), eps, dk);
    cpu::axpy_eps(D, dr, k, eps, dB.data());
    const T dO = cpu::dot(D, dA.data(), k);
    cpu::axpy(D, st.O[j], dA.data(), dk);
    const T dw = -dO * st.O[j] * st.O[j];
    cpu::axpy_eps(D, dw, st.qsum.data(), eps, dk);
    cpu::axpy_eps(D, dw, k, eps, dqsum.data());
  }

  // Queries again: B = sum_i I_i q_i and I_i = 1 / <q_i + e, sum k + e>.
  for (int64_t i = 0; i < L; ++i) {
    if (!is_valid(in.query_pad, i)) {
      continue;
    }
    const T* q = &st.fq[i * D];
    T* dq = grad_query + i * D;
    const T dIi = dI[i] + cpu::dot(D, dB.data(), q);
    cpu::axpy(D, st.I[i], dB.data(), dq);
    const T du = -dIi * st.I[i] * st.I[i];
    cpu::axpy_eps(D, du, st.ksum.data(), eps, dq);
    cpu::axpy_eps(D, du, q, eps, dksum.data());
    cpu::axpy(D, T(1), dqsum.data(), dq);
    chain_feature_map(p.feature_map, D, in.query + i * D, dq);
  }
  for (int64_t j = 0; j < S; ++j) {
    if (is_valid(in.key_pad, j)) {
      T* dk = grad_key + j * D;
      cpu::axpy(D, T(1), dksum.data(), dk);
      chain_feature_map(p.feature_map, D, in.key + j * D, dk);
    }
  }
}

template void noncausal_forward<float>(const Slice<float>&, const Params&, float*);
template void noncausal_forward<double>(const Slice<double>&, const Params&, double*);
template void noncausal_backward<float>(const Slice<float>&, const Params&, const float*, float*, float*, float*);
template void noncausal_backward<double>(const Slice<double>&, const Params&, const double*, double*, double*,
                                         double*);

}  // namespace flowformer::flow_attention_cpu
