// Linear attention (Katharopoulos et al., "Transformers are RNNs", ICML 2020). The contract, with the
// math, is spec/linear_attention.md; the ops are flowformer::causal_linear_attention and
// flowformer::linear_attention.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace flowformer {

struct CausalLinearAttentionOptions {
  std::string feature_map = "elu1";       // "elu1", "relu", "sigmoid" or "identity"
  bool normalize = true;                  // divide by phi(q)^T z + eps; false: the plain causal dot product
  double eps = 1e-6;
  std::optional<at::Tensor> initial_kv;   // (B, H, D, M) state, float32 (float64 for float64 inputs); none: 0
  std::optional<at::Tensor> initial_z;    // (B, H, D) state; none: 0
};

struct CausalLinearAttentionResult {
  at::Tensor out;       // (B, H, L, M), dtype of query
  at::Tensor final_kv;  // (B, H, D, M): pass as initial_kv to continue the sequence
  at::Tensor final_z;   // (B, H, D)
};

// query, key (B, H, L, D), value (B, H, L, M). A call with L = 1 is one decoding step, O(D M) per (b, h).
CausalLinearAttentionResult causal_linear_attention(const at::Tensor& query, const at::Tensor& key,
                                                    const at::Tensor& value,
                                                    const CausalLinearAttentionOptions& options = {});

struct LinearAttentionOptions {
  std::string feature_map = "elu1";
  double eps = 1e-6;
  std::optional<at::Tensor> key_padding_mask;  // bool (B, S), true marks padding
};

// query (B, H, L, D), key (B, H, S, D), value (B, H, S, M) -> (B, H, L, M).
at::Tensor linear_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const LinearAttentionOptions& options = {});

}  // namespace flowformer
