// Autograd for the linear-attention ops, registered in C++ so that C++ programs get gradients too.
// Only the inputs are saved; the backward ops recompute what they need. Gradients flow to query, key,
// value and the initial states, and from the output and the final states (cu_seqlens: none). Differentiating a backward
// op again (double backward) raises a clear error.
#include "linear_attention/linear_attention_ops.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

namespace flowformer::linear_attention_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::string str(c10::string_view s) {
  return std::string(s.data(), s.size());
}

Optional defined_or_none(const at::Tensor& t) {
  return t.defined() ? Optional(t) : std::nullopt;
}

[[noreturn]] void no_double_backward(const char* op) {
  TORCH_CHECK(false, op, ": double backward (the gradient of a gradient of linear attention) is not supported");
}

class CausalFunction : public torch::autograd::Function<CausalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::string& feature_map, bool normalize, double eps,
                               const Optional& initial_kv, const Optional& initial_z,
                               const Optional& cu_seqlens) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({query, key, value, initial_kv.value_or(at::Tensor()), initial_z.value_or(at::Tensor())});
    ctx->saved_data["feature_map"] = feature_map;
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["cu_seqlens"] = cu_seqlens;  // integers: no gradient
    auto [out, kv, z] = causal(query, key, value, feature_map, normalize, eps, initial_kv, initial_z, cu_seqlens);
    return {out, kv, z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // The output has the shape of value (L == S); an unused output gets a zero gradient.
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(saved[2]);
    auto [dq, dk, dv, dkv, dz] = causal_backward(
        grad_out, defined_or_none(grads[1]), defined_or_none(grads[2]), saved[0], saved[1], saved[2],
        ctx->saved_data["feature_map"].toStringRef(), ctx->saved_data["normalize"].toBool(),
        ctx->saved_data["eps"].toDouble(), defined_or_none(saved[3]), defined_or_none(saved[4]),
        ctx->saved_data["cu_seqlens"].toOptional<at::Tensor>());
    // One entry per forward argument; the states get a gradient only where they were given.
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), saved[3].defined() ? dkv : at::Tensor(),
            saved[4].defined() ? dz : at::Tensor(), at::Tensor()};
  }
};

class CausalBackwardFunction : public torch::autograd::Function<CausalBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const Optional& grad_final_kv,
                               const Optional& grad_final_z, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::string& feature_map, bool normalize, double eps,
                               const Optional& initial_kv, const Optional& initial_z,
                               const Optional& cu_seqlens) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv, dkv, dz] = causal_backward(grad_out, grad_final_kv, grad_final_z, query, key, value,
                                                 feature_map, normalize, eps, initial_kv, initial_z, cu_seqlens);
    return {dq, dk, dv, dkv, dz};
  }
  static variable_list backward(AutogradContext*, variable_list) { no_double_backward(kCausalBackward); }
};

class NoncausalFunction : public torch::autograd::Function<NoncausalFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const std::string& feature_map, double eps,
                            const Optional& key_padding_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({query, key, value});
    ctx->saved_data["feature_map"] = feature_map;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["key_padding_mask"] = key_padding_mask;
    return noncausal(query, key, value, feature_map, eps, key_padding_mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dq, dk, dv] = noncausal_backward(grads[0], saved[0], saved[1], saved[2],
                                           ctx->saved_data["feature_map"].toStringRef(),
                                           ctx->saved_data["eps"].toDouble(),
                                           ctx->saved_data["key_padding_mask"].toOptional<at::Tensor>());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class NoncausalBackwardFunction : public torch::autograd::Function<NoncausalBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, const std::string& feature_map,
                               double eps, const Optional& key_padding_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv] = noncausal_backward(grad_out, query, key, value, feature_map, eps, key_padding_mask);
    return {dq, dk, dv};
  }
  static variable_list backward(AutogradContext*, variable_list) { no_double_backward(kNoncausalBackward); }
};

CausalResult causal_autograd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             c10::string_view feature_map, bool normalize, double eps, const Optional& initial_kv,
                             const Optional& initial_z, const Optional& cu_seqlens) {
  const auto r = CausalFunction::apply(query, key, value, str(feature_map), normalize, eps, initial_kv, initial_z,
                                       cu_seqlens);
  return {r[0], r[1], r[2]};
}

CausalGrads causal_backward_autograd(const at::Tensor& grad_out, const Optional& grad_final_kv,
                                     const Optional& grad_final_z, const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, c10::string_view feature_map, bool normalize,
                                     double eps, const Optional& initial_kv, const Optional& initial_z,
                                     const Optional& cu_seqlens) {
  const auto r = CausalBackwardFunction::apply(grad_out, grad_final_kv, grad_final_z, query, key, value,
                                               str(feature_map), normalize, eps, initial_kv, initial_z, cu_seqlens);
  return {r[0], r[1], r[2], r[3], r[4]};
}

at::Tensor noncausal_autograd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              c10::string_view feature_map, double eps, const Optional& key_padding_mask) {
  return NoncausalFunction::apply(query, key, value, str(feature_map), eps, key_padding_mask);
}

Grads noncausal_backward_autograd(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, c10::string_view feature_map, double eps,
                                  const Optional& key_padding_mask) {
  const auto r = NoncausalBackwardFunction::apply(grad_out, query, key, value, str(feature_map), eps,
                                                  key_padding_mask);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, Autograd, m) {
  m.impl("causal_linear_attention", TORCH_FN(causal_autograd));
  m.impl("causal_linear_attention_backward", TORCH_FN(causal_backward_autograd));
  m.impl("linear_attention", TORCH_FN(noncausal_autograd));
  m.impl("linear_attention_backward", TORCH_FN(noncausal_backward_autograd));
}

}  // namespace flowformer::linear_attention_ops
