// The fused causal kernels of linear attention (kernels/linear_attention/causal_forward.cuh and
// causal_backward.cuh) on tensors: which calls they take, and their launches from checked arguments. The CUDA
// backend runs them on the GPU, the test mode FLOWFORMER_EMULATE_CUDA=1 in the SIMT emulator; the calls they
// do not take go the portable way (linear_attention_portable.h).
#pragma once

#include "common/checks.h"
#include "linear_attention/causal.h"
#include "linear_attention/linear_attention_ops.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace flowformer::linear_attention_fused {

namespace kernels = linear_attention_kernels;
using linear_attention_ops::CausalGrads;
using linear_attention_ops::CausalResult;
using linear_attention_ops::Optional;

// One build of the kernels: run_for_head_dim<cuda::CausalForward> on the current stream, or the emulated
// ones; how much shared memory a block may have there, and how many multiprocessors run blocks (for the
// split schedule of the forward).
struct Build {
  void (*forward)(const kernels::CausalForwardParams&);
  void (*backward)(const kernels::CausalBackwardParams&);
  std::size_t shared_limit;
  int64_t multiprocessors;
};

// bf16 or half inputs, sequences and heads that fit a grid. cu: the checked values of cu_seqlens, or empty.
inline bool takes_inputs(const at::Tensor& query, const std::vector<int64_t>& cu) {
  const at::ScalarType type = query.scalar_type();
  const int64_t sequences = cu.empty() ? query.size(0) : int64_t(cu.size()) - 1;
  return (type == at::kBFloat16 || type == at::kHalf) && sequences < std::numeric_limits<int32_t>::max() &&
         query.size(1) <= 65535;
}

// The forward takes D, M in {16, 32, 64, 128, 256} within the shared memory; a call with L = 1 and no packed
// sequences stays a decoding step (DecodeStep).
inline bool takes_forward(const at::Tensor& query, const at::Tensor& value, const std::vector<int64_t>& cu,
                          const Build& build) {
  const int64_t D = query.size(3), M = value.size(3);
  return takes_inputs(query, cu) && kernels::fused_head_dim(D) && kernels::fused_head_dim(M) &&
         (query.size(2) != 1 || !cu.empty()) &&
         kernels::causal_forward_shared_bytes(int(D), kernels::value_tile(int(D), int(M))) <= build.shared_limit;
}

// The backward takes D <= 128 and M within one value tile (kernels::fused_backward_dims).
inline bool takes_backward(const at::Tensor& query, const at::Tensor& value, const std::vector<int64_t>& cu,
                           const Build& build) {
  const int64_t D = query.size(3), M = value.size(3);
  return takes_inputs(query, cu) && kernels::fused_backward_dims(D, M) &&
         kernels::causal_backward_block_bytes(int(D), int(M)) <= build.shared_limit;
}

// x, or a contiguous copy where its rows are not unit-stride runs on 16 bytes (what cp.async reads).
inline at::Tensor aligned_rows(const at::Tensor& x) {
  const bool aligned = x.stride(3) == 1 && reinterpret_cast<std::uintptr_t>(x.const_data_ptr()) % 16 == 0 &&
                       x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0;
  return aligned ? x : x.clone(at::MemoryFormat::Contiguous);
}

inline const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }
inline at::Tensor contiguous_or_undefined(const Optional& t) { return t.has_value() ? t->contiguous() : at::Tensor(); }

// The inputs' part of the parameters, and the tensors it points into (aligned copies where needed, the
// offsets of cu_seqlens on the device).
struct Inputs {
  at::Tensor q, k, v, offsets;
  kernels::CausalInputs params;

  Inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, FeatureMap feature_map,
         bool normalize, double eps, const std::vector<int64_t>& cu)
      : q(aligned_rows(query)), k(aligned_rows(key)), v(aligned_rows(value)) {
    if (!cu.empty()) {
      offsets = at::tensor(cu, at::TensorOptions().dtype(at::kLong)).to(query.device());
    }
    kernels::CausalInputs& p = params;
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
    p.half = query.scalar_type() == at::kHalf;
  }
  at::TensorOptions state_options() const { return q.options().dtype(at::kFloat); }
  int64_t N() const { return params.N; }
};

// The incoming state of each segment ((N, G, ...) sums, in place) from the initial states (N, ...) or zeros:
// an exclusive scan over the segments in order. Returns the final states.
inline at::Tensor scan_segments(at::Tensor& sums, const at::Tensor& initial) {
  at::Tensor running = initial.defined() ? initial.clone() : at::zeros_like(sums.select(1, 0));
  for (int64_t g = 0; g < sums.size(1); ++g) {
    at::Tensor segment = sums.select(1, g);
    const at::Tensor incoming = running.clone();
    running.add_(segment);
    segment.copy_(incoming);
  }
  return running;
}

