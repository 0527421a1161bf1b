// The inputs of the fused chunked kernels (kernels/chunk/inputs.h) from tensors, for every kernel family's torch
// glue: their element type, rows aligned for cp.async, and the parameters that point into them.
#pragma once

#include "chunk/inputs.h"
#include "common/checks.h"
#include "common/feature_map.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace flowformer::chunk_inputs {

// The kernels' element type of the inputs' dtype: bf16, half or float32 (float64 takes no fused kernel).
inline chunk::Element element_of(const at::Tensor& query) {
  switch (query.scalar_type()) {
    case at::kHalf:
      return chunk::Element::half;
    case at::kFloat:
      return chunk::Element::float32;
    default:
      return chunk::Element::bf16;
  }
}

// Bytes an element of the kernels' type of the inputs' dtype (element_of).
inline std::size_t element_bytes_of(const at::Tensor& query) { return chunk::element_bytes(element_of(query)); }

// x, or a contiguous copy where its rows are not unit-stride runs on 16 bytes (what cp.async reads).
inline at::Tensor aligned_rows(const at::Tensor& x) {
  const int64_t per16 = 16 / int64_t(x.element_size());  // elements in 16 bytes
  const bool aligned = x.stride(3) == 1 && reinterpret_cast<std::uintptr_t>(x.const_data_ptr()) % 16 == 0 &&
                       x.stride(0) % per16 == 0 && x.stride(1) % per16 == 0 && x.stride(2) % per16 == 0;
  return aligned ? x : x.clone(at::MemoryFormat::Contiguous);
}

// Inputs a fused kernel takes: bf16, half or float32 (D <= chunk::kMaxFloatD), D and M in {16, 32, 64, 128,
// 256}, sequences and heads that fit a grid (cu: the checked values of cu_seqlens, or empty).
inline bool takes_inputs(const at::Tensor& query, const at::Tensor& value, const std::vector<int64_t>& cu) {
  const at::ScalarType type = query.scalar_type();
  const int64_t D = query.size(3), M = value.size(3);
  const bool typed = type == at::kBFloat16 || type == at::kHalf || (type == at::kFloat && D <= chunk::kMaxFloatD);
  const int64_t sequences = cu.empty() ? query.size(0) : int64_t(cu.size()) - 1;
  return typed && chunk::fused_head_dim(D) && chunk::fused_head_dim(M) &&
         sequences < std::numeric_limits<int32_t>::max() && query.size(1) <= 65535;
}

inline const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); }

// The inputs' part of the parameters, and the tensors it points into (aligned copies where needed, the
// offsets of cu_seqlens on the device). params.L is the length of query (a non-causal call sets the keys'
// for its key pass).
struct InputTensors {
  at::Tensor q, k, v, offsets;
  chunk::Inputs params;

  InputTensors(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, FeatureMap feature_map,
               bool normalize, double eps, const std::vector<int64_t>& cu)
      : q(aligned_rows(query)), k(aligned_rows(key)), v(aligned_rows(value)) {
    if (!cu.empty()) {
      offsets = at::tensor(cu, at::TensorOptions().dtype(at::kLong)).to(query.device());
    }
    chunk::Inputs& p = params;
    p.q = q.const_data_ptr();
    p.k = k.const_data_ptr();
    p.v = v.const_data_ptr();
    for (int i = 0; i < 3; ++i) {
      p.q_stride[i] = q.stride(i);
      p.k_stride[i] = k.stride(i);
      p.v_stride[i] = v.stride(i);
    }
    p.cu_seqlens = offsets.defined() ? offsets.const_data_ptr<int64_t>() : nullptr;
    p.L = query.size(2);
    p.N = int(cu.empty() ? query.size(0) : int64_t(cu.size()) - 1);
    p.H = int(query.size(1));
    p.D = int(query.size(3));
    p.M = int(value.size(3));
    p.feature_map = feature_map;
    p.normalize = normalize;
    p.eps = static_cast<float>(eps);
    p.element = element_of(query);
  }
  at::TensorOptions state_options() const { return q.options().dtype(at::kFloat); }
  int64_t N() const { return params.N; }
};

// The length of the longest sequence: L, or the longest of the packed ones.
inline int64_t longest_sequence(int64_t L, const std::vector<int64_t>& cu) {
  if (cu.empty()) {
    return L;
  }
  int64_t longest = 0;
  for (size_t n = 0; n + 1 < cu.size(); ++n) {
    longest = std::max(longest, cu[n + 1] - cu[n]);
  }
  return longest;
}

// The sum of `parts` over the axis `dim`, added in order.
inline at::Tensor add_in_order(const at::Tensor& parts, int64_t dim) {
  if (parts.size(dim) == 1) {
    return parts.select(dim, 0);
  }
  at::Tensor sum = parts.select(dim, 0).clone(at::MemoryFormat::Contiguous);
  for (int64_t i = 1; i < parts.size(dim); ++i) {
    sum.add_(parts.select(dim, i));
  }
  return sum;
}

// The sums over the segments of (N, G, ...) sums, added in segment order (one cumulative sum: its ops do not
// grow with the segments).
inline at::Tensor add_segments(const at::Tensor& sums) {
  return sums.cumsum(1).select(1, sums.size(1) - 1).contiguous();
}

// The gradients of q, k, v of a backward (queries of L rows, keys of S), and where M spans several value tiles
// (`tiles` of the backward's blocks) the tiles' float shares of dq and dk (chunk::Gradients), added in tile order
// by finish().
struct GradientTensors {
  at::Tensor dq, dk, dv, dq_parts, dk_parts;

  GradientTensors(const at::Tensor& query, const at::Tensor& value, int64_t S, int64_t tiles) {
    const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3), M = value.size(3);
    dq = new_output(c10::fromIntArrayRefSlow({B, H, L, D}), query.options());
    dk = new_output(c10::fromIntArrayRefSlow({B, H, S, D}), query.options());
    dv = new_output(c10::fromIntArrayRefSlow({B, H, S, M}), query.options());
    if (tiles > 1) {
      dq_parts = at::empty({tiles, B, H, L, D}, query.options().dtype(at::kFloat));
      dk_parts = at::empty({tiles, B, H, S, D}, query.options().dtype(at::kFloat));
    }
  }
  void set(chunk::Gradients& g) const {
    g.dq = dq.mutable_data_ptr();
    g.dk = dk.mutable_data_ptr();
    g.dv = dv.mutable_data_ptr();
    g.dq_parts = dq_parts.defined() ? dq_parts.mutable_data_ptr<float>() : nullptr;
    g.dk_parts = dk_parts.defined() ? dk_parts.mutable_data_ptr<float>() : nullptr;
  }
  // dq and dk from the shares, once both passes ran.
  void finish() {
    if (dq_parts.defined()) {
      dq.copy_(add_in_order(dq_parts, 0));
      dk.copy_(add_in_order(dk_parts, 0));
    }
  }
};

}  // namespace flowformer::chunk_inputs
