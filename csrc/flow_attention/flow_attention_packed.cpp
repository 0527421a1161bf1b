// Packed sequences of causal_flow_attention (spec/flow_attention.md, after linear_attention.md): with
// cu_seqlens and B == 1, sequence n is positions [cu_seqlens[n], cu_seqlens[n + 1]) and runs alone from row n
// of the state; its output, final state and gradients are those of that run. Each sequence goes through
// the dispatcher on its own (its view of the inputs, no copy), so every backend takes packed sequences.
#include "flow_attention/flow_attention_ops.h"

#include "common/checks.h"
#include "flow_attention/state_layout.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/zeros.h>

#include <vector>

namespace flowformer::flow_attention_ops {
namespace {

// Sequence n of the packed rows: its positions of a (1, H, L, ...) tensor, of a (1, L) mask, its row of a state.
struct Sequence {
  int64_t first, length, n;

  at::Tensor of(const at::Tensor& rows) const { return rows.narrow(2, first, length); }
  Mask of_mask(const Mask& mask) const { return mask.has_value() ? Mask(mask->narrow(1, first, length)) : Mask(); }
  Mask of_state(const Mask& state) const { return state.has_value() ? Mask(state->narrow(0, n, 1)) : Mask(); }
};

// Calls run(sequence) for each packed sequence, in order.
template <typename Run>
void for_each_sequence(const char* op, const at::Tensor& query, const at::Tensor& cu_seqlens, Run run) {
  const std::vector<int64_t> cu = cu_seqlens_values(op, cu_seqlens, query.size(2));
  for (size_t n = 0; n + 1 < cu.size(); ++n) {
    run(Sequence{cu[n], cu[n + 1] - cu[n], static_cast<int64_t>(n)});
  }
}

// The sequences' states, (N, H, ...) in the state dtype (N = 0: an empty one).
at::Tensor stacked_states(const std::vector<at::Tensor>& rows, const at::Tensor& query, const at::Tensor& value) {
  if (!rows.empty()) {
    return at::cat(rows, 0);
  }
  return at::zeros({0, query.size(1), RecurrentState{query.size(3), value.size(3)}.size()},
                   query.options().dtype(accumulate_type(query.scalar_type())));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_with_state_packed(const at::Tensor& query, const at::Tensor& key,
                                                            const at::Tensor& value, c10::string_view feature_map,
                                                            double eps, double clamp, const Mask& state,
                                                            const Mask& query_padding_mask,
                                                            const Mask& key_padding_mask, const at::Tensor& cu_seqlens) {
  at::Tensor out = new_output({1, query.size(1), query.size(2), value.size(3)}, query.options());
  std::vector<at::Tensor> states;
  for_each_sequence(kCausalState, query, cu_seqlens, [&](const Sequence& s) {
    auto [piece_out, piece_state] =
        causal_with_state(s.of(query), s.of(key), s.of(value), feature_map, eps, clamp, s.of_state(state),
                          s.of_mask(query_padding_mask), s.of_mask(key_padding_mask), {});
    s.of(out).copy_(piece_out);
    states.push_back(piece_state);
  });
  return {out, stacked_states(states, query, value)};
}

StateGrads causal_with_state_backward_packed(const at::Tensor& grad_out, const Mask& grad_state,
                                             const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                             c10::string_view feature_map, double eps, double clamp,
                                             const Mask& state, const Mask& query_padding_mask,
                                             const Mask& key_padding_mask, const at::Tensor& cu_seqlens) {
  at::Tensor dq = new_output(query.sym_sizes(), query.options());
  at::Tensor dk = new_output(key.sym_sizes(), key.options());
  at::Tensor dv = new_output(value.sym_sizes(), value.options());
  std::vector<at::Tensor> dstates;
  for_each_sequence(kCausalStateBackward, query, cu_seqlens, [&](const Sequence& s) {
    auto [piece_dq, piece_dk, piece_dv, piece_dstate] = causal_with_state_backward(
        s.of(grad_out), s.of_state(grad_state), s.of(query), s.of(key), s.of(value), feature_map, eps, clamp,
        s.of_state(state), s.of_mask(query_padding_mask), s.of_mask(key_padding_mask), {});
    s.of(dq).copy_(piece_dq);
    s.of(dk).copy_(piece_dk);
    s.of(dv).copy_(piece_dv);
    dstates.push_back(piece_dstate);
  });
  return {dq, dk, dv, stacked_states(dstates, query, value)};
}

}  // namespace flowformer::flow_attention_ops
