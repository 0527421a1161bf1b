// Schemas of the Flow-Attention ops, and the C++ API that calls them through the dispatcher.
#include "flow_attention/flow_attention_ops.h"

#include <flowformer/flow_attention.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace flowformer {
namespace flow_attention_ops {

at::Tensor forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal,
                   c10::string_view feature_map, double eps, double clamp, const Mask& query_padding_mask,
                   const Mask& key_padding_mask) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(kForward, "").typed<decltype(forward)>();
  return op.call(query, key, value, causal, feature_map, eps, clamp, query_padding_mask, key_padding_mask);
}

Grads backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
               bool causal, c10::string_view feature_map, double eps, double clamp, const Mask& query_padding_mask,
               const Mask& key_padding_mask) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(kBackward, "").typed<decltype(backward)>();
  return op.call(grad_out, query, key, value, causal, feature_map, eps, clamp, query_padding_mask,
                 key_padding_mask);
}

std::tuple<at::Tensor, at::Tensor> causal_with_state(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value, c10::string_view feature_map,
                                                     double eps, double clamp, const Mask& state,
                                                     const Mask& query_padding_mask, const Mask& key_padding_mask,
                                                     const Mask& cu_seqlens) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(kCausalState, "").typed<decltype(causal_with_state)>();
  return op.call(query, key, value, feature_map, eps, clamp, state, query_padding_mask, key_padding_mask, cu_seqlens);
}

StateGrads causal_with_state_backward(const at::Tensor& grad_out, const Mask& grad_state, const at::Tensor& query,
                                      const at::Tensor& key, const at::Tensor& value, c10::string_view feature_map,
                                      double eps, double clamp, const Mask& state, const Mask& query_padding_mask,
                                      const Mask& key_padding_mask, const Mask& cu_seqlens) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(kCausalStateBackward, "")
                       .typed<decltype(causal_with_state_backward)>();
  return op.call(grad_out, grad_state, query, key, value, feature_map, eps, clamp, state, query_padding_mask,
                 key_padding_mask, cu_seqlens);
}

}  // namespace flow_attention_ops

CausalFlowAttentionResult causal_flow_attention(const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& value, const CausalFlowAttentionOptions& options) {
  auto [out, state] = flow_attention_ops::causal_with_state(query, key, value, options.feature_map, options.eps,
                                                            options.clamp, options.state, options.query_padding_mask,
                                                            options.key_padding_mask, options.cu_seqlens);
  return {out, state};
}

at::Tensor flow_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const FlowAttentionOptions& options) {
  return flow_attention_ops::forward(query, key, value, options.causal, options.feature_map, options.eps,
                                     options.clamp, options.query_padding_mask, options.key_padding_mask);
}

TORCH_LIBRARY_FRAGMENT(flowformer, m) {
  m.def(
      "flow_attention(Tensor query, Tensor key, Tensor value, *, bool causal=False, "
      "str feature_map=\"sigmoid\", float eps=1e-06, float clamp=1.0, "
      "Tensor? query_padding_mask=None, Tensor? key_padding_mask=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "flow_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, *, bool causal, "
      "str feature_map, float eps, float clamp, Tensor? query_padding_mask, Tensor? key_padding_mask) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "causal_flow_attention(Tensor query, Tensor key, Tensor value, *, str feature_map=\"sigmoid\", "
      "float eps=1e-06, float clamp=1.0, Tensor? state=None, Tensor? query_padding_mask=None, "
      "Tensor? key_padding_mask=None, Tensor? cu_seqlens=None) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "causal_flow_attention_backward(Tensor grad_out, Tensor? grad_state, Tensor query, Tensor key, Tensor value, *, "
      "str feature_map, float eps, float clamp, Tensor? state, Tensor? query_padding_mask, "
      "Tensor? key_padding_mask, Tensor? cu_seqlens=None) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace flowformer
