// The two ops of the Flow-Attention family as the dispatcher sees them, shared by the schema file,
// the backends (cpu/ and cuda/) and the Meta and Autograd registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <vector>

namespace flowformer::flow_attention_ops {

constexpr const char* kForward = "flowformer::flow_attention";
constexpr const char* kBackward = "flowformer::flow_attention_backward";
constexpr const char* kCausalState = "flowformer::causal_flow_attention";
constexpr const char* kCausalStateBackward = "flowformer::causal_flow_attention_backward";

using Mask = std::optional<at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// flow_attention(query, key, value, *, causal, feature_map, eps, clamp, query_padding_mask, key_padding_mask)
at::Tensor forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal,
                   c10::string_view feature_map, double eps, double clamp, const Mask& query_padding_mask,
                   const Mask& key_padding_mask);

// flow_attention_backward(grad_out, query, key, value, *, ...) -> (grad_query, grad_key, grad_value).
// Recomputes the per-position scalars from the inputs: nothing but the inputs is saved by the forward.
Grads backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
               bool causal, c10::string_view feature_map, double eps, double clamp, const Mask& query_padding_mask,
               const Mask& key_padding_mask);

// causal_flow_attention(query, key, value, *, feature_map, eps, clamp, state, query_padding_mask,
// key_padding_mask, cu_seqlens) -> (out, final_state): the causal mode from a recurrent state
// (state_layout.h), for decoding step by step and for sequences split into pieces or across processes.
// cu_seqlens: packed sequences (B == 1), each from its own row of state, (N, H, 3 + 4 D + D M).
std::tuple<at::Tensor, at::Tensor> causal_with_state(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value, c10::string_view feature_map,
                                                     double eps, double clamp, const Mask& state,
                                                     const Mask& query_padding_mask, const Mask& key_padding_mask,
                                                     const Mask& cu_seqlens);
// causal_flow_attention_backward(grad_out, grad_state, query, key, value, *, feature_map, eps, clamp, state,
// query_padding_mask, key_padding_mask, cu_seqlens) -> (grad_query, grad_key, grad_value, grad_state_in): the
// gradients given those of out and of the final state (None: zeros); grad_state_in is that of the incoming
// state (zeros for its count n; of a zero state where state is None).
using StateGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
StateGrads causal_with_state_backward(const at::Tensor& grad_out, const Mask& grad_state, const at::Tensor& query,
                                      const at::Tensor& key, const at::Tensor& value, c10::string_view feature_map,
                                      double eps, double clamp, const Mask& state, const Mask& query_padding_mask,
                                      const Mask& key_padding_mask, const Mask& cu_seqlens);

// Packed sequences (cu_seqlens given; every argument already checked): causal_flow_attention and its
// backward on each sequence alone, from its row of the state, through the dispatcher (the backend of the
// inputs), the results put back in place. One call a sequence: the backends' packed path until fused
// Flow-Attention kernels take sequences of their own.
std::tuple<at::Tensor, at::Tensor> causal_with_state_packed(const at::Tensor& query, const at::Tensor& key,
                                                            const at::Tensor& value, c10::string_view feature_map,
                                                            double eps, double clamp, const Mask& state,
                                                            const Mask& query_padding_mask,
                                                            const Mask& key_padding_mask, const at::Tensor& cu_seqlens);
StateGrads causal_with_state_backward_packed(const at::Tensor& grad_out, const Mask& grad_state,
                                             const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                             c10::string_view feature_map, double eps, double clamp,
                                             const Mask& state, const Mask& query_padding_mask,
                                             const Mask& key_padding_mask, const at::Tensor& cu_seqlens);

// Argument checks shared by every backend and the Meta kernels; `op` is kForward or kBackward.
void check_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                bool causal, c10::string_view feature_map, double eps, double clamp,
                const Mask& query_padding_mask, const Mask& key_padding_mask);
// The checks of causal_flow_attention's and causal_flow_attention_backward's arguments (every backend and
// the Meta kernels; shapes and dtypes: the values of cu_seqlens are checked where they are read).
void check_state_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                      c10::string_view feature_map, double eps, double clamp, const Mask& state,
                      const Mask& query_padding_mask, const Mask& key_padding_mask, const Mask& cu_seqlens);
void check_state_backward_args(const at::Tensor& grad_out, const Mask& grad_state, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, c10::string_view feature_map,
                               double eps, double clamp, const Mask& state, const Mask& query_padding_mask,
                               const Mask& key_padding_mask, const Mask& cu_seqlens);
// The shape of the packed state: (N, H, 3 + 4 D + D M), N the batch size or the number of packed sequences.
std::vector<c10::SymInt> state_shape(const at::Tensor& query, const at::Tensor& value, const Mask& cu_seqlens);
void check_grad_out(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& value);

}  // namespace flowformer::flow_attention_ops
