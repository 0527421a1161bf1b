// The AFT ops as the dispatcher sees them (spec/aft.md), shared by the schema file, the backends
// (cpu/ and cuda/) and the Meta and Autograd registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace flowformer::aft_ops {

constexpr const char* kFull = "flowformer::aft_full";
constexpr const char* kFullForward = "flowformer::aft_full_forward";
constexpr const char* kFullBackward = "flowformer::aft_full_backward";
constexpr const char* kSimple = "flowformer::aft_simple";
constexpr const char* kSimpleBackward = "flowformer::aft_simple_backward";
constexpr const char* kConv = "flowformer::aft_conv";
constexpr const char* kConvBackward = "flowformer::aft_conv_backward";

using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // query, key, value, pos_bias
using FullOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;          // out, y, lse

at::Tensor full(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& pos_bias,
                bool causal, int64_t window);
// aft_full and what its backward needs (in the accumulation type, (B, L, C)): y, the softmax average
// before the gate, and lse, the log of its denominator sum_t' exp(k_t' + w'_{t,t'}).
FullOutputs full_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& pos_bias, bool causal, int64_t window);
Grads4 full_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                     const at::Tensor& value, const at::Tensor& pos_bias, const at::Tensor& y, const at::Tensor& lse,
                     bool causal, int64_t window);
at::Tensor simple(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal);
Grads3 simple_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                       const at::Tensor& value, bool causal);

at::Tensor conv(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& weight);
Grads4 conv_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                     const at::Tensor& value, const at::Tensor& weight);  // query, key, value, weight

// Argument checks shared by every backend and the Meta kernels.
void check_full_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const at::Tensor& pos_bias, bool causal, int64_t window);
void check_simple_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       bool causal);
void check_conv_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const at::Tensor& weight);
void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& query);
void check_full_stats(const char* op, const at::Tensor& y, const at::Tensor& lse, const at::Tensor& query);

}  // namespace flowformer::aft_ops
