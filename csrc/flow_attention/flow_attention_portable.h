// Flow-Attention as a sequence of portable item kernels (kernels/common/chunk_items.h) and small ATen ops
// on per-row scalars (length-n vectors: counts, softmax, cumulative sums), for any executor: the CUDA
// backend runs it with CudaExecutor, the CPU test mode with EmulatedExecutor. Math: spec/flow_attention.md;
// the gradient formulas are those of csrc/flow_attention/cpu/{noncausal,causal}.cpp.
//
// Non-causal: every sum over i or j is a total, taken as per-chunk partial sums (kReduceChunk rows)
// added in a fixed order. Causal: each prefix vector (K_t = sum k, Q_t, A_t = sum O k, B_t = sum I q,
// S_t = sum k (c v)^T) is its value at the chunk start (exclusive scan of per-chunk sums, kScanChunk
// rows) plus the chunk-local part, whose dot products with q_t or k_t come from the chunk's score
// matrix G[t, j] = <q_t, k_j>; the eps terms use <x + e, y + e> = <x, y> + e sum(x) + e sum(y) + D e^2.
// The competition c_t = n_t exp(r_t - logcumsumexp(r)_t) never overflows. The backward runs the
// suffix sums (R_t = sum g q dout^T, and the gradients of the prefix vectors) the same way, reversed.
#pragma once

#include "common/chunk_launcher.h"
#include "common/feature_map.h"
#include "flow_attention/state_layout.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <limits>
#include <tuple>
#include <utility>

namespace flowformer::flow_attention_portable {

constexpr int64_t kReduceChunk = 256;
constexpr int64_t kScanChunk = 64;

struct Problem {
  at::Tensor query, key, value;   // (B, H, L, D), (B, H, S, D), (B, H, S, M), unit stride along the row
  at::Tensor query_pad, key_pad;  // (B, L), (B, S) bool, contiguous, or undefined
  bool causal;
  FeatureMap feature_map;
  double eps, clamp;
};

// The arguments of one call (already checked), in the layout the kernels read.
inline Problem make_problem(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            bool causal, c10::string_view feature_map, double eps, double clamp,
                            const std::optional<at::Tensor>& query_padding_mask,
                            const std::optional<at::Tensor>& key_padding_mask) {
  auto mask = [](const std::optional<at::Tensor>& m) { return m.has_value() ? m->contiguous() : at::Tensor(); };
  return {portable::unit_row_stride(query), portable::unit_row_stride(key), portable::unit_row_stride(value),
          mask(query_padding_mask), mask(key_padding_mask), causal, parse_feature_map(op, feature_map), eps, clamp};
}

using portable::ChunkSpan;
using portable::Rows;

template <typename Exec, typename T>
class Kernels : private portable::ChunkLauncher<Exec, T> {
  using Launcher = portable::ChunkLauncher<Exec, T>;

 public:
  using A = at::opmath_type<T>;

  Kernels(const Exec& exec, const Problem& p)
      : Launcher(exec, p.query.size(0), p.query.size(1), p.query.size(3), p.value.size(3), p.feature_map,
                 p.query.options()),
        p_(p), B_(p.query.size(0)), H_(p.query.size(1)), L_(p.query.size(2)), S_(p.key.size(2)),
        D_(p.query.size(3)), M_(p.value.size(3)) {}

  at::Tensor forward() {
    return p_.causal ? causal_forward() : noncausal_forward();
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out) {
    return p_.causal ? causal_backward(grad_out) : noncausal_backward(grad_out);
  }
  // The causal mode's gradients from a packed initial state, given those of out and of the final state.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_with_state(const at::Tensor& grad_out,
                                                                                 const at::Tensor& state,
                                                                                 const at::Tensor& grad_state) {
    return causal_backward_with_state(grad_out, state, grad_state);
  }
  // Causal mode from a packed recurrent state (state_layout.h; undefined: the empty prefix):
  // (out, the state after the last position).
  std::pair<at::Tensor, at::Tensor> forward_with_state(const at::Tensor& state) {
    return causal_forward_with_state(state, true);
  }

