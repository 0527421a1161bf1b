// Linear attention as the CUDA backend runs it (with CudaExecutor; the CPU test mode with EmulatedExecutor):
// calls in bf16 and half on the fast path's head dims go to the fused tensor-core kernels (fused.h,
// kernels/linear_attention: forward and backward, causal and not); the rest (float32, float64, other head
// dims, backward shapes wider than one block's state, decoding steps) run as portable item kernels
// (kernels/common/chunk_items.h) and small ATen ops on per-row scalars. Math: spec/linear_attention.md; q, k are the features phi(query), phi(key).
//
// Causal, chunked (kScanChunk rows): the state at each chunk start is the initial state plus an
// exclusive scan of per-chunk sums of k v^T (and of k); inside a chunk, q_t^T S_t adds the chunk's
// scores <q_t, k_j> (j <= t) times v_j. The backward runs the same machinery on the reversed sums
// R_t = dS_L + sum_{t' >= t} q_t' dnum_t'^T and r_t = dz_L + sum_{t' >= t} dden_t' q_t', with
// dnum_t = dout_t / den_t and dden_t = -<dout_t, out_t> / den_t:
//   dq_t = S_t dnum_t + dden_t z_t    dk_t = R_t v_t + r_t    dv_t = R_t^T k_t    dS_0 = R_1, dz_0 = r_1.
// A call with L = 1 (a decoding step) is one launch of DecodeStep. Packed sequences (cu_seqlens) that the
// fused kernels do not take: each sequence alone (per_sequence). Non-causal: the same with totals (partial sums of kReduceChunk rows
// added in a fixed order) over the valid keys.
#pragma once

