// CPU kernels of Flow-Attention, one (batch, head) slice at a time. Inputs are contiguous rows in the
// accumulation type T (float or double); the driver (flow_attention_cpu.cpp) converts and parallelises.
#pragma once

#include "common/feature_map.h"

#include <cstdint>

namespace flowformer::flow_attention_cpu {

template <typename T>
struct Slice {
  const T* query;          // L x D, before the feature map
  const T* key;            // S x D, before the feature map
  const T* value;          // S x M
  const bool* query_pad;   // L flags (true = padding) or nullptr
  const bool* key_pad;     // S flags (true = padding) or nullptr
  int64_t L, S, D, M;
};

struct Params {
  FeatureMap feature_map;
  double eps;
  double clamp;
};

inline bool is_valid(const bool* pad, int64_t i) {
  return pad == nullptr || !pad[i];
}

// phi(row) for a row of n values.
template <typename T>
void featurize(FeatureMap f, int64_t n, const T* row, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = apply_feature_map(f, row[i]);
  }
}

// grad (n values) *= phi'(row): the chain rule through the feature map.
template <typename T>
void chain_feature_map(FeatureMap f, int64_t n, const T* row, T* grad) {
  for (int64_t i = 0; i < n; ++i) {
    grad[i] *= feature_map_derivative(f, row[i]);
  }
}

// Every function writes every element of its outputs (zeros at padded positions).
template <typename T>
void noncausal_forward(const Slice<T>& in, const Params& p, T* out);
template <typename T>
void noncausal_backward(const Slice<T>& in, const Params& p, const T* grad_out, T* grad_query, T* grad_key,
                        T* grad_value);
template <typename T>
void causal_forward(const Slice<T>& in, const Params& p, T* out);
template <typename T>
void causal_backward(const Slice<T>& in, const Params& p, const T* grad_out, T* grad_query, T* grad_key,
                     T* grad_value);

}  // namespace flowformer::flow_attention_cpu