 private:
  using Launcher::acc_options;
  using Launcher::assemble;
  using Launcher::BH;
  using Launcher::column_sums;
  using Launcher::exclusive;
  using Launcher::outer_sums;
  using Launcher::reverse_cumsum;
  using Launcher::row_dot;
  using Launcher::row_sums;
  using Launcher::row_times;
  using Launcher::rows;
  using Launcher::score_rows_add;
  using Launcher::score_sums;
  using Launcher::term;
  using Launcher::valid_rows;

  at::Tensor total(const Rows<T>& x, const at::Tensor& w) const { return Launcher::total(x, w, kReduceChunk); }
  at::Tensor total_outer(const Rows<T>& x, const Rows<T>& y, const at::Tensor& w) const {
    return Launcher::total_outer(x, y, w, kReduceChunk);
  }
  at::Tensor scores(const Rows<T>& x, const Rows<T>& y) const { return Launcher::scores(x, y, kScanChunk); }
  ChunkSpan span(bool suffix, bool transpose) const { return {L_, kScanChunk, suffix, transpose}; }

  // ---- per-row scalars
  // <x + e, v + e> for the vectors v (BH, 1, D) shared by all rows, given the row sums of x.
  at::Tensor dot_eps_total(const Rows<T>& x, const at::Tensor& x_sums, const at::Tensor& v) const {
    const double e = p_.eps;
    return row_dot(x, v, x.n) + e * (x_sums + v.sum(-1)) + static_cast<double>(D_) * e * e;
  }

  // ---- non-causal
  struct NoncausalStats {
    at::Tensor q_valid, k_valid, Sv, ratio, nonempty;  // per row (BH, n) or per bh (BH, 1)
    at::Tensor q_sum, k_sum, A, Bv;                     // (BH, 1, D): sum q, sum k, sum O k, sum I q
    at::Tensor I, O, a, r, c, g;                        // per row
    at::Tensor W;                                       // (BH, 1, D * M) = k^T (c v)
  };

  NoncausalStats noncausal_stats(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v) const {
    NoncausalStats s;
    s.q_valid = valid_rows(p_.query_pad, {}, L_);
    s.k_valid = valid_rows(p_.key_pad, {}, S_);
    const at::Tensor Lv = s.q_valid.sum(1, true);
    s.Sv = s.k_valid.sum(1, true);
    s.nonempty = (Lv > 0).logical_and(s.Sv > 0);
    s.ratio = at::where(s.nonempty, Lv / s.Sv.clamp_min(1), 0);
    const at::Tensor q_rows_valid = (s.q_valid > 0).logical_and(s.nonempty);
    const at::Tensor k_rows_valid = (s.k_valid > 0).logical_and(s.nonempty);
    const at::Tensor q_row_sums = row_sums(q), k_row_sums = row_sums(k);
    s.q_sum = total(q, {});
    s.k_sum = total(k, {});
    s.I = at::where(q_rows_valid, dot_eps_total(q, q_row_sums, s.k_sum).reciprocal(), 0);
    s.O = at::where(k_rows_valid, dot_eps_total(k, k_row_sums, s.q_sum).reciprocal(), 0);
    s.Bv = total(q, s.I);
    s.A = total(k, s.O);
    s.a = at::where(q_rows_valid, at::sigmoid(dot_eps_total(q, q_row_sums, s.A) * s.ratio), 0);
    s.r = dot_eps_total(k, k_row_sums, s.Bv);
    const double inf = std::numeric_limits<double>::infinity();
    const at::Tensor source = at::clamp(s.r, -p_.clamp, p_.clamp).masked_fill(s.k_valid == 0, -inf);
    s.c = at::where(k_rows_valid, at::softmax(source, -1) * s.Sv, 0);
    s.g = s.a * s.I;
    s.W = total_outer(k, v, s.c);
    return s;
  }

