// Shapes only (Meta): what torch.compile, torch.export and FakeTensor see. Same checks as the kernels,
// except those of the values of cu_seqlens (they need the data).
#include "linear_attention/linear_attention_ops.h"

#include "common/checks.h"

#include <torch/library.h>

namespace flowformer::linear_attention_ops {
namespace {

// The states (N, H, D, M) and (N, H, D): N = B, or the number of packed sequences.
std::pair<at::Tensor, at::Tensor> new_states(const at::Tensor& query, const at::Tensor& value,
                                             const Optional& cu_seqlens) {
  const auto options = query.options().dtype(state_type(query));
  const auto N = sequence_count(query, cu_seqlens), H = query.sym_size(1), D = query.sym_size(3),
             M = value.sym_size(3);
  return {new_output({N, H, D, M}, options), new_output({N, H, D}, options)};
}

CausalResult causal_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         c10::string_view feature_map, bool normalize, double eps, const Optional& initial_kv,
                         const Optional& initial_z, const Optional& cu_seqlens) {
  check_causal_args(kCausal, query, key, value, feature_map, eps, initial_kv, initial_z, cu_seqlens);
  auto [kv, z] = new_states(query, value, cu_seqlens);
  return {new_output({query.sym_size(0), query.sym_size(1), query.sym_size(2), value.sym_size(3)}, query.options()),
          kv, z};
}

CausalGrads causal_backward_meta(const at::Tensor& grad_out, const Optional& grad_final_kv,
                                 const Optional& grad_final_z, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, c10::string_view feature_map, bool normalize, double eps,
                                 const Optional& initial_kv, const Optional& initial_z,
                                 const Optional& cu_seqlens) {
  check_causal_args(kCausalBackward, query, key, value, feature_map, eps, initial_kv, initial_z, cu_seqlens);
  check_causal_grads(grad_out, grad_final_kv, grad_final_z, query, value, cu_seqlens);
  auto [kv, z] = new_states(query, value, cu_seqlens);
  return {new_output(query.sym_sizes(), query.options()), new_output(key.sym_sizes(), key.options()),
          new_output(value.sym_sizes(), value.options()), kv, z};
}

at::Tensor noncausal_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          c10::string_view feature_map, double eps, const Optional& key_padding_mask) {
  check_noncausal_args(kNoncausal, query, key, value, feature_map, eps, key_padding_mask);
  return new_output({query.sym_size(0), query.sym_size(1), query.sym_size(2), value.sym_size(3)}, query.options());
}

Grads noncausal_backward_meta(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, c10::string_view feature_map, double eps,
                              const Optional& key_padding_mask) {
  check_noncausal_args(kNoncausalBackward, query, key, value, feature_map, eps, key_padding_mask);
  check_noncausal_grad(grad_out, query, value);
  return {new_output(query.sym_sizes(), query.options()), new_output(key.sym_sizes(), key.options()),
          new_output(value.sym_sizes(), value.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, Meta, m) {
  m.impl("causal_linear_attention", TORCH_FN(causal_meta));
  m.impl("causal_linear_attention_backward", TORCH_FN(causal_backward_meta));
  m.impl("linear_attention", TORCH_FN(noncausal_meta));
  m.impl("linear_attention_backward", TORCH_FN(noncausal_backward_meta));
}

}  // namespace flowformer::linear_attention_ops
