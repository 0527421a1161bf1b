// The feature maps phi of the linear-attention ops, as an enum that host and device code share.
#pragma once

namespace flowformer {

enum class FeatureMap { Sigmoid, Elu1, Relu, Identity };

}  // namespace flowformer
