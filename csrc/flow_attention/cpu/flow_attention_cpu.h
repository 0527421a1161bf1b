// CPU kernels of Flow-Attention. The driver (flow_attention_cpu.cpp) checks the arguments, converts
// the inputs to contiguous tensors in the accumulation type (float, or double for float64), applies
// the feature map phi and its chain rule; noncausal.cpp and causal.cpp compute the rest from the
// features q = phi(query), k = phi(key).
#pragma once

#include "common/feature_map.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace flowformer::flow_attention_cpu {

struct Params {
  double eps;
  double clamp;
  FeatureMap feature_map;
};

// One (batch, head): row pointers.
template <typename T>
struct Slice {
  const T* q;              // L x D features phi(query)
  const T* k;              // S x D features phi(key)
  const T* v;              // S x M values
  const T* query;          // L x D, before the feature map (for its chain rule)
  const T* key;            // S x D, before the feature map
  const bool* query_pad;   // L flags (true = padding) or nullptr
  const bool* key_pad;     // S flags (true = padding) or nullptr
  int64_t L, S, D, M;
};

inline bool is_valid(const bool* pad, int64_t i) {
  return pad == nullptr || !pad[i];
}

// The converted inputs of one call.
struct Features {
  at::Tensor q, k, v;              // (B, H, L, D), (B, H, S, D), (B, H, S, M), contiguous
  at::Tensor query, key;           // q and k before the feature map
  at::Tensor query_pad, key_pad;   // (B, L), (B, S) bool, or undefined
  int64_t B, H, L, S, D, M;
  Params params;

  template <typename T>
  Slice<T> slice(int64_t bh) const {
    const int64_t b = bh / H;
    return {q.const_data_ptr<T>() + bh * L * D, k.const_data_ptr<T>() + bh * S * D,
            v.const_data_ptr<T>() + bh * S * M, query.const_data_ptr<T>() + bh * L * D,
            key.const_data_ptr<T>() + bh * S * D,
            query_pad.defined() ? query_pad.const_data_ptr<bool>() + b * L : nullptr,
            key_pad.defined() ? key_pad.const_data_ptr<bool>() + b * S : nullptr, L, S, D, M};
  }

  // Calls fn(begin, end) on ranges of the B x H slices, in parallel.
  template <typename Fn>
  void for_slice_ranges(const Fn& fn) const {
    at::parallel_for(0, B * H, 1, fn);
  }
};

// Each writes every element of its outputs, given in the accumulation type: out (B, H, L, M), or the
// gradients with respect to query, key (through the feature map) and value. Padded positions get zeros.
void noncausal_forward(const Features& in, at::Tensor& out);
void noncausal_backward(const Features& in, const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k,
                        at::Tensor& grad_v);
void causal_forward(const Features& in, at::Tensor& out);
// Causal forward from the packed recurrent state `state` (BH, RecurrentState::size()), advanced in place.
void causal_forward_with_state(const Features& in, at::Tensor& out, at::Tensor& state);
void causal_backward(const Features& in, const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k,
                     at::Tensor& grad_v);

}  // namespace flowformer::flow_attention_cpu
