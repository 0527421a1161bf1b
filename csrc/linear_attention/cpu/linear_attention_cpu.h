// CPU kernels of linear attention. The driver (linear_attention_cpu.cpp) checks the arguments and
// converts the inputs to contiguous tensors in the accumulation type (float, or double for float64),
// with the feature map applied; causal.cpp scans, noncausal.cpp uses batched matrix products.
#pragma once

#include "common/feature_map.h"

#include <ATen/core/Tensor.h>

namespace flowformer::linear_attention_cpu {

// The converted inputs of one call: features q = phi(query), k = phi(key), values v, all contiguous.
struct Inputs {
  at::Tensor q, k, v;
  at::Tensor query, key;  // before the feature map (for its chain rule)
  FeatureMap feature_map;
  double eps;
};

// Each writes every element of its outputs (given in the accumulation type, contiguous).
// Causal: kv and z hold the initial state on entry and the final state on exit.
void causal_forward(const Inputs& in, bool normalize, at::Tensor& out, at::Tensor& kv, at::Tensor& z);
// grad_kv, grad_z hold the gradients of the final state on entry (zeros if none) and those of the
// initial state on exit; kv0, z0 are the initial state.
void causal_backward(const Inputs& in, bool normalize, const at::Tensor& kv0, const at::Tensor& z0,
                     const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                     at::Tensor& grad_kv, at::Tensor& grad_z);

// Non-causal: the same inputs in any strides, and the valid keys (B, 1, S, 1) as 0/1 (undefined: all).
struct NoncausalInputs : Inputs {
  at::Tensor key_valid;
};
at::Tensor noncausal_forward(const NoncausalInputs& in);
std::tuple<at::Tensor, at::Tensor, at::Tensor> noncausal_backward(const NoncausalInputs& in,
                                                                  const at::Tensor& grad_out);

}  // namespace flowformer::linear_attention_cpu
