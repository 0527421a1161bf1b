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
  // Packed sequences: int32 or int64 (N + 1,) offsets along L (0, ..., L; non-decreasing), on the device of
  // query or on the CPU; then B == 1, sequence n is positions [cu_seqlens[n], cu_seqlens[n + 1]), each an
  // independent run, and the states (initial and final) are (N, H, D, M) and (N, H, D).
  std::optional<at::Tensor> cu_seqlens;
};

struct CausalLinearAttentionResult {
  at::Tensor out;       // (B, H, L, M), dtype of query
  at::Tensor final_kv;  // (B, H, D, M) ((N, H, D, M) with cu_seqlens): pass as initial_kv to continue
  at::Tensor final_z;   // (B, H, D) ((N, H, D) with cu_seqlens)
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
