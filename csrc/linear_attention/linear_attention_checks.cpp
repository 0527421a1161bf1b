#include "linear_attention/linear_attention_ops.h"

#include "common/checks.h"
#include "common/feature_map.h"

#include <c10/util/Exception.h>

namespace flowformer::linear_attention_ops {
namespace {

void check_qkv(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
               bool same_length) {
  check_rank(op, "query", query, 4, "(B, H, L, D)");
  check_rank(op, "key", key, 4, same_length ? "(B, H, L, D)" : "(B, H, S, D)");
  check_rank(op, "value", value, 4, same_length ? "(B, H, L, M)" : "(B, H, S, M)");
  check_floating(op, "query", query);
  check_like(op, "key", key, "query", query);
  check_like(op, "value", value, "query", query);
  for (auto [arg, t] : {std::pair{"key", &key}, std::pair{"value", &value}}) {
    check_size(op, arg, *t, 0, query.sym_size(0), "batch size B", "as query");
    check_size(op, arg, *t, 1, query.sym_size(1), "heads H", "as query");
  }
  check_size(op, "key", key, 3, query.sym_size(3), "feature size D", "as query");
  if (same_length) {
    check_size(op, "key", key, 2, query.sym_size(2), "length L", "as query");
  }
  check_size(op, "value", value, 2, key.sym_size(2), same_length ? "length L" : "length S", "as key");
  TORCH_CHECK(query.sym_size(3) > 0, op, ": query must have feature size D >= 1, got shape ", query.sym_sizes());
}

// A recurrent state (B, H, dims...) in the state dtype on the device of query.
void check_state(const char* op, const char* arg, const Optional& state, const at::Tensor& query,
                 std::initializer_list<c10::SymInt> sizes, const char* layout) {
  if (!state.has_value()) {
    return;
  }
  const at::Tensor& s = *state;
  check_rank(op, arg, s, static_cast<int64_t>(sizes.size()), layout);
  const at::ScalarType expected = state_type(query);
  TORCH_CHECK(s.scalar_type() == expected, op, ": ", arg, " must be ", expected, " (the state dtype for ",
              query.scalar_type(), " inputs), got ", s.scalar_type());
  TORCH_CHECK(s.device() == query.device(), op, ": ", arg, " must be on the device of query (", query.device(),
              "), got ", s.device());
  TORCH_CHECK(s.sym_sizes().equals(c10::SymIntArrayRef(sizes.begin(), sizes.size())), op, ": ", arg,
              " must have shape ", c10::SymIntArrayRef(sizes.begin(), sizes.size()), " ", layout, ", got ",
              s.sym_sizes());
}

// A recurrent state (or its gradient): kv (N, H, D, M) and z (N, H, D), N the batch size or, packed, the
// number of sequences; `names` are the two arguments' names.
void check_states(const char* op, std::pair<const char*, const char*> names, const Optional& kv,
                  const Optional& z, const at::Tensor& query, const at::Tensor& value, const Optional& cu_seqlens) {
  const auto N = sequence_count(query, cu_seqlens), H = query.sym_size(1), D = query.sym_size(3),
             M = value.sym_size(3);
  const bool packed = cu_seqlens.has_value();
  check_state(op, names.first, kv, query, {N, H, D, M}, packed ? "(N, H, D, M)" : "(B, H, D, M)");
  check_state(op, names.second, z, query, {N, H, D}, packed ? "(N, H, D)" : "(B, H, D)");
}

}  // namespace

at::ScalarType state_type(const at::Tensor& query) {
  return accumulate_type(query.scalar_type());
}

void check_causal_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       c10::string_view feature_map, double eps, const Optional& initial_kv,
                       const Optional& initial_z, const Optional& cu_seqlens) {
  check_qkv(op, query, key, value, /*same_length=*/true);
  parse_feature_map(op, feature_map);
  check_non_negative(op, "eps", eps);
  check_cu_seqlens(op, cu_seqlens, query);
  check_states(op, {"initial_kv", "initial_z"}, initial_kv, initial_z, query, value, cu_seqlens);
}

void check_causal_grads(const at::Tensor& grad_out, const Optional& grad_final_kv, const Optional& grad_final_z,
                        const at::Tensor& query, const at::Tensor& value, const Optional& cu_seqlens) {
  const char* op = kCausalBackward;
  check_grad_out(op, grad_out, query, value);
  check_states(op, {"grad_final_kv", "grad_final_z"}, grad_final_kv, grad_final_z, query, value, cu_seqlens);
}

void check_noncausal_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          c10::string_view feature_map, double eps, const Optional& key_padding_mask) {
  check_qkv(op, query, key, value, /*same_length=*/false);
  parse_feature_map(op, feature_map);
  check_non_negative(op, "eps", eps);
  check_padding_mask(op, "key_padding_mask", key_padding_mask, query, query.sym_size(0), key.sym_size(2), "S");
}

void check_noncausal_grad(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& value) {
  check_grad_out(kNoncausalBackward, grad_out, query, value);
}

}  // namespace flowformer::linear_attention_ops
