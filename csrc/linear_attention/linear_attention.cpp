// Schemas of the linear-attention ops, and the C++ API that calls them through the dispatcher.
#include "linear_attention/linear_attention_ops.h"

#include <flowformer/linear_attention.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace flowformer {
namespace linear_attention_ops {

template <typename Fn>
static auto typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

CausalResult causal(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    c10::string_view feature_map, bool normalize, double eps, const Optional& initial_kv,
                    const Optional& initial_z, const Optional& cu_seqlens) {
  static auto op = typed_op<decltype(causal)>(kCausal);
  return op.call(query, key, value, feature_map, normalize, eps, initial_kv, initial_z, cu_seqlens);
}

CausalGrads causal_backward(const at::Tensor& grad_out, const Optional& grad_final_kv, const Optional& grad_final_z,
                            const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            c10::string_view feature_map, bool normalize, double eps, const Optional& initial_kv,
                            const Optional& initial_z, const Optional& cu_seqlens) {
  static auto op = typed_op<decltype(causal_backward)>(kCausalBackward);
  return op.call(grad_out, grad_final_kv, grad_final_z, query, key, value, feature_map, normalize, eps, initial_kv,
                 initial_z, cu_seqlens);
}

at::Tensor noncausal(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     c10::string_view feature_map, double eps, const Optional& key_padding_mask) {
  static auto op = typed_op<decltype(noncausal)>(kNoncausal);
  return op.call(query, key, value, feature_map, eps, key_padding_mask);
}

Grads noncausal_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                         const at::Tensor& value, c10::string_view feature_map, double eps,
                         const Optional& key_padding_mask) {
  static auto op = typed_op<decltype(noncausal_backward)>(kNoncausalBackward);
  return op.call(grad_out, query, key, value, feature_map, eps, key_padding_mask);
}

}  // namespace linear_attention_ops

CausalLinearAttentionResult causal_linear_attention(const at::Tensor& query, const at::Tensor& key,
                                                    const at::Tensor& value,
                                                    const CausalLinearAttentionOptions& options) {
  auto [out, final_kv, final_z] = linear_attention_ops::causal(query, key, value, options.feature_map,
                                                               options.normalize, options.eps, options.initial_kv,
                                                               options.initial_z, options.cu_seqlens);
  return {out, final_kv, final_z};
}

at::Tensor linear_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const LinearAttentionOptions& options) {
  return linear_attention_ops::noncausal(query, key, value, options.feature_map, options.eps,
                                         options.key_padding_mask);
}

TORCH_LIBRARY_FRAGMENT(flowformer, m) {
  m.def(
      "causal_linear_attention(Tensor query, Tensor key, Tensor value, *, str feature_map=\"elu1\", "
      "bool normalize=True, float eps=1e-06, Tensor? initial_kv=None, Tensor? initial_z=None, "
      "Tensor? cu_seqlens=None) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "causal_linear_attention_backward(Tensor grad_out, Tensor? grad_final_kv, Tensor? grad_final_z, "
      "Tensor query, Tensor key, Tensor value, *, str feature_map, bool normalize, float eps, "
      "Tensor? initial_kv, Tensor? initial_z, Tensor? cu_seqlens) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "linear_attention(Tensor query, Tensor key, Tensor value, *, str feature_map=\"elu1\", float eps=1e-06, "
      "Tensor? key_padding_mask=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "linear_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, *, str feature_map, "
      "float eps, Tensor? key_padding_mask) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace flowformer
