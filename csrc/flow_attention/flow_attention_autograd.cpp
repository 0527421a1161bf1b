// Autograd for flowformer::flow_attention, registered in C++ so that C++ programs get gradients too.
// Saves only the inputs; flowformer::flow_attention_backward recomputes the per-position scalars.
// The backward op itself computes its values under autograd too, but differentiating it again
// (double backward) raises a clear error instead of a wrong or missing second-order gradient.
#include "flow_attention/flow_attention_ops.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

namespace flowformer::flow_attention_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class FlowAttentionFunction : public torch::autograd::Function<FlowAttentionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, bool causal, const std::string& feature_map, double eps,
                            double clamp, const Mask& query_padding_mask, const Mask& key_padding_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({query, key, value});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["feature_map"] = feature_map;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["clamp"] = clamp;
    ctx->saved_data["query_padding_mask"] = query_padding_mask;
    ctx->saved_data["key_padding_mask"] = key_padding_mask;
    return flow_attention_ops::forward(query, key, value, causal, feature_map, eps, clamp, query_padding_mask,
                                       key_padding_mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const std::string feature_map = ctx->saved_data["feature_map"].toStringRef();
    auto [grad_query, grad_key, grad_value] = flow_attention_ops::backward(
        grad_outputs[0], saved[0], saved[1], saved[2], ctx->saved_data["causal"].toBool(), feature_map,
        ctx->saved_data["eps"].toDouble(), ctx->saved_data["clamp"].toDouble(),
        ctx->saved_data["query_padding_mask"].toOptional<at::Tensor>(),
        ctx->saved_data["key_padding_mask"].toOptional<at::Tensor>());
    // One entry per forward argument: the options and masks get no gradient.
    return {grad_query, grad_key, grad_value, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class FlowAttentionBackwardFunction : public torch::autograd::Function<FlowAttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, bool causal,
                               const std::string& feature_map, double eps, double clamp,
                               const Mask& query_padding_mask, const Mask& key_padding_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_query, grad_key, grad_value] = flow_attention_ops::backward(
        grad_out, query, key, value, causal, feature_map, eps, clamp, query_padding_mask, key_padding_mask);
    return {grad_query, grad_key, grad_value};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, kBackward, ": double backward (the gradient of a gradient of flow_attention) is not ",
                "supported");
  }
};

at::Tensor forward_autograd(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal,
                            c10::string_view feature_map, double eps, double clamp, const Mask& query_padding_mask,
                            const Mask& key_padding_mask) {
  return FlowAttentionFunction::apply(query, key, value, causal, std::string(feature_map.data(), feature_map.size()),
                                      eps, clamp, query_padding_mask, key_padding_mask);
}

Grads backward_autograd(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                        const at::Tensor& value, bool causal, c10::string_view feature_map, double eps, double clamp,
                        const Mask& query_padding_mask, const Mask& key_padding_mask) {
  const auto grads = FlowAttentionBackwardFunction::apply(
      grad_out, query, key, value, causal, std::string(feature_map.data(), feature_map.size()), eps, clamp,
      query_padding_mask, key_padding_mask);
  return {grads[0], grads[1], grads[2]};
}

// causal_flow_attention is for inference: a clear error instead of silently missing gradients.
std::tuple<at::Tensor, at::Tensor> causal_with_state_autograd(const at::Tensor& query, const at::Tensor& key,
                                                              const at::Tensor& value, c10::string_view feature_map,
                                                              double eps, double clamp, const Mask& state,
                                                              const Mask& query_padding_mask,
                                                              const Mask& key_padding_mask) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (query.requires_grad() || key.requires_grad() || value.requires_grad() ||
                           (state.has_value() && state->requires_grad()));
  TORCH_CHECK(!needs_grad, kCausalState, ": has no gradient (it is for decoding); train with ",
              "flow_attention(causal=True), or run this under torch.no_grad()");
  at::AutoDispatchBelowADInplaceOrView guard;
  return causal_with_state(query, key, value, feature_map, eps, clamp, state, query_padding_mask, key_padding_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, Autograd, m) {
  m.impl("causal_flow_attention", TORCH_FN(causal_with_state_autograd));
  m.impl("flow_attention", TORCH_FN(forward_autograd));
  m.impl("flow_attention_backward", TORCH_FN(backward_autograd));
}

}  // namespace flowformer::flow_attention_ops
