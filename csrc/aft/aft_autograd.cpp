// Autograd for the AFT ops, registered in C++ so that C++ programs get gradients too. aft_full saves its
// inputs and the softmax statistics of aft_full_forward (y, lse: (B, L, C) each, no (L, S) tensor); the
// other ops save only their inputs and their backward ops recompute the rest. Gradients reach query,
// key, value and pos_bias / weight.
// Differentiating a backward op again (double backward) raises a clear error.
#include "aft/aft_ops.h"

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

namespace flowformer::aft_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

[[noreturn]] void no_double_backward(const char* op) {
  TORCH_CHECK(false, op, ": double backward (the gradient of a gradient of AFT) is not supported");
}

// aft_full_forward's outputs (out, y, lse); y and lse are statistics, not differentiable.
class FullFunction : public torch::autograd::Function<FullFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& pos_bias, bool causal, int64_t window) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, y, lse] = full_forward(query, key, value, pos_bias, causal, window);
    ctx->save_for_backward({query, key, value, pos_bias, y, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["window"] = window;
    ctx->mark_non_differentiable({y, lse});
    return {out, y, lse};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dq, dk, dv, dw] = full_backward(grads[0], s[0], s[1], s[2], s[3], s[4], s[5],
                                          ctx->saved_data["causal"].toBool(), ctx->saved_data["window"].toInt());
    return {dq, dk, dv, dw, at::Tensor(), at::Tensor()};
  }
};

class FullBackwardFunction : public torch::autograd::Function<FullBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, const at::Tensor& pos_bias,
                               const at::Tensor& y, const at::Tensor& lse, bool causal, int64_t window) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv, dw] = full_backward(grad_out, query, key, value, pos_bias, y, lse, causal, window);
    return {dq, dk, dv, dw};
  }
  static variable_list backward(AutogradContext*, variable_list) { no_double_backward(kFullBackward); }
};

class SimpleFunction : public torch::autograd::Function<SimpleFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, bool causal) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({query, key, value});
    ctx->saved_data["causal"] = causal;
    return simple(query, key, value, causal);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dq, dk, dv] = simple_backward(grads[0], s[0], s[1], s[2], ctx->saved_data["causal"].toBool());
    return {dq, dk, dv, at::Tensor()};
  }
};

class SimpleBackwardFunction : public torch::autograd::Function<SimpleBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, bool causal) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv] = simple_backward(grad_out, query, key, value, causal);
    return {dq, dk, dv};
  }
  static variable_list backward(AutogradContext*, variable_list) { no_double_backward(kSimpleBackward); }
};

class ConvFunction : public torch::autograd::Function<ConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({query, key, value, weight});
    return conv(query, key, value, weight);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dq, dk, dv, dw] = conv_backward(grads[0], s[0], s[1], s[2], s[3]);
    return {dq, dk, dv, dw};
  }
};

class ConvBackwardFunction : public torch::autograd::Function<ConvBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, const at::Tensor& weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv, dw] = conv_backward(grad_out, query, key, value, weight);
    return {dq, dk, dv, dw};
  }
  static variable_list backward(AutogradContext*, variable_list) { no_double_backward(kConvBackward); }
};

at::Tensor conv_autograd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& weight) {
  return ConvFunction::apply(query, key, value, weight);
}

Grads4 conv_backward_autograd(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const at::Tensor& weight) {
  const auto r = ConvBackwardFunction::apply(grad_out, query, key, value, weight);
  return {r[0], r[1], r[2], r[3]};
}

at::Tensor full_autograd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& pos_bias, bool causal, int64_t window) {
  if (!torch::autograd::compute_requires_grad(query, key, value, pos_bias)) {  // no statistics to keep
    at::AutoDispatchBelowADInplaceOrView guard;
    return full(query, key, value, pos_bias, causal, window);
  }
  return FullFunction::apply(query, key, value, pos_bias, causal, window)[0];
}

FullOutputs full_forward_autograd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& pos_bias, bool causal, int64_t window) {
  const auto r = FullFunction::apply(query, key, value, pos_bias, causal, window);
  return {r[0], r[1], r[2]};
}

Grads4 full_backward_autograd(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const at::Tensor& pos_bias, const at::Tensor& y,
                              const at::Tensor& lse, bool causal, int64_t window) {
  const auto r = FullBackwardFunction::apply(grad_out, query, key, value, pos_bias, y, lse, causal, window);
  return {r[0], r[1], r[2], r[3]};
}

at::Tensor simple_autograd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal) {
  return SimpleFunction::apply(query, key, value, causal);
}

Grads3 simple_backward_autograd(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, bool causal) {
  const auto r = SimpleBackwardFunction::apply(grad_out, query, key, value, causal);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, Autograd, m) {
  m.impl("aft_full", TORCH_FN(full_autograd));
  m.impl("aft_full_backward", TORCH_FN(full_backward_autograd));
  m.impl("aft_full_forward", TORCH_FN(full_forward_autograd));
  m.impl("aft_simple", TORCH_FN(simple_autograd));
  m.impl("aft_conv", TORCH_FN(conv_autograd));
  m.impl("aft_conv_backward", TORCH_FN(conv_backward_autograd));
  m.impl("aft_simple_backward", TORCH_FN(simple_backward_autograd));
}

}  // namespace flowformer::aft_ops
