// The feature maps phi applied to queries and keys before any linear-attention product:
//   sigmoid:  phi(x) = 1 / (1 + exp(-x))        phi'(x) = phi(x) (1 - phi(x))
//   elu1:     phi(x) = elu(x) + 1               phi'(x) = 1 if x > 0 else exp(x) = phi(x)
//   relu:     phi(x) = max(x, 0)                phi'(x) = 1 if x > 0 else 0
//   identity: phi(x) = x (inputs are features)  phi'(x) = 1
// phi is applied as a whole-tensor ATen op (vectorised, parallel) in the accumulation type, so elu1 of
// a bf16 input never underflows to 0; its chain rule is applied row by row inside the kernels.
#pragma once

#include "common/feature_map_kind.h"

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace flowformer {

// Parses "sigmoid", "elu1", "relu" or "identity"; anything else is an error naming `op`.
FeatureMap parse_feature_map(const char* op, c10::string_view name);

// phi(x), elementwise.
at::Tensor apply_feature_map(FeatureMap f, const at::Tensor& x);

// grad * phi'(x), elementwise, given fx = phi(x).
at::Tensor apply_feature_map_backward(FeatureMap f, const at::Tensor& x, const at::Tensor& fx,
                                      const at::Tensor& grad);

// grad[i] *= phi'(x[i]) for a row of n values, given fx = phi(x): the chain rule through the map.
template <typename T>
inline void feature_map_backward_row(FeatureMap f, int64_t n, const T* x, const T* fx, T* grad) {
  switch (f) {
    case FeatureMap::Sigmoid:
      for (int64_t i = 0; i < n; ++i) {
        grad[i] *= fx[i] * (T(1) - fx[i]);
      }
      return;
    case FeatureMap::Elu1:
      for (int64_t i = 0; i < n; ++i) {
        grad[i] *= x[i] > T(0) ? T(1) : fx[i];
      }
      return;
    case FeatureMap::Relu:
      for (int64_t i = 0; i < n; ++i) {
        grad[i] = x[i] > T(0) ? grad[i] : T(0);
      }
      return;
    case FeatureMap::Identity:
      return;
  }
}

}  // namespace flowformer
