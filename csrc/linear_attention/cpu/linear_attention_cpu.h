// CPU kernels of linear attention. The driver (linear_attention_cpu.cpp) checks the arguments and
// converts the inputs to contiguous tensors in the accumulation type (float, or double for float64),
// with the feature map applied; causal.cpp scans, noncausal.cpp uses batched matrix products.
#pragma once

#include "common/feature_map.h"

#include <ATen/core/Tensor.h>

#include <vector>

namespace flowformer::linear_attention_cpu {

// The converted inputs of one call: features q = phi(query), k = phi(key), values v, all contiguous.
struct Inputs {
  at::Tensor q, k, v;
  at::Tensor query, key;  // before the feature map (for its chain rule)
  FeatureMap feature_map;
  double eps;
};

// The independent sequences of a causal call, each scanned per head from its own state (N, H, ...): the
// B batch elements of length L, or with cu_seqlens (B == 1) the N sequences [cu[n], cu[n + 1]) packed
// along L. Positions are rows of the contiguous (B, H, L) inputs.
struct Sequences {
  int64_t count, heads, length;  // N (B without cu_seqlens), H, L
  std::vector<int64_t> cu;       // the N + 1 checked offsets, or empty: not packed

  int64_t size(int64_t n) const { return cu.empty() ? length : cu[n + 1] - cu[n]; }
  // The row of the first position of sequence n in head h.
  int64_t first_row(int64_t n, int64_t h) const {
    return cu.empty() ? (n * heads + h) * length : h * length + cu[n];
  }
};

// Each writes every element of its outputs (given in the accumulation type, contiguous).
// Causal: kv and z hold the initial states on entry and the final states on exit.
void causal_forward(const Inputs& in, const Sequences& seqs, bool normalize, at::Tensor& out, at::Tensor& kv,
                    at::Tensor& z);
// grad_kv, grad_z hold the gradients of the final states on entry (zeros if none) and those of the
// initial states on exit; kv0, z0 are the initial states.
void causal_backward(const Inputs& in, const Sequences& seqs, bool normalize, const at::Tensor& kv0,
                     const at::Tensor& z0, const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k,
                     at::Tensor& grad_v, at::Tensor& grad_kv, at::Tensor& grad_z);

// Non-causal: the same inputs in any strides, and the valid keys (B, 1, S, 1) as 0/1 (undefined: all).
struct NoncausalInputs : Inputs {
  at::Tensor key_valid;
};
at::Tensor noncausal_forward(const NoncausalInputs& in);
std::tuple<at::Tensor, at::Tensor, at::Tensor> noncausal_backward(const NoncausalInputs& in,
                                                                  const at::Tensor& grad_out);

}  // namespace flowformer::linear_attention_cpu
