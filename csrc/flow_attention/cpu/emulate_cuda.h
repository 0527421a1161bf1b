// Test mode of the CPU backend: with FLOWFORMER_EMULATE_CUDA=1 in the environment, flow_attention on
// CPU tensors runs the algorithm of the CUDA backend (kernels/flow_attention/flow_attention_portable.h:
// the same item functions, on host threads) instead of the CPU kernels, so that the whole test suite
// checks the CUDA algorithm on a machine without a GPU.
#pragma once

#include "flow_attention/flow_attention_ops.h"

namespace flowformer::flow_attention_cpu {

bool emulate_cuda_requested();

// The CUDA algorithm on CPU tensors; arguments already checked.
at::Tensor emulated_forward(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            bool causal, c10::string_view feature_map, double eps, double clamp,
                            const flow_attention_ops::Mask& query_padding_mask,
                            const flow_attention_ops::Mask& key_padding_mask);
flow_attention_ops::Grads emulated_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& query,
                                            const at::Tensor& key, const at::Tensor& value, bool causal,
                                            c10::string_view feature_map, double eps, double clamp,
                                            const flow_attention_ops::Mask& query_padding_mask,
                                            const flow_attention_ops::Mask& key_padding_mask);

}  // namespace flowformer::flow_attention_cpu
