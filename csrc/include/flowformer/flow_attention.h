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

struct CausalFlowAttentionOptions {
  std::string feature_map = "sigmoid";
  double eps = 1e-6;
  double clamp = 1.0;
  // (B, H, 3 + 4 D + D M) recurrent state in the accumulation type (float32, float64 for float64 inputs),
  // laid out [n, m, E, sum k, sum q, sum O k, sum I q, sum k (c v)^T]; none: the empty prefix.
  std::optional<at::Tensor> state;
  std::optional<at::Tensor> query_padding_mask;   // a position is skipped if either mask marks it
  std::optional<at::Tensor> key_padding_mask;
  // Packed sequences: int32 or int64 (N + 1,) offsets [0, ..., L] on the device of query or on the CPU; then
  // B == 1, sequence n is positions [cu_seqlens[n], cu_seqlens[n + 1]), each a run of its own from row n of
  // state ((N, H, 3 + 4 D + D M); none: the empty prefix), and the returned state has a row per sequence.
  std::optional<at::Tensor> cu_seqlens;
};

struct CausalFlowAttentionResult {
  at::Tensor out;    // (B, H, L, M)
  at::Tensor state;  // the state after the last position ((N, H, ...) with cu_seqlens): pass it to continue
};

// Causal Flow-Attention carrying its recurrent state: running a sequence in pieces equals one run of
// flow_attention(causal = true), and an L = 1 call costs O(D M) per (b, h). For inference: no gradient.
CausalFlowAttentionResult causal_flow_attention(const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& value,
                                                const CausalFlowAttentionOptions& options = {});

}  // namespace flowformer
