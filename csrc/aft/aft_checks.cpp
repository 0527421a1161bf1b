#include "aft/aft_ops.h"

#include "common/checks.h"

#include <c10/util/Exception.h>

namespace flowformer::aft_ops {
namespace {

void check_qkv(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, bool causal) {
  check_rank(op, "query", query, 3, "(B, L, C)");
  check_rank(op, "key", key, 3, "(B, S, C)");
  check_rank(op, "value", value, 3, "(B, S, C)");
  check_floating(op, "query", query);
  check_like(op, "key", key, "query", query);
  check_like(op, "value", value, "query", query);
  check_size(op, "key", key, 0, query.sym_size(0), "batch size B", "as query");
  check_size(op, "value", value, 0, query.sym_size(0), "batch size B", "as query");
  check_size(op, "key", key, 2, query.sym_size(2), "channels C", "as query");
  check_size(op, "value", value, 2, query.sym_size(2), "channels C", "as query");
  check_size(op, "value", value, 1, key.sym_size(1), "length S", "as key");
  if (causal) {
    TORCH_CHECK(query.sym_size(1) == key.sym_size(1), op, ": causal=True requires query and key of the same ",
                "length (L == S), got L = ", query.sym_size(1), " and S = ", key.sym_size(1));
  }
}

}  // namespace

void check_full_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const at::Tensor& pos_bias, bool causal, int64_t window) {
  check_qkv(op, query, key, value, causal);
  check_rank(op, "pos_bias", pos_bias, 2, "(L, S)");
  check_floating(op, "pos_bias", pos_bias);
  TORCH_CHECK(pos_bias.device() == query.device(), op, ": pos_bias must be on the device of query (",
              query.device(), "), got ", pos_bias.device());
  check_size(op, "pos_bias", pos_bias, 0, query.sym_size(1), "length L", "as query");
  check_size(op, "pos_bias", pos_bias, 1, key.sym_size(1), "length S", "as key");
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0: AFT-full, s > 0: AFT-local), got ", window);
}

void check_simple_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       bool causal) {
  check_qkv(op, query, key, value, causal);
}

void check_conv_args(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const at::Tensor& weight) {
  check_rank(op, "query", query, 4, "(B, Hi, Wi, C)");
  check_rank(op, "key", key, 4, "(B, Hi, Wi, C)");
  check_rank(op, "value", value, 4, "(B, Hi, Wi, C)");
  check_floating(op, "query", query);
  check_like(op, "key", key, "query", query);
  check_like(op, "value", value, "query", query);
  TORCH_CHECK(key.sym_sizes().equals(query.sym_sizes()) && value.sym_sizes().equals(query.sym_sizes()), op,
              ": query, key and value must have the same shape (B, Hi, Wi, C), got ", query.sym_sizes(), ", ",
              key.sym_sizes(), " and ", value.sym_sizes());
  check_rank(op, "weight", weight, 3, "(heads, s, s)");
  check_floating(op, "weight", weight);
  TORCH_CHECK(weight.device() == query.device(), op, ": weight must be on the device of query (", query.device(),
              "), got ", weight.device());
  TORCH_CHECK(weight.sym_size(1) == weight.sym_size(2) && weight.sym_size(1) % 2 == 1, op,
              ": weight must be (heads, s, s) with an odd kernel size s, got shape ", weight.sym_sizes());
  TORCH_CHECK(weight.sym_size(0) > 0 && query.sym_size(3) % weight.sym_size(0) == 0, op,
              ": the channels C = ", query.sym_size(3), " must be divisible by heads = ", weight.sym_size(0));
}

void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& query) {
  check_rank(op, "grad_out", grad_out, query.dim(), query.dim() == 3 ? "(B, L, C)" : "(B, Hi, Wi, C)");
  check_floating(op, "grad_out", grad_out);
  TORCH_CHECK(grad_out.device() == query.device(), op, ": grad_out must be on the device of query (",
              query.device(), "), got ", grad_out.device());
  TORCH_CHECK(grad_out.sym_sizes().equals(query.sym_sizes()), op, ": grad_out must have the shape of query (",
              query.sym_sizes(), "), got ", grad_out.sym_sizes());
}

void check_full_stats(const char* op, const at::Tensor& y, const at::Tensor& lse, const at::Tensor& query) {
  const at::ScalarType expected = accumulate_type(query.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"y", y}, {"lse", lse}}) {
    TORCH_CHECK(t.scalar_type() == expected && t.device() == query.device(), op, ": ", name,
                " (saved by aft_full_forward) must be ", expected, " on ", query.device(), ", got ", t.scalar_type(),
                " on ", t.device());
    TORCH_CHECK(t.sym_sizes().equals(query.sym_sizes()), op, ": ", name, " (saved by aft_full_forward) must have ",
                "the shape of query (", query.sym_sizes(), "), got ", t.sym_sizes());
  }
}

}  // namespace flowformer::aft_ops
