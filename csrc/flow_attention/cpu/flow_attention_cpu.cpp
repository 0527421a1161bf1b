// CPU backend of flowformer::flow_attention and its backward: checks the arguments, converts the inputs
// to contiguous rows in the accumulation type (float32, or float64 for float64), applies the feature
// map, allocates the outputs, and hands the rest to noncausal.cpp or causal.cpp.
#include "flow_attention/cpu/flow_attention_cpu.h"

#include "flow_attention/cpu/emulate_cuda.h"

#include "common/checks.h"
#include "common/feature_map.h"
#include "flow_attention/flow_attention_ops.h"
#include "flow_attention/state_layout.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace flowformer::flow_attention_cpu {
namespace {

using flow_attention_ops::Mask;

// The inputs converted (contiguous, accumulation type), with their features.
Features convert(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 c10::string_view feature_map_name, double eps, double clamp, const Mask& query_padding_mask,
                 const Mask& key_padding_mask) {
  Features f;
  f.params = Params{eps, clamp, parse_feature_map(op, feature_map_name)};
  const auto acc = accumulate_type(q.scalar_type());
  f.query = q.to(acc).contiguous();
  f.key = k.to(acc).contiguous();
  f.q = apply_feature_map(f.params.feature_map, f.query).contiguous();
  f.k = apply_feature_map(f.params.feature_map, f.key).contiguous();
  f.v = v.to(acc).contiguous();
  if (query_padding_mask.has_value()) {
    f.query_pad = query_padding_mask->contiguous();
  }
  if (key_padding_mask.has_value()) {
    f.key_pad = key_padding_mask->contiguous();
  }
  f.B = q.size(0);
  f.H = q.size(1);
  f.L = q.size(2);
  f.S = k.size(2);
  f.D = q.size(3);
  f.M = v.size(3);
  return f;
}

at::Tensor forward_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal,
                       c10::string_view feature_map, double eps, double clamp, const Mask& query_padding_mask,
                       const Mask& key_padding_mask) {
  const char* op = flow_attention_ops::kForward;
  flow_attention_ops::check_args(op, query, key, value, causal, feature_map, eps, clamp, query_padding_mask,
                                 key_padding_mask);
  if (emulate_cuda_requested()) {
    return emulated_forward(op, query, key, value, causal, feature_map, eps, clamp, query_padding_mask,
                            key_padding_mask);
  }
  const Features f = convert(op, query, key, value, feature_map, eps, clamp, query_padding_mask, key_padding_mask);
  at::Tensor out = new_output({f.B, f.H, f.L, f.M}, f.v.options());
  if (out.numel() > 0) {
    causal ? causal_forward(f, out) : noncausal_forward(f, out);
  }
  return out.to(query.scalar_type());
}

flow_attention_ops::Grads backward_cpu(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                       const at::Tensor& value, bool causal, c10::string_view feature_map,
                                       double eps, double clamp, const Mask& query_padding_mask,
                                       const Mask& key_padding_mask) {
  const char* op = flow_attention_ops::kBackward;
  flow_attention_ops::check_args(op, query, key, value, causal, feature_map, eps, clamp, query_padding_mask,
                                 key_padding_mask);
  flow_attention_ops::check_grad_out(grad_out, query, value);
  if (emulate_cuda_requested()) {
    return emulated_backward(op, grad_out, query, key, value, causal, feature_map, eps, clamp, query_padding_mask,
                             key_padding_mask);
  }
  const Features f = convert(op, query, key, value, feature_map, eps, clamp, query_padding_mask, key_padding_mask);
  const at::Tensor dout = grad_out.to(f.v.scalar_type()).contiguous();
  at::Tensor dq = new_output(f.q.sym_sizes(), f.q.options());
  at::Tensor dk = new_output(f.k.sym_sizes(), f.k.options());
  at::Tensor dv = new_output(f.v.sym_sizes(), f.v.options());
  if (f.B * f.H > 0) {
    causal ? causal_backward(f, dout, dq, dk, dv) : noncausal_backward(f, dout, dq, dk, dv);
  }
  return {dq.to(query.scalar_type()), dk.to(key.scalar_type()), dv.to(value.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> causal_with_state_cpu(const at::Tensor& query, const at::Tensor& key,
                                                         const at::Tensor& value, c10::string_view feature_map,
                                                         double eps, double clamp, const Mask& state,
                                                         const Mask& query_padding_mask, const Mask& key_padding_mask,
                                                         const Mask& cu_seqlens) {
  const char* op = flow_attention_ops::kCausalState;
  flow_attention_ops::check_state_args(query, key, value, feature_map, eps, clamp, state, query_padding_mask,
                                       key_padding_mask, cu_seqlens);
  if (emulate_cuda_requested()) {
    return emulated_forward_with_state(op, query, key, value, feature_map, eps, clamp, state, query_padding_mask,
                                       key_padding_mask, cu_seqlens);
  }
  if (cu_seqlens.has_value()) {
    return flow_attention_ops::causal_with_state_packed(query, key, value, feature_map, eps, clamp, state,
                                                        query_padding_mask, key_padding_mask, *cu_seqlens);
  }
  const Features f = convert(op, query, key, value, feature_map, eps, clamp, query_padding_mask, key_padding_mask);
  const int64_t size = RecurrentState{f.D, f.M}.size();
  at::Tensor packed = state.has_value() ? state->clone(at::MemoryFormat::Contiguous)
                                        : at::zeros({f.B, f.H, size}, f.v.options());
  at::Tensor out = new_output({f.B, f.H, f.L, f.M}, f.v.options());
  causal_forward_with_state(f, out, packed);
  return {out.to(query.scalar_type()), packed};
}

// The CUDA backend's algorithm in the emulator (FLOWFORMER_EMULATE_CUDA=1), else the portable one on the host: the
// scan of causal.cpp has no backward from a state.
flow_attention_ops::StateGrads causal_with_state_backward_cpu(
    const at::Tensor& grad_out, const Mask& grad_state, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, c10::string_view feature_map, double eps, double clamp, const Mask& state,
    const Mask& query_padding_mask, const Mask& key_padding_mask, const Mask& cu_seqlens) {
  flow_attention_ops::check_state_backward_args(grad_out, grad_state, query, key, value, feature_map, eps, clamp,
                                                state, query_padding_mask, key_padding_mask, cu_seqlens);
  if (emulate_cuda_requested()) {
    return emulated_backward_with_state(grad_out, grad_state, query, key, value, feature_map, eps, clamp, state,
                                        query_padding_mask, key_padding_mask, cu_seqlens);
  }
  if (cu_seqlens.has_value()) {
    return flow_attention_ops::causal_with_state_backward_packed(grad_out, grad_state, query, key, value, feature_map,
                                                                 eps, clamp, state, query_padding_mask,
                                                                 key_padding_mask, *cu_seqlens);
  }
  return portable_backward_with_state(false, grad_out, grad_state, query, key, value, feature_map, eps, clamp, state,
                                      query_padding_mask, key_padding_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(flowformer, CPU, m) {
  m.impl("causal_flow_attention_backward", TORCH_FN(causal_with_state_backward_cpu));
  m.impl("causal_flow_attention", TORCH_FN(causal_with_state_cpu));
  m.impl("flow_attention", TORCH_FN(forward_cpu));
  m.impl("flow_attention_backward", TORCH_FN(backward_cpu));
}

}  // namespace flowformer::flow_attention_cpu
