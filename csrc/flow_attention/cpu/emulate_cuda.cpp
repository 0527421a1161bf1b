#include "flow_attention/cpu/emulate_cuda.h"

#include "flow_attention/flow_attention_portable.h"

#include "common/host_executor.h"
#include "common/emulated_executor.h"  // last: simt.h defines CUDA names as macros

namespace flowformer::flow_attention_cpu {

at::Tensor emulated_forward(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            bool causal, c10::string_view feature_map, double eps, double clamp,
                            const flow_attention_ops::Mask& query_padding_mask,
                            const flow_attention_ops::Mask& key_padding_mask) {
  const auto problem = flow_attention_portable::make_problem(op, query, key, value, causal, feature_map, eps, clamp,
                                                             query_padding_mask, key_padding_mask);
  return flow_attention_portable::forward(portable::EmulatedExecutor{}, problem);
}

flow_attention_ops::Grads emulated_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& query,
                                            const at::Tensor& key, const at::Tensor& value, bool causal,
                                            c10::string_view feature_map, double eps, double clamp,
                                            const flow_attention_ops::Mask& query_padding_mask,
                                            const flow_attention_ops::Mask& key_padding_mask) {
  const auto problem = flow_attention_portable::make_problem(op, query, key, value, causal, feature_map, eps, clamp,
                                                             query_padding_mask, key_padding_mask);
  return flow_attention_portable::backward(portable::EmulatedExecutor{}, problem, grad_out);
}

std::tuple<at::Tensor, at::Tensor> emulated_forward_with_state(
    const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    c10::string_view feature_map, double eps, double clamp, const flow_attention_ops::Mask& state,
    const flow_attention_ops::Mask& query_padding_mask, const flow_attention_ops::Mask& key_padding_mask) {
  const auto problem = flow_attention_portable::make_problem(op, query, key, value, true, feature_map, eps, clamp,
                                                             query_padding_mask, key_padding_mask);
  auto [out, final_state] = flow_attention_portable::forward_with_state(portable::EmulatedExecutor{}, problem,
                                                                       state.value_or(at::Tensor()));
  return {out, final_state};
}

flow_attention_ops::StateGrads portable_backward_with_state(
    bool emulated, const at::Tensor& grad_out, const flow_attention_ops::Mask& grad_state, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, c10::string_view feature_map, double eps, double clamp,
    const flow_attention_ops::Mask& state, const flow_attention_ops::Mask& query_padding_mask,
    const flow_attention_ops::Mask& key_padding_mask) {
  const auto problem = flow_attention_portable::make_problem(flow_attention_ops::kCausalStateBackward, query, key,
                                                             value, true, feature_map, eps, clamp, query_padding_mask,
                                                             key_padding_mask);
  if (emulated) {
    return flow_attention_portable::backward_with_state(portable::EmulatedExecutor{}, problem, grad_out, state,
                                                        grad_state);
  }
  return flow_attention_portable::backward_with_state(portable::HostExecutor{}, problem, grad_out, state, grad_state);
}

}  // namespace flowformer::flow_attention_cpu