#include "common/checks.h"
#include "common/chunk_launcher.h"
#include "common/feature_map.h"
#include "linear_attention/decode_step.h"
#include "linear_attention/fused.h"

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace flowformer::linear_attention_portable {

constexpr int64_t kReduceChunk = 256;
constexpr int64_t kScanChunk = 64;

struct Problem {
  at::Tensor query, key, value;    // unit stride along the row
  at::Tensor key_pad;              // (B, S) bool contiguous, or undefined (non-causal only)
  at::Tensor initial_kv, initial_z;  // contiguous states, or undefined (causal only)
  FeatureMap feature_map;
  double eps;
  bool normalize;
};

inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

using CausalResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using CausalGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
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
        exec_(exec), p_(p), B_(p.query.size(0)), H_(p.query.size(1)), L_(p.query.size(2)), S_(p.key.size(2)),
        D_(p.query.size(3)), M_(p.value.size(3)) {}

  CausalResult causal_forward() const {
    if (L_ == 1) {
      return decode_step();
    }
    const Causal c = causal_common();
    const auto [out, den] = causal_output(c);
    (void)den;
    return {out.to(p_.query.scalar_type()).view({B_, H_, L_, M_}),
            (c.kv0 + c.kv_chunks.sum(1, true)).view({B_, H_, D_, M_}),
            (c.z0 + c.z_chunks.sum(1, true)).view({B_, H_, D_})};
  }

  CausalGrads causal_backward(const at::Tensor& grad_out, const at::Tensor& grad_kv, const at::Tensor& grad_z) const {
    const Causal c = causal_common();
    const Rows<T> dout = rows(grad_out, {}, {}, false);
    const auto [inv_den, dden] = output_gradient_scales(c, grad_out);
    // dq_t = (S_t dout_t) / den_t + dden_t z_t, with S_t dout_t = S0 dout_t + sum_{j <= t} k_j <v_j, dout_t>.
    const at::Tensor VD = scores(dout, c.v);
    at::Tensor Sdout = row_times(dout, c.S0, kScanChunk, /*transpose=*/true);
    score_rows_add(Sdout, VD, c.ones, span(false, false), c.k);
    const at::Tensor grad_q =
        assemble(c.q, c.k, Sdout, inv_den, {term(c.Z0, kScanChunk, c.ones, false, dden, 0, {})}, kScanChunk);
    // R_t and r_t, from the final-state gradients and the later chunks.
    const at::Tensor dkv_final = state_or_zeros(grad_kv, D_ * M_);
    const at::Tensor dz_final = state_or_zeros(grad_z, D_);
    const at::Tensor R_chunks = outer_sums(c.q, dout, inv_den, kScanChunk);
    const at::Tensor r_chunks = column_sums(c.q, dden, kScanChunk);
    const at::Tensor R0 = exclusive(R_chunks, true) + dkv_final;
    const at::Tensor r0 = exclusive(r_chunks, true) + dz_final;
    at::Tensor Rv = row_times(c.v, R0, kScanChunk, /*transpose=*/true);
    score_rows_add(Rv, VD, inv_den, span(true, true), c.q);
    const at::Tensor grad_k =
        assemble(c.k, c.q, Rv, c.ones, {term(r0, kScanChunk, dden, true, {}, 0, {})}, kScanChunk);
    at::Tensor Rk = row_times(c.k, R0, kScanChunk, /*transpose=*/false);
    score_rows_add(Rk, c.G, inv_den, span(true, true), dout);
    return {grad_q, grad_k, Rk.to(p_.value.scalar_type()).view({B_, H_, L_, M_}),
            (dkv_final + R_chunks.sum(1, true)).view({B_, H_, D_, M_}),
            (dz_final + r_chunks.sum(1, true)).view({B_, H_, D_})};
  }

  at::Tensor noncausal_forward() const {
    const Noncausal n = noncausal_common();
    return (n.num / n.den.unsqueeze(-1)).to(p_.query.scalar_type()).view({B_, H_, L_, M_});
  }

  Grads noncausal_backward(const at::Tensor& grad_out) const {
    const Noncausal n = noncausal_common();
    const Rows<T> dout = rows(grad_out, {}, {}, false);
    const at::Tensor inv_den = n.den.reciprocal();
    const at::Tensor out = n.num * inv_den.unsqueeze(-1);
    const at::Tensor dden = -(acc_rows(grad_out) * out).sum(-1) * inv_den;
    at::Tensor Sdout = row_times(dout, n.S, L_, /*transpose=*/true);
    const at::Tensor grad_q = assemble(n.q, n.k, Sdout, inv_den, {term(n.z, L_, {}, false, dden, 0, {})},
                                       kReduceChunk);
    const at::Tensor dS = Launcher::total_outer(n.q, dout, inv_den, kReduceChunk);
    const at::Tensor dz = Launcher::total(n.q, dden, kReduceChunk);
    at::Tensor Uv = row_times(n.v, dS, S_, /*transpose=*/true);
    const at::Tensor ones = valid_rows({}, {}, S_);
    const at::Tensor grad_k = assemble(n.k, n.q, Uv, ones, {term(dz, S_, {}, false, {}, 0, {})}, kReduceChunk);
    const at::Tensor grad_v = row_times(n.k, dS, S_, /*transpose=*/false);
    return {grad_q, grad_k, grad_v.to(p_.value.scalar_type()).view({B_, H_, S_, M_})};
  }

 private:
  using Launcher::acc_options;
  using Launcher::assemble;
  using Launcher::BH;
  using Launcher::column_sums;
  using Launcher::exclusive;
  using Launcher::outer_sums;
  using Launcher::row_dot;
  using Launcher::row_times;
  using Launcher::rows;
  using Launcher::score_rows_add;
  using Launcher::score_sums;
  using Launcher::term;
  using Launcher::valid_rows;

  at::Tensor scores(const Rows<T>& x, const Rows<T>& y) const { return Launcher::scores(x, y, kScanChunk); }
  ChunkSpan span(bool suffix, bool transpose) const { return {L_, kScanChunk, suffix, transpose}; }
  // A (B, H, ...) state as (BH, 1, size), zeros if undefined.
  at::Tensor state_or_zeros(const at::Tensor& s, int64_t size) const {
    return s.defined() ? s.reshape({BH(), 1, size}).to(acc_options().dtype())
                       : at::zeros({BH(), 1, size}, acc_options());
  }
  // A (B, H, n, M) tensor as (BH, n, M) in the accumulation type.
  at::Tensor acc_rows(const at::Tensor& x) const {
    return x.to(acc_options().dtype()).reshape({BH(), x.size(2), x.size(3)});
  }

  struct Causal {
    Rows<T> q, k, v;
    at::Tensor ones;                // (BH, L)
    at::Tensor kv0, z0;             // initial states (BH, 1, D * M), (BH, 1, D)
    at::Tensor kv_chunks, z_chunks; // per-chunk sums of k v^T and k
    at::Tensor S0, Z0;              // the states at each chunk start
    at::Tensor G;                   // (BH, L, chunk) = <q_t, k_j> within each chunk
  };

  Causal causal_common() const {
    Causal c{rows(p_.query, {}, {}, true), rows(p_.key, {}, {}, true), rows(p_.value, {}, {}, false)};
    c.ones = valid_rows({}, {}, L_);
    c.kv0 = state_or_zeros(p_.initial_kv, D_ * M_);
    c.z0 = state_or_zeros(p_.initial_z, D_);
    c.kv_chunks = outer_sums(c.k, c.v, {}, kScanChunk);
    c.z_chunks = column_sums(c.k, {}, kScanChunk);
    c.S0 = exclusive(c.kv_chunks, false) + c.kv0;
    c.Z0 = exclusive(c.z_chunks, false) + c.z0;
    c.G = scores(c.q, c.k);
    return c;
  }

  // (out (BH, L, M), den (BH, L)) in the accumulation type; den = 1 without normalisation.
  std::pair<at::Tensor, at::Tensor> causal_output(const Causal& c) const {
    at::Tensor num = row_times(c.q, c.S0, kScanChunk, /*transpose=*/false);
    score_rows_add(num, c.G, c.ones, span(false, false), c.v);
    if (!p_.normalize) {
      return {num, c.ones};
    }
    const at::Tensor den = row_dot(c.q, c.Z0, kScanChunk) + score_sums(c.G, c.ones, span(false, false)) + p_.eps;
    return {num / den.unsqueeze(-1), den};
  }

  // (1 / den_t, dden_t = -<dout_t, out_t> / den_t), or (1, 0) without normalisation.
  std::pair<at::Tensor, at::Tensor> output_gradient_scales(const Causal& c, const at::Tensor& grad_out) const {
    if (!p_.normalize) {
      return {c.ones, at::zeros_like(c.ones)};
    }
    const auto [out, den] = causal_output(c);
    const at::Tensor inv_den = den.reciprocal();
    return {inv_den, -(acc_rows(grad_out) * out).sum(-1) * inv_den};
  }

  CausalResult decode_step() const {
    const Rows<T> q = rows(p_.query, {}, {}, true), k = rows(p_.key, {}, {}, true);
    const Rows<T> v = rows(p_.value, {}, {}, false);
    at::Tensor out = at::empty({B_, H_, 1, M_}, p_.query.options());
    at::Tensor kv = at::empty({B_, H_, D_, M_}, acc_options());
    at::Tensor z = at::empty({B_, H_, D_}, acc_options());
    using Item = portable::DecodeStep<T, A>;
    exec_(Item::items(BH(), D_, M_),
          Item{q, k, v, BH(), Launcher::data(p_.initial_kv), Launcher::data(p_.initial_z), p_.normalize,
               static_cast<A>(p_.eps), out.mutable_data_ptr<T>(), kv.mutable_data_ptr<A>(), z.mutable_data_ptr<A>()});
    return {out, kv, z};
  }

  struct Noncausal {
    Rows<T> q, k, v;
    at::Tensor S, z;  // (BH, 1, D * M), (BH, 1, D) over the valid keys
    at::Tensor num, den;
  };

  Noncausal noncausal_common() const {
    Noncausal n{rows(p_.query, {}, {}, true), rows(p_.key, p_.key_pad, {}, true),
                rows(p_.value, p_.key_pad, {}, false)};
    n.S = Launcher::total_outer(n.k, n.v, {}, kReduceChunk);
    n.z = Launcher::total(n.k, {}, kReduceChunk);
    n.num = row_times(n.q, n.S, L_, /*transpose=*/false);
    n.den = row_dot(n.q, n.z, L_) + p_.eps;
    return n;
  }

  const Exec& exec_;
  const Problem& p_;
  int64_t B_, H_, L_, S_, D_, M_;
};

