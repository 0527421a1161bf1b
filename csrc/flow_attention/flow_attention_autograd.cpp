// Autograd for flowformer::flow_attention and flowformer::causal_flow_attention, registered in C++ so that
// C++ programs get gradients too. Saves only the inputs (and the incoming state); the backward ops recompute
// the per-position scalars. The backward ops compute their values under autograd too, but differentiating them
// again (double backward) raises a clear error instead of a wrong or missing second-order gradient.
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

// causal_flow_attention: gradients to query, key, value and the incoming state, given those of out and of
// the final state (either may be undefined: zeros). Saves the inputs and the incoming state.
class CausalStateFunction : public torch::autograd::Function<CausalStateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::string& feature_map, double eps, double clamp,
                               const Mask& state, const Mask& query_padding_mask, const Mask& key_padding_mask,
                               const Mask& cu_seqlens) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({query, key, value, state.value_or(at::Tensor())});
    ctx->saved_data["feature_map"] = feature_map;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["clamp"] = clamp;
    ctx->saved_data["query_padding_mask"] = query_padding_mask;
    ctx->saved_data["key_padding_mask"] = key_padding_mask;
    ctx->saved_data["cu_seqlens"] = cu_seqlens;
    auto [out, final_state] = causal_with_state(query, key, value, feature_map, eps, clamp, state,
                                                query_padding_mask, key_padding_mask, cu_seqlens);
    return {out, final_state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &query = saved[0], &value = saved[2];
    at::Tensor grad_out = grad_outputs[0];
    if (!grad_out.defined()) {  // only the final state reached the loss
      grad_out = at::zeros({query.size(0), query.size(1), query.size(2), value.size(3)}, query.options());
    }
    const Mask grad_state = grad_outputs[1].defined() ? Mask(grad_outputs[1]) : Mask();
    const Mask state = saved[3].defined() ? Mask(saved[3]) : Mask();
    auto [grad_query, grad_key, grad_value, grad_state_in] = causal_with_state_backward(
        grad_out, grad_state, query, saved[1], value, ctx->saved_data["feature_map"].toStringRef(),
        ctx->saved_data["eps"].toDouble(), ctx->saved_data["clamp"].toDouble(), state,
        ctx->saved_data["query_padding_mask"].toOptional<at::Tensor>(),
        ctx->saved_data["key_padding_mask"].toOptional<at::Tensor>(),
        ctx->saved_data["cu_seqlens"].toOptional<at::Tensor>());
    // One entry per forward argument: the options, masks and offsets get no gradient, nor an absent state.
    return {grad_query,   grad_key,     grad_value,   at::Tensor(), at::Tensor(),
            at::Tensor(), state.has_value() ? grad_state_in : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> causal_with_state_autograd(const at::Tensor& query, const at::Tensor& key,
                                                              const at::Tensor& value, c10::string_view feature_map,
                                                              double eps, double clamp, const Mask& state,
                                                              const Mask& query_padding_mask,
                                                              const Mask& key_padding_mask, const Mask& cu_seqlens) {
  const std::string map(feature_map.data(), feature_map.size());
  const auto results = CausalStateFunction::apply(query, key, value, map, eps, clamp, state, query_padding_mask,
                                                  key_padding_mask, cu_seqlens);
  return {results[0], results[1]};
}

// causal_flow_attention_backward computes under autograd too; differentiating it again raises.
class CausalStateBackwardFunction : public torch::autograd::Function<CausalStateBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const Mask& grad_state,
                               const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                               const std::string& feature_map, double eps, double clamp, const Mask& state,
                               const Mask& query_padding_mask, const Mask& key_padding_mask, const Mask& cu_seqlens) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv, dstate] = causal_with_state_backward(grad_out, grad_state, query, key, value, feature_map, eps,
                                                           clamp, state, query_padding_mask, key_padding_mask,
                                                           cu_seqlens);
    return {dq, dk, dv, dstate};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, kCausalStateBackward,
                ": double backward (the gradient of a gradient of causal_flow_attention) is not supported");
  }
};

StateGrads causal_with_state_backward_autograd(const at::Tensor& grad_out, const Mask& grad_state,
                                               const at::Tensor& query, const at::Tensor& key,
                                               const at::Tensor& value, c10::string_view feature_map, double eps,
                                               double clamp, const Mask& state, const Mask& query_padding_mask,
                                               const Mask& key_padding_mask, const Mask& cu_seqlens) {
  const auto grads = CausalStateBackwardFunction::apply(
      grad_out, grad_state, query, key, value, std::string(feature_map.data(), feature_map.size()), eps, clamp, state,
      query_padding_mask, key_padding_mask, cu_seqlens);
  return {grads[0], grads[1], grads[2], grads[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, Autograd, m) {
  m.impl("causal_flow_attention", TORCH_FN(causal_with_state_autograd));
  m.impl("causal_flow_attention_backward", TORCH_FN(causal_with_state_backward_autograd));
  m.impl("flow_attention", TORCH_FN(forward_autograd));
  m.impl("flow_attention_backward", TORCH_FN(backward_autograd));
}

}  // namespace flowformer::flow_attention_ops
