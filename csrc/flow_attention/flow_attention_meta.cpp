// Shapes only (Meta): what torch.compile, torch.export and FakeTensor see. Same checks as the kernels.
#include "flow_attention/flow_attention_ops.h"

#include "common/checks.h"

#include <torch/library.h>

namespace flowformer::flow_attention_ops {
namespace {

at::Tensor forward_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal,
                        c10::string_view feature_map, double eps, double clamp, const Mask& query_padding_mask,
                        const Mask& key_padding_mask) {
  check_args(kForward, query, key, value, causal, feature_map, eps, clamp, query_padding_mask, key_padding_mask);
  return new_output({query.sym_size(0), query.sym_size(1), query.sym_size(2), value.sym_size(3)}, query.options());
}

Grads backward_meta(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                    const at::Tensor& value, bool causal, c10::string_view feature_map, double eps, double clamp,
                    const Mask& query_padding_mask, const Mask& key_padding_mask) {
  check_args(kBackward, query, key, value, causal, feature_map, eps, clamp, query_padding_mask, key_padding_mask);
  check_grad_out(grad_out, query, value);
  return {new_output(query.sym_sizes(), query.options()), new_output(key.sym_sizes(), key.options()),
          new_output(value.sym_sizes(), value.options())};
}

std::tuple<at::Tensor, at::Tensor> causal_with_state_meta(const at::Tensor& query, const at::Tensor& key,
                                                          const at::Tensor& value, c10::string_view feature_map,
                                                          double eps, double clamp, const Mask& state,
                                                          const Mask& query_padding_mask,
                                                          const Mask& key_padding_mask, const Mask& cu_seqlens) {
  check_state_args(query, key, value, feature_map, eps, clamp, state, query_padding_mask, key_padding_mask,
                   cu_seqlens);
  return {new_output({query.sym_size(0), query.sym_size(1), query.sym_size(2), value.sym_size(3)}, query.options()),
          new_output(state_shape(query, value, cu_seqlens), query.options().dtype(accumulate_type(query.scalar_type())))};
}

StateGrads causal_with_state_backward_meta(const at::Tensor& grad_out, const Mask& grad_state, const at::Tensor& query,
                                           const at::Tensor& key, const at::Tensor& value, c10::string_view feature_map,
                                           double eps, double clamp, const Mask& state, const Mask& query_padding_mask,
                                           const Mask& key_padding_mask, const Mask& cu_seqlens) {
  check_state_backward_args(grad_out, grad_state, query, key, value, feature_map, eps, clamp, state,
                            query_padding_mask, key_padding_mask, cu_seqlens);
  return {new_output(query.sym_sizes(), query.options()), new_output(key.sym_sizes(), key.options()),
          new_output(value.sym_sizes(), value.options()),
          new_output(state_shape(query, value, cu_seqlens), query.options().dtype(accumulate_type(query.scalar_type())))};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, Meta, m) {
  m.impl("causal_flow_attention_backward", TORCH_FN(causal_with_state_backward_meta));
  m.impl("causal_flow_attention", TORCH_FN(causal_with_state_meta));
  m.impl("flow_attention", TORCH_FN(forward_meta));
  m.impl("flow_attention_backward", TORCH_FN(backward_meta));
}

}  // namespace flowformer::flow_attention_ops