  at::Tensor noncausal_forward() const {
    const Rows<T> q = rows(p_.query, p_.query_pad, {}, true);
    const Rows<T> k = rows(p_.key, p_.key_pad, {}, true);
    const Rows<T> v = rows(p_.value, p_.key_pad, {}, false);
    const NoncausalStats s = noncausal_stats(q, k, v);
    const at::Tensor y = row_times(q, s.W, L_, /*transpose=*/false);
    return (s.g.unsqueeze(-1) * y).to(p_.query.scalar_type()).view({B_, H_, L_, M_});
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> noncausal_backward(const at::Tensor& grad_out) const {
    const Rows<T> q = rows(p_.query, p_.query_pad, {}, true);
    const Rows<T> k = rows(p_.key, p_.key_pad, {}, true);
    const Rows<T> v = rows(p_.value, p_.key_pad, {}, false);
    const Rows<T> dout = rows(grad_out, p_.query_pad, {}, false);
    const NoncausalStats s = noncausal_stats(q, k, v);
    const double e = p_.eps;
    // out_i = g_i q_i^T W: Z_i = W dout_i, dg_i = <q_i, Z_i>; W = k^T (c v): U_j = dW v_j, dc_j = <k_j, U_j>.
    const at::Tensor dW = total_outer(q, dout, s.g);
    at::Tensor Z = row_times(dout, s.W, L_, /*transpose=*/true);
    at::Tensor U = row_times(v, dW, S_, /*transpose=*/true);
    const at::Tensor k_dW = row_times(k, dW, S_, /*transpose=*/false);
    const at::Tensor dg = row_dot(q, Z, 1);
    const at::Tensor dc = row_dot(k, U, 1);
    // g = a I, a = sigmoid(<q + e, A + e> L/S); c = S softmax(clamp(r)).
    const at::Tensor dsink = dg * s.I * s.a * (1 - s.a) * s.ratio;
    const at::Tensor dA = total(q, dsink) + e * dsink.sum(-1, true).unsqueeze(-1);
    const at::Tensor mean_cdc = (s.c * dc).sum(-1, true) / s.Sv.clamp_min(1);
    const at::Tensor dr = at::where((s.k_valid > 0).logical_and(s.r.abs() <= p_.clamp), s.c * (dc - mean_cdc), 0);
    // A = sum O k with O_j = 1 / <k_j + e, sum q + e>; B = sum I q with I_i = 1 / <q_i + e, sum k + e>.
    const at::Tensor dw = -row_dot(k, dA, S_) * s.O * s.O;
    const at::Tensor dB = total(k, dr) + e * dr.sum(-1, true).unsqueeze(-1);
    const at::Tensor dq_sum = total(k, dw) + e * dw.sum(-1, true).unsqueeze(-1);
    const at::Tensor du = -(dg * s.a + row_dot(q, dB, L_)) * s.I * s.I;
    const at::Tensor dk_sum = total(q, du) + e * du.sum(-1, true).unsqueeze(-1);
    const at::Tensor none;
    const at::Tensor grad_q = assemble(q, k, Z, s.g,
                                       {term(s.A, L_, none, false, dsink, e, none),
                                        term(dB, L_, none, false, s.I, 0, none),
                                        term(s.k_sum, L_, none, false, du, e, none),
                                        term(dq_sum, L_, none, false, none, 0, none)},
                                       kReduceChunk);
    const at::Tensor grad_k = assemble(k, q, U, s.c,
                                       {term(s.Bv, S_, none, false, dr, e, none),
                                        term(dA, S_, none, false, s.O, 0, none),
                                        term(s.q_sum, S_, none, false, dw, e, none),
                                        term(dk_sum, S_, none, false, none, 0, none)},
                                       kReduceChunk);
    const at::Tensor grad_v = (s.c.unsqueeze(-1) * k_dW).to(p_.value.scalar_type()).view({B_, H_, S_, M_});
    return {grad_q, grad_k, grad_v};
  }

  // ---- causal (L == S; a position is valid unless either mask marks it)
  struct CausalStats {
    at::Tensor valid, n;                     // per position: 1/0, and the number of valid positions up to it
    at::Tensor G;                            // (BH, L, chunk) = <q_t, k_j> within each chunk
    at::Tensor q_sums, k_sums;               // per position: sum over D of q_t, k_t
    at::Tensor K0, Q0, A0, B0, S0;           // at each chunk start: sum k, sum q, sum O k, sum I q, sum k (c v)^T
    at::Tensor I, O, a, r, source, lse, c, g;
    at::Tensor K_end, Q_end, A_end, B_end, S_end;  // the sums over all positions (initial state included)
  };

  // The state before the first position (state_layout.h): counts and sums (BH, 1, ...), and the log of
  // the competition's normaliser (-inf before any position).
  struct Initial {
    at::Tensor n, K, Q, A, B, S, lse, m;
  };

  Initial initial_state(const at::Tensor& packed) const {
    const RecurrentState layout{D_, M_};
    Initial init;
    if (!packed.defined()) {
      const at::Tensor zero = at::zeros({BH(), 1}, acc_options());
      init.n = zero;
      init.K = init.Q = init.A = init.B = at::zeros({BH(), 1, D_}, acc_options());
      init.S = at::zeros({BH(), 1, D_ * M_}, acc_options());
      init.lse = init.m = at::full({BH(), 1}, -std::numeric_limits<double>::infinity(), acc_options());
      return init;
    }
    const at::Tensor rows = packed.reshape({BH(), layout.size()});
    auto field = [&](int64_t offset, int64_t size) { return rows.narrow(1, offset, size).unsqueeze(1).contiguous(); };
    init.n = rows.narrow(1, RecurrentState::n(), 1);
    const at::Tensor started = init.n > 0;
    const double inf = std::numeric_limits<double>::infinity();
    init.m = at::where(started, rows.narrow(1, RecurrentState::m(), 1), -inf);
    init.lse = at::where(started, at::log(rows.narrow(1, RecurrentState::E(), 1)) + init.m, -inf);
    init.K = field(layout.K(), D_);
    init.Q = field(layout.Q(), D_);
    init.A = field(layout.A(), D_);
    init.B = field(layout.B(), D_);
    init.S = field(layout.S(), D_ * M_);
    return init;
  }

  // <x_t + e, V_t + e> for the prefix vector V_t = V0 (its chunk-start value) + the chunk's
  // sum_{j <= t} w_j y_j, given G (the scores of x with y, transposed if y is the row side), the row
  // sums of x, and the row sums of w y (whose cumulative sum is the sum over D of V_t).
  // <x_t + e, V_t + e> for the prefix vector V_t = V0 (its chunk-start value) + the chunk's
  // sum_{j <= t} w_j y_j, given G (the scores of x with y, transposed if y is the row side), the row
  // sums of x, and the row sums of w y (whose cumulative sum, after that of the initial vector V_init,
  // is the sum over D of V_t).
  at::Tensor prefix_dot_eps(const Rows<T>& x, const at::Tensor& V0, const at::Tensor& G, const at::Tensor& w,
                            bool transpose, const at::Tensor& x_sums, const at::Tensor& wy_sums,
                            const at::Tensor& V_init) const {
    const double e = p_.eps;
    return row_dot(x, V0, kScanChunk) + score_sums(G, w, span(false, transpose)) +
           e * (x_sums + wy_sums.cumsum(-1) + V_init.sum(-1)) + static_cast<double>(D_) * e * e;
  }

  // Per-chunk sums of w x, as the sums before each chunk (the initial sums included) and in total.
  std::pair<at::Tensor, at::Tensor> scanned(const at::Tensor& partial, const at::Tensor& initial) const {
    return {exclusive(partial, false) + initial, partial.sum(1, true) + initial};
  }

  CausalStats causal_stats(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, const Initial& init) const {
    CausalStats s;
    s.valid = valid_rows(p_.query_pad, p_.key_pad, L_);
    s.n = s.valid.cumsum(-1) + init.n;
    const at::Tensor is_valid = s.valid > 0;
    s.G = scores(q, k);
    s.q_sums = row_sums(q);
    s.k_sums = row_sums(k);
    std::tie(s.K0, s.K_end) = scanned(column_sums(k, {}, kScanChunk), init.K);
    std::tie(s.Q0, s.Q_end) = scanned(column_sums(q, {}, kScanChunk), init.Q);
    // I_t = n_t / <q_t + e, K_t + e>, O_t = n_t / <k_t + e, Q_t + e> (G transposed: <k_t, q_i>).
    s.I = at::where(is_valid, s.n / prefix_dot_eps(q, s.K0, s.G, s.valid, false, s.q_sums, s.k_sums, init.K), 0);
    s.O = at::where(is_valid, s.n / prefix_dot_eps(k, s.Q0, s.G, s.valid, true, s.k_sums, s.q_sums, init.Q), 0);
    std::tie(s.A0, s.A_end) = scanned(column_sums(k, s.O, kScanChunk), init.A);
    std::tie(s.B0, s.B_end) = scanned(column_sums(q, s.I, kScanChunk), init.B);
    const at::Tensor sink = prefix_dot_eps(q, s.A0, s.G, s.O, false, s.q_sums, s.O * s.k_sums, init.A) / s.n;
    s.r = prefix_dot_eps(k, s.B0, s.G, s.I, true, s.k_sums, s.I * s.q_sums, init.B) / s.n;
    s.a = at::where(is_valid, at::sigmoid(sink), 0);
    // c_t = n_t exp(source_t) / sum_{j <= t} exp(source_j), through logcumsumexp (no overflow).
    const double inf = std::numeric_limits<double>::infinity();
    s.source = at::where(is_valid, at::clamp(s.r, -p_.clamp, p_.clamp), -inf);
    s.lse = at::logaddexp(at::logcumsumexp(s.source, -1), init.lse);
    s.c = at::where(is_valid, s.n * at::exp(s.source - s.lse), 0);
    s.g = at::where(is_valid, s.a * s.I / s.n, 0);
    std::tie(s.S0, s.S_end) = scanned(outer_sums(k, v, s.c, kScanChunk), init.S);
    return s;
  }

  // The state after the last position, packed (B, H, RecurrentState::size()).
  at::Tensor final_state(const CausalStats& s, const Initial& init) const {
    const at::Tensor n = init.n + s.valid.sum(-1, true);
    const at::Tensor lse = L_ > 0 ? at::logaddexp(at::logsumexp(s.source, -1, true), init.lse) : init.lse;
    const at::Tensor m = L_ > 0 ? at::maximum(std::get<0>(s.source.max(-1, true)), init.m) : init.m;
    const at::Tensor started = n > 0;
    const at::Tensor parts[] = {n, at::where(started, m, 0), at::where(started, at::exp(lse - m), 0),
                                s.K_end.squeeze(1), s.Q_end.squeeze(1), s.A_end.squeeze(1), s.B_end.squeeze(1),
                                s.S_end.squeeze(1)};
    return at::cat(parts, 1).view({B_, H_, RecurrentState{D_, M_}.size()});
  }

  std::tuple<Rows<T>, Rows<T>, Rows<T>> causal_rows() const {
    return {rows(p_.query, p_.query_pad, p_.key_pad, true), rows(p_.key, p_.query_pad, p_.key_pad, true),
            rows(p_.value, p_.query_pad, p_.key_pad, false)};
  }

  // The causal output from a packed initial state (undefined: the empty prefix), and the final state.
  std::pair<at::Tensor, at::Tensor> causal_forward_with_state(const at::Tensor& state, bool want_state) const {
    const auto [q, k, v] = causal_rows();
    const Initial init = initial_state(state);
    const CausalStats s = causal_stats(q, k, v, init);
    // y_t = q_t^T S_t = q_t^T S0 + sum over the chunk's j <= t of <q_t, k_j> c_j v_j.
    at::Tensor y = row_times(q, s.S0, kScanChunk, /*transpose=*/false);
    score_rows_add(y, s.G, s.c, span(false, false), v);
    const at::Tensor out = (s.g.unsqueeze(-1) * y).to(p_.query.scalar_type()).view({B_, H_, L_, M_});
    return {out, want_state ? final_state(s, init) : at::Tensor()};
  }

  at::Tensor causal_forward() const { return causal_forward_with_state({}, false).first; }

  // The gradients of the final state (state_layout.h), unpacked: (BH, 1, ...) fields, zeros where undefined.
  struct FinalGrads {
    at::Tensor m, E, K, Q, A, B, S;
  };

  FinalGrads final_grads(const at::Tensor& grad_state) const {
    const RecurrentState layout{D_, M_};
    const at::Tensor grads = grad_state.defined()
                                 ? grad_state.to(acc_options().dtype()).reshape({BH(), layout.size()})
                                 : at::zeros({BH(), layout.size()}, acc_options());
    auto field = [&](int64_t offset, int64_t size) { return grads.narrow(1, offset, size).unsqueeze(1); };
    return {grads.narrow(1, RecurrentState::m(), 1), grads.narrow(1, RecurrentState::E(), 1), field(layout.K(), D_),
            field(layout.Q(), D_), field(layout.A(), D_), field(layout.B(), D_), field(layout.S(), D_ * M_)};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_backward(const at::Tensor& grad_out) const {
    auto [dq, dk, dv, dstate] = causal_backward_with_state(grad_out, {}, {});
    return {dq, dk, dv};
  }

  // The gradients of the causal mode from a packed initial state (undefined: the empty prefix), given those of
  // the output and of the final state (grad_state, undefined: none): (dq, dk, dv, the initial state's gradient,
  // packed as the state, 0 for its count n; undefined without a state). The final state's sums pass their
  // gradients to every position's terms and to the initial sums; its competition normaliser E exp(m) = exp(lse)
  // passes d lse = dE E to the sources and the initial lse, and dm - dE E to the largest source (or initial m).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_backward_with_state(
      const at::Tensor& grad_out, const at::Tensor& state, const at::Tensor& grad_state) const {
    const auto [q, k, v] = causal_rows();
    const Rows<T> dout = rows(grad_out, p_.query_pad, p_.key_pad, false);
    const Initial init = initial_state(state);
    const CausalStats s = causal_stats(q, k, v, init);
    const FinalGrads fin = final_grads(grad_state);
    const double e = p_.eps;
    const at::Tensor is_valid = s.valid > 0;
    const at::Tensor none;
    const at::Tensor VD = scores(dout, v);  // <dout_t, v_j> within each chunk
    // Z_t = S_t dout_t (the output's gradient through S_t), dg_t = <q_t, Z_t>.
    at::Tensor Z = row_times(dout, s.S0, kScanChunk, /*transpose=*/true);
    score_rows_add(Z, VD, s.c, span(false, false), k);
    const at::Tensor dg = row_dot(q, Z, 1);
    const at::Tensor dsink = at::where(is_valid, dg * s.I / s.n * s.a * (1 - s.a) / s.n, 0);
    // R_t = dS_L + sum_{t' >= t} g q dout^T: dw_t = k_t^T R_t, U_t = R_t v_t; dv = c dw, dc = <dw, v>.
    const at::Tensor R0 = exclusive(outer_sums(q, dout, s.g, kScanChunk), true) + fin.S;
    at::Tensor dw = row_times(k, R0, kScanChunk, /*transpose=*/false);
    score_rows_add(dw, s.G, s.g, span(true, true), dout);
    at::Tensor U = row_times(v, R0, kScanChunk, /*transpose=*/true);
    score_rows_add(U, VD, s.g, span(true, true), q);
    const at::Tensor dc = row_dot(v, dw, 1);
    // c_t = n_t e_t / sum_{j <= t} e_j: dsource_t = x_t - sum_{t' >= t} x_t' exp(source_t - lse_t'), x = dc c,
    // the sum split by sign so that each part is a suffix logsumexp.
    const at::Tensor x = dc * s.c;
    const double inf = std::numeric_limits<double>::infinity();
    auto suffix_part = [&](const at::Tensor& part) {
      const at::Tensor logs = at::where(part > 0, at::log(part) - s.lse, -inf);
      return at::exp(s.source + at::logcumsumexp(logs.flip(-1), -1).flip(-1));
    };
    at::Tensor dsource = x - (suffix_part(at::relu(x)) - suffix_part(at::relu(-x)));
    // The final state's lse_L = logaddexp(logsumexp(source), lse_0) and m_L = max(max source, m_0) pass their
    // gradients (through E_L = exp(lse_L - m_L) and m_L) to the sources, and to lse_0, m_0 below.
    at::Tensor d_lse_0, dm_0;  // (BH, 1), with a state
    if (state.defined()) {  // lse_t' holds lse_0 too (c_t' = n exp(source_t' - lse_t'))
      d_lse_0 = -at::where(is_valid, x * at::exp(init.lse - s.lse), 0).sum(-1, true);
      dm_0 = at::zeros_like(d_lse_0);
    }
    if (grad_state.defined()) {
      const at::Tensor lse_L = L_ > 0 ? at::logaddexp(at::logsumexp(s.source, -1, true), init.lse) : init.lse;
      at::Tensor largest, at_largest;  // of the sources, when there are any
      if (L_ > 0) {
        std::tie(largest, at_largest) = s.source.max(-1, true);
      }
      const at::Tensor m_L = L_ > 0 ? at::maximum(largest, init.m) : init.m;
      const at::Tensor started_L = (init.n + s.valid.sum(-1, true)) > 0;
      const at::Tensor d_lse_L = at::where(started_L, fin.E * at::exp(lse_L - m_L), 0);
      const at::Tensor dm_L = at::where(started_L, fin.m, 0) - d_lse_L;
      const at::Tensor m_from_source = L_ > 0 ? largest > init.m : at::zeros_like(started_L);
      dsource = dsource + at::where(is_valid, d_lse_L * at::exp(s.source - lse_L), 0);
      if (L_ > 0) {  // a largest source carries m_L
        const at::Tensor one_hot = at::zeros_like(s.source).scatter_(-1, at_largest, 1);
        dsource = dsource + at::where(m_from_source, dm_L, 0) * one_hot;
      }
      if (state.defined()) {
        d_lse_0 = d_lse_0 + at::where(init.n > 0, d_lse_L * at::exp(init.lse - lse_L), 0);
        dm_0 = at::where(m_from_source, 0, dm_L);
      }
    }
    const at::Tensor dr = at::where(is_valid.logical_and(s.r.abs() <= p_.clamp), dsource / s.n, 0);
    // r_t = <k_t + e, B_t + e> / n_t: RB_t = sum_{t' >= t} dr (k + e); dI_t gets <RB_t, q_t>.
    const at::Tensor RB0 = exclusive(column_sums(k, dr, kScanChunk), true) + fin.B;
    const at::Tensor dr_after = reverse_cumsum(dr);
    const at::Tensor q_RB = row_dot(q, RB0, kScanChunk) + score_sums(s.G, dr, span(true, false)) +
                            e * s.q_sums * dr_after;
    const at::Tensor du = at::where(is_valid, -(dg * s.a / s.n + q_RB) * s.I * s.I / s.n, 0);
    // sink_t = <q_t + e, A_t + e> / n_t: RA_t = sum_{t' >= t} dsink (q + e); dO_t = <RA_t, k_t>.
    const at::Tensor RA0 = exclusive(column_sums(q, dsink, kScanChunk), true) + fin.A;
    const at::Tensor dsink_after = reverse_cumsum(dsink);
    const at::Tensor k_RA = row_dot(k, RA0, kScanChunk) + score_sums(s.G, dsink, span(true, true)) +
                            e * s.k_sums * dsink_after;
    const at::Tensor dw_out = at::where(is_valid, -k_RA * s.O * s.O / s.n, 0);
    // K_t, Q_t through I_t and O_t: RK_t = sum_{t' >= t} du (q + e), RQ_t = sum_{t' >= t} dw_out (k + e).
    const at::Tensor RK0 = exclusive(column_sums(q, du, kScanChunk), true) + fin.K;
    const at::Tensor RQ0 = exclusive(column_sums(k, dw_out, kScanChunk), true) + fin.Q;
    const at::Tensor grad_q = assemble(q, k, Z, s.g,
                                       {term(s.A0, kScanChunk, s.O, false, dsink, e, none),
                                        term(s.K0, kScanChunk, s.valid, false, du, e, none),
                                        term(RB0, kScanChunk, dr, true, s.I, 0, e * dr_after),
                                        term(RQ0, kScanChunk, dw_out, true, none, 0, e * reverse_cumsum(dw_out))},
                                       kScanChunk);
    const at::Tensor grad_k = assemble(k, q, U, s.c,
                                       {term(s.B0, kScanChunk, s.I, false, dr, e, none),
                                        term(s.Q0, kScanChunk, s.valid, false, dw_out, e, none),
                                        term(RA0, kScanChunk, dsink, true, s.O, 0, e * dsink_after),
                                        term(RK0, kScanChunk, du, true, none, 0, e * reverse_cumsum(du))},
                                       kScanChunk);
    const at::Tensor grad_v = (s.c.unsqueeze(-1) * dw).to(p_.value.scalar_type()).view({B_, H_, L_, M_});
    if (!state.defined()) {
      return {grad_q, grad_k, grad_v, at::Tensor()};
    }
    // The initial state's sums enter every prefix: their gradients are the final ones plus every position's
    // (x_t + e) weighted terms; lse_0 = log E_0 + m_0 (while n_0 > 0).
    const auto with_eps = [&](const Rows<T>& x, const at::Tensor& w) {
      return total(x, w) + e * w.sum(-1, true).unsqueeze(-1);
    };
    const at::Tensor started = init.n > 0;  // else lse_0 = -inf: m_0 and E_0 count for nothing
    const at::Tensor E_0 = at::where(started, at::exp(init.lse - init.m), 1);
    const at::Tensor d_lse_0_valid = at::where(started, d_lse_0, 0);
    const at::Tensor parts[] = {at::zeros_like(init.n),
                                d_lse_0_valid + at::where(started, dm_0, 0),
                                d_lse_0_valid / E_0,
                                (fin.K + with_eps(q, du)).squeeze(1),
                                (fin.Q + with_eps(k, dw_out)).squeeze(1),
                                (fin.A + with_eps(q, dsink)).squeeze(1),
                                (fin.B + with_eps(k, dr)).squeeze(1),
                                (fin.S + total_outer(q, dout, s.g)).squeeze(1)};
    return {grad_q, grad_k, grad_v, at::cat(parts, 1).view({B_, H_, RecurrentState{D_, M_}.size()})};
  }

  const Problem& p_;
  int64_t B_, H_, L_, S_, D_, M_;
};

template <typename Exec>
at::Tensor forward(const Exec& exec, const Problem& p) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.query.scalar_type(), "flow_attention_forward", [&] {
    out = Kernels<Exec, scalar_t>(exec, p).forward();
  });
  return out;
}

