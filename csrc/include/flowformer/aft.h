// The Attention Free Transformer (Zhai et al., arXiv 2105.14103). The contract, with the math, is
// spec/aft.md; the ops are flowformer::aft_full, flowformer::aft_simple and flowformer::aft_conv.
#pragma once

#include <ATen/core/Tensor.h>

namespace flowformer {

struct AftFullOptions {
  bool causal = false;  // sums over t' <= t only (requires L == S)
  int64_t window = 0;   // 0: AFT-full; s > 0: AFT-local (bias 0 outside |t - t'| < s)
};

// query (B, L, C), key and value (B, S, C), pos_bias (L, S) -> (B, L, C) in the dtype of query.
at::Tensor aft_full(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& pos_bias, const AftFullOptions& options = {});

// AFT-simple: a softmax over positions per channel (no position bias); causal: a running recurrence.
at::Tensor aft_simple(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal = false);

// AFT-conv: query, key, value (B, Hi, Wi, C) image tokens (channels last), weight (heads, s, s) with s
// odd and C divisible by heads (head h: the h-th block of C / heads channels). AFT-local on the grid with
// the per-head relative bias: p' = p + (dy, dx) in the s x s neighbourhood uses weight[h][dy + s/2][dx + s/2].
at::Tensor aft_conv(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& weight);

}  // namespace flowformer