inline CausalResult causal_forward(const Build& build, const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value, FeatureMap feature_map, bool normalize, double eps,
                                   const Optional& initial_kv, const Optional& initial_z,
                                   const std::vector<int64_t>& cu) {
  const Inputs in(query, key, value, feature_map, normalize, eps, cu);
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3), M = value.size(3);
  const at::Tensor kv0 = contiguous_or_undefined(initial_kv), z0 = contiguous_or_undefined(initial_z);
  at::Tensor out = new_output(c10::fromIntArrayRefSlow({B, H, L, M}), query.options());
  kernels::CausalForwardParams p{};
  static_cast<kernels::CausalInputs&>(p) = in.params;
  p.out = out.mutable_data_ptr();
  int64_t longest = L;
  if (!cu.empty()) {
    longest = 0;
    for (size_t n = 0; n + 1 < cu.size(); ++n) {
      longest = std::max(longest, cu[n + 1] - cu[n]);
    }
  }
  const int64_t tiles = M / kernels::value_tile(int(D), int(M));
  const kernels::SegmentPlan plan = kernels::plan_segments(in.N() * H * tiles, longest, build.multiprocessors);
  p.segments = int(plan.segments);
  p.segment_rows = plan.rows;
  if (plan.segments == 1) {
    at::Tensor kv = new_output(c10::fromIntArrayRefSlow({in.N(), H, D, M}), in.state_options());
    at::Tensor z = new_output(c10::fromIntArrayRefSlow({in.N(), H, D}), in.state_options());
    p.kv0 = data_or_null(kv0);
    p.z0 = data_or_null(z0);
    p.kv_final = kv.mutable_data_ptr<float>();
    p.z_final = z.mutable_data_ptr<float>();
    build.forward(p);
    return {out, kv, z};
  }
  // The split schedule: the segments' sums, their incoming states, then every segment from its own.
  at::Tensor kv_in = at::empty({in.N(), plan.segments, H, D, M}, in.state_options());
  at::Tensor z_in = at::empty({in.N(), plan.segments, H, D}, in.state_options());
  p.state_only = true;
  p.kv_final = kv_in.mutable_data_ptr<float>();
  p.z_final = z_in.mutable_data_ptr<float>();
  build.forward(p);
  at::Tensor kv = scan_segments(kv_in, kv0), z = scan_segments(z_in, z0);
  p.state_only = false;
  p.kv0 = kv_in.const_data_ptr<float>();
  p.z0 = z_in.const_data_ptr<float>();
  p.kv_final = nullptr;  // the scan gave the final states
  p.z_final = nullptr;
  build.forward(p);
  return {out, kv, z};
}

inline CausalGrads causal_backward(const Build& build, const at::Tensor& grad_out, const Optional& grad_final_kv,
                                   const Optional& grad_final_z, const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value, FeatureMap feature_map, bool normalize, double eps,
                                   const Optional& initial_kv, const Optional& initial_z,
                                   const std::vector<int64_t>& cu) {
  const Inputs in(query, key, value, feature_map, normalize, eps, cu);
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3), M = value.size(3);
  const at::Tensor dout = aligned_rows(grad_out.to(query.scalar_type()));
  const at::Tensor kv0 = contiguous_or_undefined(initial_kv), z0 = contiguous_or_undefined(initial_z);
  const at::Tensor dkv = contiguous_or_undefined(grad_final_kv), dz = contiguous_or_undefined(grad_final_z);
  at::Tensor dq = new_output(c10::fromIntArrayRefSlow({B, H, L, D}), query.options());
  at::Tensor dk = new_output(c10::fromIntArrayRefSlow({B, H, L, D}), query.options());
  at::Tensor dv = new_output(c10::fromIntArrayRefSlow({B, H, L, M}), query.options());
  at::Tensor dkv0 = new_output(c10::fromIntArrayRefSlow({in.N(), H, D, M}), in.state_options());
  at::Tensor dz0 = new_output(c10::fromIntArrayRefSlow({in.N(), H, D}), in.state_options());
  at::Tensor rows = at::empty({2, B, H, L}, in.state_options());  // 1 / den_t and dden_t, between the passes
  kernels::CausalBackwardParams p{};
  static_cast<kernels::CausalInputs&>(p) = in.params;
  p.dout = dout.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.dout_stride[i] = dout.stride(i);
  }
  p.kv0 = data_or_null(kv0);
  p.z0 = data_or_null(z0);
  p.dkv_final = data_or_null(dkv);
  p.dz_final = data_or_null(dz);
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  p.dkv0 = dkv0.mutable_data_ptr<float>();
  p.dz0 = dz0.mutable_data_ptr<float>();
  p.inv_den = rows[0].mutable_data_ptr<float>();
  p.dden = rows[1].mutable_data_ptr<float>();
  build.backward(p);
  return {dq, dk, dv, dkv0, dz0};
}

}  // namespace flowformer::linear_attention_fused
