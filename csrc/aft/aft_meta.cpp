// Shapes only (Meta): what torch.compile, torch.export and FakeTensor see. Same checks as the kernels.
#include "aft/aft_ops.h"

#include "common/checks.h"

#include <torch/library.h>

namespace flowformer::aft_ops {
namespace {

at::Tensor like(const at::Tensor& t) {
  return new_output(t.sym_sizes(), t.options());
}

at::Tensor full_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const at::Tensor& pos_bias, bool causal, int64_t window) {
  check_full_args(kFull, query, key, value, pos_bias, causal, window);
  return like(query);
}

FullOutputs full_forward_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              const at::Tensor& pos_bias, bool causal, int64_t window) {
  check_full_args(kFullForward, query, key, value, pos_bias, causal, window);
  const auto stats = query.options().dtype(accumulate_type(query.scalar_type()));
  return {like(query), new_output(query.sym_sizes(), stats), new_output(query.sym_sizes(), stats)};
}

Grads4 full_backward_meta(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                          const at::Tensor& value, const at::Tensor& pos_bias, const at::Tensor& y,
                          const at::Tensor& lse, bool causal, int64_t window) {
  check_full_args(kFullBackward, query, key, value, pos_bias, causal, window);
  check_grad_out(kFullBackward, grad_out, query);
  check_full_stats(kFullBackward, y, lse, query);
  return {like(query), like(key), like(value), like(pos_bias)};
}

at::Tensor simple_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal) {
  check_simple_args(kSimple, query, key, value, causal);
  return like(query);
}

Grads3 simple_backward_meta(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, bool causal) {
  check_simple_args(kSimpleBackward, query, key, value, causal);
  check_grad_out(kSimpleBackward, grad_out, query);
  return {like(query), like(key), like(value)};
}

at::Tensor conv_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const at::Tensor& weight) {
  check_conv_args(kConv, query, key, value, weight);
  return like(query);
}

Grads4 conv_backward_meta(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                          const at::Tensor& value, const at::Tensor& weight) {
  check_conv_args(kConvBackward, query, key, value, weight);
  check_grad_out(kConvBackward, grad_out, query);
  return {like(query), like(key), like(value), like(weight)};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, Meta, m) {
  m.impl("aft_conv", TORCH_FN(conv_meta));
  m.impl("aft_conv_backward", TORCH_FN(conv_backward_meta));
  m.impl("aft_full", TORCH_FN(full_meta));
  m.impl("aft_full_backward", TORCH_FN(full_backward_meta));
  m.impl("aft_full_forward", TORCH_FN(full_forward_meta));
  m.impl("aft_simple", TORCH_FN(simple_meta));
  m.impl("aft_simple_backward", TORCH_FN(simple_backward_meta));
}

}  // namespace flowformer::aft_ops