template <typename Exec, typename Fn>
auto dispatch(const Exec& exec, const Problem& p, const Fn& fn) {
  decltype(fn(Kernels<Exec, float>(exec, p))) result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.query.scalar_type(), "linear_attention_portable", [&] {
    result = fn(Kernels<Exec, scalar_t>(exec, p));
  });
  return result;
}

// The ops on already checked arguments, for any executor.
using Optional = std::optional<at::Tensor>;

// Packed sequences (cu_seqlens, its checked values `cu` on the host) off the fused path. Each non-empty sequence n runs alone, run(n, start, length) on its
// (1, H, length, .) rows, and what that returns is copied into `rows` ((1, H, L, .), at the sequence's
// positions) and then `states` ((N, ...), at n). The states come in holding what an empty sequence returns:
// its initial state (forward) or the gradient of its final state (backward).
template <typename Fn>
void per_sequence(const std::vector<int64_t>& cu, const std::vector<at::Tensor>& rows,
                  const std::vector<at::Tensor>& states, const Fn& run) {
  for (size_t n = 0; n + 1 < cu.size(); ++n) {
    const int64_t start = cu[n], length = cu[n + 1] - cu[n];
    if (length == 0) {
      continue;
    }
    const std::vector<at::Tensor> results = run(static_cast<int64_t>(n), start, length);
    for (size_t i = 0; i < rows.size(); ++i) {
      rows[i].narrow(2, start, length).copy_(results[i]);
    }
    for (size_t i = 0; i < states.size(); ++i) {
      states[i].narrow(0, static_cast<int64_t>(n), 1).copy_(results[rows.size() + i]);
    }
  }
}

