// Flow-Attention (Wu et al., "Flowformer: Linearizing Transformers with Conservation Flows", ICML 2022).
// The contract, with the math, is spec/flow_attention.md; the op is flowformer::flow_attention.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace flowformer {

struct FlowAttentionOptions {
  bool causal = false;                            // causal mode (requires L == S)
  std::string feature_map = "sigmoid";            // "sigmoid", "elu1", "relu" or "identity"
  double eps = 1e-6;                              // added to both operands of each normaliser
  double clamp = 1.0;                             // |conserved source| bound; infinity disables it
  std::optional<at::Tensor> query_padding_mask;   // bool (B, L), true marks padding
  std::optional<at::Tensor> key_padding_mask;     // bool (B, S), true marks padding
};

// query (B, H, L, D), key (B, H, S, D), value (B, H, S, M) -> (B, H, L, M) in the dtype of query.
// Goes through the dispatcher: CPU and CUDA tensors, autograd and torch.compile all work.
at::Tensor flow_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const FlowAttentionOptions& options = {});

}  // namespace flowformer
