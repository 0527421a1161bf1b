// The feature maps phi applied to queries and keys before any linear-attention product:
//   sigmoid:  phi(x) = 1 / (1 + exp(-x))        phi'(x) = phi(x) (1 - phi(x))
//   elu1:     phi(x) = elu(x) + 1               phi'(x) = 1 if x > 0 else exp(x)
//   relu:     phi(x) = max(x, 0)                phi'(x) = 1 if x > 0 else 0
//   identity: phi(x) = x (inputs are features)  phi'(x) = 1
// Evaluated in the accumulation type (float32 for half inputs, so elu1 of a bf16 never underflows).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <cmath>

namespace flowformer {

enum class FeatureMap { Sigmoid, Elu1, Relu, Identity };

// Parses "sigmoid", "elu1", "relu" or "identity"; anything else is an error naming `op`.
FeatureMap parse_feature_map(const char* op, c10::string_view name);

template <typename T>
C10_HOST_DEVICE inline T apply_feature_map(FeatureMap f, T x) {
  switch (f) {
    case FeatureMap::Sigmoid:
      return T(1) / (T(1) + ::exp(-x));
    case FeatureMap::Elu1:
      return x > T(0) ? x + T(1) : ::exp(x);
    case FeatureMap::Relu:
      return x > T(0) ? x : T(0);
    case FeatureMap::Identity:
      break;
  }
  return x;
}

template <typename T>
C10_HOST_DEVICE inline T feature_map_derivative(FeatureMap f, T x) {
  switch (f) {
    case FeatureMap::Sigmoid: {
      const T s = T(1) / (T(1) + ::exp(-x));
      return s * (T(1) - s);
    }
    case FeatureMap::Elu1:
      return x > T(0) ? T(1) : ::exp(x);
    case FeatureMap::Relu:
      return x > T(0) ? T(1) : T(0);
    case FeatureMap::Identity:
      break;
  }
  return T(1);
}

}  // namespace flowformer
