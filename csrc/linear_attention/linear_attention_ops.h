// The ops of the linear-attention family as the dispatcher sees them (spec/linear_attention.md),
// shared by the schema file, the backends (cpu/ and cuda/) and the Meta
// and Autograd registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <vector>

namespace flowformer::linear_attention_ops {

constexpr const char* kCausal = "flowformer::causal_linear_attention";
constexpr const char* kCausalBackward = "flowformer::causal_linear_attention_backward";
constexpr const char* kNoncausal = "flowformer::linear_attention";
constexpr const char* kNoncausalBackward = "flowformer::linear_attention_backward";

using Optional = std::optional<at::Tensor>;
using CausalResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // out, final_kv, final_z
// Gradients with respect to query, key, value, initial_kv and initial_z (the last two always defined).
using CausalGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// causal_linear_attention(query, key, value, *, feature_map, normalize, eps, initial_kv, initial_z, cu_seqlens)
CausalResult causal(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    c10::string_view feature_map, bool normalize, double eps, const Optional& initial_kv,
                    const Optional& initial_z, const Optional& cu_seqlens);

// causal_linear_attention_backward(grad_out, grad_final_kv, grad_final_z, query, key, value, *, ...):
// recomputes the forward from the inputs (nothing else is saved); undefined final-state gradients are 0.
CausalGrads causal_backward(const at::Tensor& grad_out, const Optional& grad_final_kv, const Optional& grad_final_z,
                            const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            c10::string_view feature_map, bool normalize, double eps, const Optional& initial_kv,
                            const Optional& initial_z, const Optional& cu_seqlens);

// linear_attention(query, key, value, *, feature_map, eps, key_padding_mask)
at::Tensor noncausal(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     c10::string_view feature_map, double eps, const Optional& key_padding_mask);

Grads noncausal_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                         const at::Tensor& value, c10::string_view feature_map, double eps,
                         const Optional& key_padding_mask);

// Argument checks shared by every backend and the Meta kernels (shapes and dtypes only: the values of
// cu_seqlens are checked by cu_seqlens_values, in the backends).
void check_causal_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       c10::string_view feature_map, double eps, const Optional& initial_kv,
                       const Optional& initial_z, const Optional& cu_seqlens);
void check_causal_grads(const at::Tensor& grad_out, const Optional& grad_final_kv, const Optional& grad_final_z,
                        const at::Tensor& query, const at::Tensor& value, const Optional& cu_seqlens);

void check_noncausal_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          c10::string_view feature_map, double eps, const Optional& key_padding_mask);
void check_noncausal_grad(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& value);

// The state dtype: float32, or float64 for float64 inputs.
at::ScalarType state_type(const at::Tensor& query);

}  // namespace flowformer::linear_attention_ops
