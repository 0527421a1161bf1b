#include "flow_attention/flow_attention_ops.h"

#include "common/checks.h"
#include "common/feature_map.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace flowformer::flow_attention_ops {

void check_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                bool causal, c10::string_view feature_map, double eps, double clamp,
                const Mask& query_padding_mask, const Mask& key_padding_mask) {
  check_rank(op, "query", query, 4, "(B, H, L, D)");
  check_rank(op, "key", key, 4, "(B, H, S, D)");
  check_rank(op, "value", value, 4, "(B, H, S, M)");
  check_floating(op, "query", query);
  check_like(op, "key", key, "query", query);
  check_like(op, "value", value, "query", query);
  check_size(op, "key", key, 0, query.sym_size(0), "batch size B", "as query");
  check_size(op, "value", value, 0, query.sym_size(0), "batch size B", "as query");
  check_size(op, "key", key, 1, query.sym_size(1), "heads H", "as query");
  check_size(op, "value", value, 1, query.sym_size(1), "heads H", "as query");
  check_size(op, "key", key, 3, query.sym_size(3), "feature size D", "as query");
  check_size(op, "value", value, 2, key.sym_size(2), "length S", "as key");
  TORCH_CHECK(query.sym_size(3) > 0, op, ": query must have feature size D >= 1, got shape ", query.sym_sizes());
  if (causal) {
    TORCH_CHECK(query.sym_size(2) == key.sym_size(2), op, ": causal=True requires query and key of the same ",
                "length (L == S), got L = ", query.sym_size(2), " and S = ", key.sym_size(2));
  }
  parse_feature_map(op, feature_map);
  check_non_negative(op, "eps", eps);
  TORCH_CHECK(clamp >= 0.0, op, ": clamp must be >= 0 (float('inf') disables it), got ", clamp);
  check_padding_mask(op, "query_padding_mask", query_padding_mask, query, query.sym_size(0), query.sym_size(2), "L");
  check_padding_mask(op, "key_padding_mask", key_padding_mask, query, query.sym_size(0), key.sym_size(2), "S");
}

namespace {

// A packed state (or its gradient) in the accumulation type on the device of query, of state_shape.
void check_state(const char* op, const char* name, const Mask& state, const at::Tensor& query,
                 const at::Tensor& value, const Mask& cu_seqlens) {
  if (!state.has_value()) {
    return;
  }
  const at::ScalarType expected = accumulate_type(query.scalar_type());
  TORCH_CHECK(state->scalar_type() == expected, op, ": ", name, " must be ", expected, " (the state dtype for ",
              query.scalar_type(), " inputs), got ", state->scalar_type());
  TORCH_CHECK(state->device() == query.device(), op, ": ", name, " must be on the device of query (", query.device(),
              "), got ", state->device());
  const std::vector<c10::SymInt> shape = state_shape(query, value, cu_seqlens);
  TORCH_CHECK(state->sym_sizes().equals(shape), op, ": ", name, " must have shape ",
              cu_seqlens.has_value() ? "(N, H, 3 + 4 D + D M) = (" : "(B, H, 3 + 4 D + D M) = (", shape[0], ", ",
              shape[1], ", ", shape[2], "), got ", state->sym_sizes());
}

}  // namespace

std::vector<c10::SymInt> state_shape(const at::Tensor& query, const at::Tensor& value, const Mask& cu_seqlens) {
  const auto D = query.sym_size(3), M = value.sym_size(3);
  return {sequence_count(query, cu_seqlens), query.sym_size(1), 3 + 4 * D + D * M};
}

void check_state_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                      c10::string_view feature_map, double eps, double clamp, const Mask& state,
                      const Mask& query_padding_mask, const Mask& key_padding_mask, const Mask& cu_seqlens) {
  const char* op = kCausalState;
  check_args(op, query, key, value, true, feature_map, eps, clamp, query_padding_mask, key_padding_mask);
  check_cu_seqlens(op, cu_seqlens, query);
  check_state(op, "state", state, query, value, cu_seqlens);
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& value) {
  flowformer::check_grad_out(kBackward, grad_out, query, value);
}

void check_state_backward_args(const at::Tensor& grad_out, const Mask& grad_state, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, c10::string_view feature_map,
                               double eps, double clamp, const Mask& state, const Mask& query_padding_mask,
                               const Mask& key_padding_mask, const Mask& cu_seqlens) {
  const char* op = kCausalStateBackward;
  check_args(op, query, key, value, true, feature_map, eps, clamp, query_padding_mask, key_padding_mask);
  check_cu_seqlens(op, cu_seqlens, query);
  check_state(op, "state", state, query, value, cu_seqlens);
  check_state(op, "grad_state", grad_state, query, value, cu_seqlens);
  flowformer::check_grad_out(op, grad_out, query, value);
}

}  // namespace flowformer::flow_attention_ops