template <typename Exec>
std::pair<at::Tensor, at::Tensor> forward_with_state(const Exec& exec, const Problem& p, const at::Tensor& state) {
  std::pair<at::Tensor, at::Tensor> result;
  const at::Tensor packed = state.defined() ? state.contiguous() : state;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.query.scalar_type(), "flow_attention_state", [&] {
    result = Kernels<Exec, scalar_t>(exec, p).forward_with_state(packed);
  });
  return result;
}

// The gradients of causal_flow_attention (the op causal_flow_attention_backward, its arguments checked):
// (dq, dk, dv, the incoming state's gradient, packed; that of a zero state where there is none).
template <typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_with_state(
    const Exec& exec, const Problem& p, const at::Tensor& grad_out, const std::optional<at::Tensor>& state,
    const std::optional<at::Tensor>& grad_state) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
  const at::Tensor dout = portable::unit_row_stride(grad_out.to(p.query.scalar_type()));
  const int64_t size = RecurrentState{p.query.size(3), p.value.size(3)}.size();
  const at::Tensor packed =
      state.has_value() ? state->contiguous()
                        : at::zeros({p.query.size(0), p.query.size(1), size},
                                    p.query.options().dtype(accumulate_type(p.query.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.query.scalar_type(), "flow_attention_state_backward",
                                  [&] {
                                    grads = Kernels<Exec, scalar_t>(exec, p).backward_with_state(
                                        dout, packed, grad_state.value_or(at::Tensor()));
                                  });
  return grads;
}

template <typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const Exec& exec, const Problem& p,
                                                        const at::Tensor& grad_out) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  const at::Tensor dout = portable::unit_row_stride(grad_out.to(p.query.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.query.scalar_type(), "flow_attention_backward", [&] {
    grads = Kernels<Exec, scalar_t>(exec, p).backward(dout);
  });
  return grads;
}

}  // namespace flowformer::flow_attention_portable