// A copy of the (N, ...) states `given` to update, or zeros in the state dtype of query.
inline at::Tensor states_or_zeros(const Optional& given, at::IntArrayRef sizes, const at::Tensor& query) {
  return given.has_value() ? given->clone(at::MemoryFormat::Contiguous)
                           : at::zeros(sizes, query.options().dtype(accumulate_type(query.scalar_type())));
}

// cu: the checked values of cu_seqlens, or empty (not packed). The fused kernels of `fused` take what they can.
template <typename Exec>
CausalResult causal(const Exec& exec, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    c10::string_view feature_map, bool normalize, double eps, const Optional& initial_kv,
                    const Optional& initial_z, const std::vector<int64_t>& cu, const linear_attention_fused::Build& fused,
                    const char* op) {
  if (linear_attention_fused::takes_forward(query, value, cu, fused)) {
    return linear_attention_fused::causal_forward(fused, query, key, value, parse_feature_map(op, feature_map),
                                                  normalize, eps, initial_kv, initial_z, cu);
  }
  if (!cu.empty()) {
    const int64_t N = static_cast<int64_t>(cu.size()) - 1, H = query.size(1), D = query.size(3), M = value.size(3);
    at::Tensor out = new_output(c10::fromIntArrayRefSlow({1, H, query.size(2), M}), query.options());
    at::Tensor kv = states_or_zeros(initial_kv, {N, H, D, M}, query);
    at::Tensor z = states_or_zeros(initial_z, {N, H, D}, query);
    per_sequence(cu, {out}, {kv, z}, [&](int64_t n, int64_t start, int64_t length) {
      auto [o, kv_n, z_n] = causal(exec, query.narrow(2, start, length), key.narrow(2, start, length),
                                   value.narrow(2, start, length), feature_map, normalize, eps, kv.narrow(0, n, 1),
                                   z.narrow(0, n, 1), {}, fused, op);
      return std::vector<at::Tensor>{o, kv_n, z_n};
    });
    return {out, kv, z};
  }
  const Problem p{portable::unit_row_stride(query), portable::unit_row_stride(key),
                  portable::unit_row_stride(value), {}, contiguous_or_undefined(initial_kv),
                  contiguous_or_undefined(initial_z), parse_feature_map(op, feature_map), eps, normalize};
  return dispatch(exec, p, [](const auto& k) { return k.causal_forward(); });
}

