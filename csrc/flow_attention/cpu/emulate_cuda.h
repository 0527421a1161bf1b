// flow_attention's CUDA algorithm (flow_attention/flow_attention_portable.h) on CPU tensors,
// run by the CPU backend when emulate_cuda_requested() (common/emulate_cuda.h).
#pragma once

#include "common/emulate_cuda.h"
#include "flow_attention/flow_attention_ops.h"

namespace flowformer::flow_attention_cpu {

// Arguments already checked.
at::Tensor emulated_forward(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            bool causal, c10::string_view feature_map, double eps, double clamp,
                            const flow_attention_ops::Mask& query_padding_mask,
                            const flow_attention_ops::Mask& key_padding_mask);
flow_attention_ops::Grads emulated_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& query,
                                            const at::Tensor& key, const at::Tensor& value, bool causal,
                                            c10::string_view feature_map, double eps, double clamp,
                                            const flow_attention_ops::Mask& query_padding_mask,
                                            const flow_attention_ops::Mask& key_padding_mask);

// Packed sequences (cu_seqlens) in one launch of the fused kernel where it takes the call, else one call a
// sequence (flow_attention_ops::causal_with_state_packed).
std::tuple<at::Tensor, at::Tensor> emulated_forward_with_state(
    const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    c10::string_view feature_map, double eps, double clamp, const flow_attention_ops::Mask& state,
    const flow_attention_ops::Mask& query_padding_mask, const flow_attention_ops::Mask& key_padding_mask,
    const flow_attention_ops::Mask& cu_seqlens);

// The gradients of causal_flow_attention by the CUDA backend's algorithm: the fused passes where they take the
// call (packed sequences in one launch each), else the packed sequences one call a sequence, else the item kernels.
flow_attention_ops::StateGrads emulated_backward_with_state(
    const at::Tensor& grad_out, const flow_attention_ops::Mask& grad_state, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, c10::string_view feature_map, double eps, double clamp,
    const flow_attention_ops::Mask& state, const flow_attention_ops::Mask& query_padding_mask,
    const flow_attention_ops::Mask& key_padding_mask, const flow_attention_ops::Mask& cu_seqlens);

// The gradients of causal_flow_attention by the CUDA algorithm: its item kernels in the SIMT emulator
// (emulated), or run on the host (HostExecutor: the CPU backend's implementation of this op).
flow_attention_ops::StateGrads portable_backward_with_state(
    bool emulated, const at::Tensor& grad_out, const flow_attention_ops::Mask& grad_state, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, c10::string_view feature_map, double eps, double clamp,
    const flow_attention_ops::Mask& state, const flow_attention_ops::Mask& query_padding_mask,
    const flow_attention_ops::Mask& key_padding_mask);

}  // namespace flowformer::flow_attention_cpu
