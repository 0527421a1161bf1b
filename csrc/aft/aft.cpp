// Schemas of the AFT ops, and the C++ API that calls them through the dispatcher.
#include "aft/aft_ops.h"

#include <flowformer/aft.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace flowformer {
namespace aft_ops {

template <typename Fn>
static auto typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

at::Tensor full(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& pos_bias,
                bool causal, int64_t window) {
  static auto op = typed_op<decltype(full)>(kFull);
  return op.call(query, key, value, pos_bias, causal, window);
}

FullOutputs full_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& pos_bias, bool causal, int64_t window) {
  static auto op = typed_op<decltype(full_forward)>(kFullForward);
  return op.call(query, key, value, pos_bias, causal, window);
}

Grads4 full_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                     const at::Tensor& value, const at::Tensor& pos_bias, const at::Tensor& y, const at::Tensor& lse,
                     bool causal, int64_t window) {
  static auto op = typed_op<decltype(full_backward)>(kFullBackward);
  return op.call(grad_out, query, key, value, pos_bias, y, lse, causal, window);
}

at::Tensor simple(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal) {
  static auto op = typed_op<decltype(simple)>(kSimple);
  return op.call(query, key, value, causal);
}

Grads3 simple_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                       const at::Tensor& value, bool causal) {
  static auto op = typed_op<decltype(simple_backward)>(kSimpleBackward);
  return op.call(grad_out, query, key, value, causal);
}

at::Tensor conv(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& weight) {
  static auto op = typed_op<decltype(conv)>(kConv);
  return op.call(query, key, value, weight);
}

Grads4 conv_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                     const at::Tensor& value, const at::Tensor& weight) {
  static auto op = typed_op<decltype(conv_backward)>(kConvBackward);
  return op.call(grad_out, query, key, value, weight);
}

}  // namespace aft_ops

at::Tensor aft_conv(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& weight) {
  return aft_ops::conv(query, key, value, weight);
}

at::Tensor aft_full(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& pos_bias, const AftFullOptions& options) {
  return aft_ops::full(query, key, value, pos_bias, options.causal, options.window);
}

at::Tensor aft_simple(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal) {
  return aft_ops::simple(query, key, value, causal);
}

TORCH_LIBRARY_FRAGMENT(flowformer, m) {
  m.def("aft_full(Tensor query, Tensor key, Tensor value, Tensor pos_bias, *, bool causal=False, int window=0) "
        "-> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("aft_full_forward(Tensor query, Tensor key, Tensor value, Tensor pos_bias, *, bool causal=False, "
        "int window=0) -> (Tensor out, Tensor y, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("aft_full_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor pos_bias, Tensor y, "
        "Tensor lse, *, bool causal, int window) -> (Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("aft_conv(Tensor query, Tensor key, Tensor value, Tensor weight) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("aft_conv_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor weight) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("aft_simple(Tensor query, Tensor key, Tensor value, *, bool causal=False) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("aft_simple_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, *, bool causal) "
        "-> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}

}  // namespace flowformer