template <typename Exec>
CausalGrads causal_backward(const Exec& exec, const at::Tensor& grad_out, const Optional& grad_final_kv,
                            const Optional& grad_final_z, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, c10::string_view feature_map, bool normalize, double eps,
                            const Optional& initial_kv, const Optional& initial_z, const std::vector<int64_t>& cu,
                            const linear_attention_fused::Build& fused, const char* op) {
  if (linear_attention_fused::takes_backward(query, value, cu, fused)) {
    return linear_attention_fused::causal_backward(fused, grad_out, grad_final_kv, grad_final_z, query, key, value,
                                                   parse_feature_map(op, feature_map), normalize, eps, initial_kv,
                                                   initial_z, cu);
  }
  if (!cu.empty()) {
    const int64_t N = static_cast<int64_t>(cu.size()) - 1, H = query.size(1), D = query.size(3), M = value.size(3);
    at::Tensor dq = new_output(query.sym_sizes(), query.options());
    at::Tensor dk = new_output(key.sym_sizes(), key.options());
    at::Tensor dv = new_output(value.sym_sizes(), value.options());
    at::Tensor dkv = states_or_zeros(grad_final_kv, {N, H, D, M}, query);
    at::Tensor dz = states_or_zeros(grad_final_z, {N, H, D}, query);
    per_sequence(cu, {dq, dk, dv}, {dkv, dz}, [&](int64_t n, int64_t start, int64_t length) {
      const auto rows = [&](const at::Tensor& t) { return t.narrow(2, start, length); };
      const auto state = [&](const Optional& s) { return s.has_value() ? Optional(s->narrow(0, n, 1)) : s; };
      auto [gq, gk, gv, gkv, gz] = causal_backward(exec, rows(grad_out), dkv.narrow(0, n, 1), dz.narrow(0, n, 1),
                                                   rows(query), rows(key), rows(value), feature_map, normalize,
                                                   eps, state(initial_kv), state(initial_z), {}, fused, op);
      return std::vector<at::Tensor>{gq, gk, gv, gkv, gz};
    });
    return {dq, dk, dv, dkv, dz};
  }
  const Problem p{portable::unit_row_stride(query), portable::unit_row_stride(key),
                  portable::unit_row_stride(value), {}, contiguous_or_undefined(initial_kv),
                  contiguous_or_undefined(initial_z), parse_feature_map(op, feature_map), eps, normalize};
  const at::Tensor dout = portable::unit_row_stride(grad_out.to(query.scalar_type()));
  const at::Tensor dkv = contiguous_or_undefined(grad_final_kv), dz = contiguous_or_undefined(grad_final_z);
  return dispatch(exec, p, [&](const auto& k) { return k.causal_backward(dout, dkv, dz); });
}

template <typename Exec>
at::Tensor noncausal(const Exec& exec, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     c10::string_view feature_map, double eps, const Optional& key_padding_mask,
                     const linear_attention_fused::Build& fused, const char* op) {
  if (linear_attention_fused::takes_noncausal(query, value, fused)) {
    return linear_attention_fused::noncausal_forward(fused, query, key, value, parse_feature_map(op, feature_map), eps,
                                                     key_padding_mask);
  }
  const Problem p{portable::unit_row_stride(query), portable::unit_row_stride(key),
                  portable::unit_row_stride(value), contiguous_or_undefined(key_padding_mask), {}, {},
                  parse_feature_map(op, feature_map), eps, true};
  return dispatch(exec, p, [](const auto& k) { return k.noncausal_forward(); });
}

template <typename Exec>
Grads noncausal_backward(const Exec& exec, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                         const at::Tensor& value, c10::string_view feature_map, double eps,
                         const Optional& key_padding_mask, const linear_attention_fused::Build& fused,
                         const char* op) {
  if (linear_attention_fused::takes_noncausal_backward(query, value, fused)) {
    return linear_attention_fused::noncausal_backward(fused, grad_out, query, key, value,
                                                      parse_feature_map(op, feature_map), eps, key_padding_mask);
  }
  const Problem p{portable::unit_row_stride(query), portable::unit_row_stride(key),
                  portable::unit_row_stride(value), contiguous_or_undefined(key_padding_mask), {}, {},
                  parse_feature_map(op, feature_map), eps, true};
  const at::Tensor dout = portable::unit_row_stride(grad_out.to(query.scalar_type()));
  return dispatch(exec, p, [&](const auto& k) { return k.noncausal_backward(dout); });
}

}  // namespace flowformer::linear_attention_portable
