// The fused kernels of linear attention (kernels/linear_attention: causal forward and backward, segment sums,
// state output) on tensors: which calls they take, and their launches from checked arguments. The CUDA
// backend runs them on the GPU, the test mode FLOWFORMER_EMULATE_CUDA=1 in the SIMT emulator; the calls they
// do not take go the portable way (linear_attention_portable.h).
#pragma once

#include "common/checks.h"
#include "common/chunk_inputs.h"
#include "linear_attention/fused_kernels.h"
#include "linear_attention/linear_attention_ops.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

namespace flowformer::linear_attention_fused {

namespace kernels = linear_attention_kernels;
using linear_attention_ops::CausalGrads;
using linear_attention_ops::CausalResult;
using linear_attention_ops::Grads;
using linear_attention_ops::Optional;
using chunk_inputs::add_in_order;
using chunk_inputs::add_segments;
using chunk_inputs::aligned_rows;
using chunk_inputs::GradientTensors;
using chunk_inputs::contiguous_or_undefined;
using chunk_inputs::data_or_null;
using chunk_inputs::longest_sequence;
using chunk_inputs::element_bytes_of;
using chunk_inputs::element_of;
using chunk_inputs::takes_inputs;

// One build of the kernels: run_for_head_dim<cuda::CausalForward> (...) on the current stream, or the
// emulated ones; how much shared memory a block may have there, and how many multiprocessors run blocks (for
// the split schedules).
struct Build {
  void (*forward)(const kernels::CausalForwardParams&);
  void (*causal_query_grads)(const kernels::CausalBackwardParams&);
  void (*causal_key_grads)(const kernels::CausalBackwardParams&);
  void (*segment_sums)(const kernels::SegmentSumsParams&);
  void (*state_output)(const kernels::StateOutputParams&);
  void (*noncausal_query_grads)(const kernels::NoncausalBackwardParams&);
  void (*noncausal_key_grads)(const kernels::NoncausalBackwardParams&);
  std::size_t shared_limit;
  int64_t multiprocessors;
};

// The forward takes the inputs of the fused kernels (chunk_inputs::takes_inputs: D, M in {16, ..., 256}) within
// the shared memory; a call with L = 1 and no packed sequences stays a decoding step (DecodeStep).
inline bool takes_forward(const at::Tensor& query, const at::Tensor& value, const std::vector<int64_t>& cu,
                          const Build& build) {
  const int64_t D = query.size(3), M = value.size(3);
  const std::size_t bytes = element_bytes_of(query);
  return takes_inputs(query, value, cu) && (query.size(2) != 1 || !cu.empty()) &&
         kernels::causal_forward_shared_bytes(int(D), kernels::value_tile(int(D), int(M), bytes), bytes) <=
             build.shared_limit;
}

// The non-causal forward takes D, M in {16, 32, 64, 128, 256} within the shared memory (float32: D <= 128).
inline bool takes_noncausal(const at::Tensor& query, const at::Tensor& value, const Build& build) {
  const int64_t D = query.size(3), M = value.size(3);
  if (!takes_inputs(query, value, {})) {
    return false;
  }
  const std::size_t bytes = element_bytes_of(query);
  const int BM = kernels::value_tile(int(D), int(M), bytes);
  return std::max(kernels::segment_sums_shared_bytes(int(D), BM, bytes),
                  kernels::state_output_shared_bytes(int(D), BM, bytes)) <= build.shared_limit;
}

// The non-causal backward takes D, M in {16, 32, 64, 128, 256} within the shared memory (float32: D <= 128).
inline bool takes_noncausal_backward(const at::Tensor& query, const at::Tensor& value, const Build& build) {
  const int64_t D = query.size(3), M = value.size(3);
  const std::size_t static_bytes = std::size_t(4) * (2 * D + 3 * kernels::kChunkRows + 4);  // float vectors
  const std::size_t bytes = element_bytes_of(query);
  const int BM = kernels::backward_value_tile(int(D), int(M), bytes);
  return takes_noncausal(query, value, build) && kernels::fused_backward_dims(D, M, /*causal=*/false) &&
         kernels::noncausal_backward_shared_bytes(int(D), BM, bytes) + static_bytes <= build.shared_limit;
}

// The causal backward takes D and M in {16, 32, 64, 128, 256} (kernels::fused_backward_dims; float32: D <= 128)
// within the shared memory.
inline bool takes_backward(const at::Tensor& query, const at::Tensor& value, const std::vector<int64_t>& cu,
                           const Build& build) {
  const int64_t D = query.size(3), M = value.size(3);
  const std::size_t bytes = element_bytes_of(query);
  const int BM = kernels::backward_value_tile(int(D), int(M), bytes);
  return takes_inputs(query, value, cu) && kernels::fused_backward_dims(D, M, /*causal=*/true) &&
         kernels::causal_backward_block_bytes(int(D), BM, bytes) <= build.shared_limit;
}

// The value tiles of a backward's blocks (backward_value_tile).
inline int64_t backward_tiles(const at::Tensor& query, const at::Tensor& value) {
  const int64_t D = query.size(3), M = value.size(3);
  return M / kernels::backward_value_tile(int(D), int(M), element_bytes_of(query));
}

// The inputs of a call (chunk_inputs::InputTensors) and the segments of linear attention's grids.
struct InputTensors : chunk_inputs::InputTensors {
  using chunk_inputs::InputTensors::InputTensors;

  // The segments of forward-like blocks (sequence, head, value tile: a backward pass's if `backward`) over
  // sequences of at most `longest` rows.
  kernels::Segments plan(int64_t longest, const Build& build, kernels::ScheduleBytes bytes,
                         bool backward = false) const {
    const int D = params.D, M = params.M;
    const std::size_t element = kernels::element_bytes(params.element);
    const int64_t tiles = M / (backward ? kernels::backward_value_tile(D, M, element) : kernels::value_tile(D, M, element));
    return kernels::plan_segments(N() * params.H * tiles, longest, build.multiprocessors, bytes);
  }
};

// The sums of k v^T and of k over each segment of the keys (rows params.L; pad: (B, L) bool, or undefined):
// (N, G, H, D, M) and (N, G, H, D) floats.
inline std::pair<at::Tensor, at::Tensor> segment_sums(const Build& build, const InputTensors& in,
                                                      const kernels::Segments& plan, const at::Tensor& pad) {
  const int64_t H = in.params.H, D = in.params.D, M = in.params.M;
  at::Tensor kv = at::empty({in.N(), plan.segments, H, D, M}, in.state_options());
  at::Tensor z = at::empty({in.N(), plan.segments, H, D}, in.state_options());
  kernels::SegmentSumsParams p{};
  static_cast<kernels::Inputs&>(p) = in.params;
  static_cast<kernels::Segments&>(p) = plan;
  p.key_pad = pad.defined() ? pad.const_data_ptr<bool>() : nullptr;
  p.kv = kv.mutable_data_ptr<float>();
  p.z = z.mutable_data_ptr<float>();
  build.segment_sums(p);
  return {kv, z};
}

// The incoming state of each segment ((N, G, ...) sums, in place) from the initial states (N, ...) or zeros:
// an exclusive scan over the segments in order (reversed: from the last segment, for a backward). Returns the
// final states. One cumulative sum over [initial, segments...] along the segments (sequential along that axis
// on both backends: the order of the segments), so the ops a call makes do not grow with the segments.
inline at::Tensor scan_segments(at::Tensor& sums, const at::Tensor& initial, bool reversed = false) {
  const int64_t G = sums.size(1);
  const at::Tensor start = initial.defined() ? initial.unsqueeze(1) : at::zeros_like(sums.narrow(1, 0, 1));
  const at::Tensor running = at::cat({start, reversed ? sums.flip(1) : sums}, 1).cumsum(1);
  const at::Tensor incoming = running.narrow(1, 0, G);
  sums.copy_(reversed ? incoming.flip(1) : incoming);
  return running.select(1, G).contiguous();
}

inline CausalResult causal_forward(const Build& build, const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value, FeatureMap feature_map, bool normalize, double eps,
                                   const Optional& initial_kv, const Optional& initial_z,
                                   const std::vector<int64_t>& cu) {
  const InputTensors in(query, key, value, feature_map, normalize, eps, cu);
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3), M = value.size(3);
  const at::Tensor kv0 = contiguous_or_undefined(initial_kv), z0 = contiguous_or_undefined(initial_z);
  at::Tensor out = new_output(c10::fromIntArrayRefSlow({B, H, L, M}), query.options());
  kernels::CausalForwardParams p{};
  static_cast<kernels::Inputs&>(p) = in.params;
  p.out = out.mutable_data_ptr();
  const kernels::Segments plan = in.plan(longest_sequence(L, cu), build, kernels::kCausalForwardBytes);
  static_cast<kernels::Segments&>(p) = plan;
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
  auto [kv_in, z_in] = segment_sums(build, in, plan, {});
  at::Tensor kv = scan_segments(kv_in, kv0), z = scan_segments(z_in, z0);
  p.kv0 = kv_in.const_data_ptr<float>();
  p.z0 = z_in.const_data_ptr<float>();
  p.kv_final = nullptr;  // the scan gave the final states
  p.z_final = nullptr;
  build.forward(p);
  return {out, kv, z};
}

// out_i = phi(q_i)^T S / (phi(q_i)^T z + eps), S and z the sums over the valid keys: the keys' segments sums
// (segment_sums), added in segment order, then every row's output (state_output), both split for the device.
inline at::Tensor noncausal_forward(const Build& build, const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value, FeatureMap feature_map, double eps,
                                    const Optional& key_padding_mask) {
  InputTensors in(query, key, value, feature_map, /*normalize=*/true, eps, {});
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), M = value.size(3);
  const at::Tensor pad = contiguous_or_undefined(key_padding_mask);
  in.params.L = key.size(2);
  auto [kv_parts, z_parts] = segment_sums(build, in, in.plan(key.size(2), build, kernels::kNoncausalBytes), pad);
  const at::Tensor kv = add_segments(kv_parts), z = add_segments(z_parts);
  at::Tensor out = new_output(c10::fromIntArrayRefSlow({B, H, L, M}), query.options());
  kernels::StateOutputParams p{};
  static_cast<kernels::Inputs&>(p) = in.params;
  p.L = L;
  static_cast<kernels::Segments&>(p) = in.plan(L, build, kernels::kNoncausalBytes);
  p.out = out.mutable_data_ptr();
  p.kv = kv.const_data_ptr<float>();
  p.z = z.const_data_ptr<float>();
  build.state_output(p);
  return out;
}

// The gradients of non-causal linear attention (noncausal_backward.cuh): the forward's sums again
// (segment_sums), the queries' pass (dq and the segments' sums of dS, dz), then the keys' (dk, dv).
inline Grads noncausal_backward(const Build& build, const at::Tensor& grad_out, const at::Tensor& query,
                                const at::Tensor& key, const at::Tensor& value, FeatureMap feature_map, double eps,
                                const Optional& key_padding_mask) {
  InputTensors in(query, key, value, feature_map, /*normalize=*/true, eps, {});
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), S = key.size(2);
  const int64_t D = query.size(3), M = value.size(3);
  const at::Tensor pad = contiguous_or_undefined(key_padding_mask);
  const at::Tensor dout = aligned_rows(grad_out.to(query.scalar_type()));
  in.params.L = S;
  const kernels::Segments key_plan = in.plan(S, build, kernels::kNoncausalBytes, true),
                          query_plan = in.plan(L, build, kernels::kNoncausalBytes, true);
  auto [kv_parts, z_parts] = segment_sums(build, in, key_plan, pad);
  const at::Tensor kv = add_segments(kv_parts), z = add_segments(z_parts);
  const int64_t tiles = backward_tiles(query, value);
  GradientTensors grads(query, value, S, tiles);
  at::Tensor dkv_parts = at::empty({B, query_plan.segments, H, D, M}, in.state_options());
  at::Tensor dz_parts = at::empty({tiles, B, query_plan.segments, H, D}, in.state_options());  // the tiles' shares
  kernels::NoncausalBackwardParams p{};
  static_cast<kernels::Inputs&>(p) = in.params;
  p.L = L;
  static_cast<kernels::Segments&>(p) = query_plan;
  p.dout = dout.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.dout_stride[i] = dout.stride(i);
  }
  p.kv = kv.const_data_ptr<float>();
  p.z = z.const_data_ptr<float>();
  grads.set(p);
  p.dkv = dkv_parts.mutable_data_ptr<float>();
  p.dz = dz_parts.mutable_data_ptr<float>();
  build.noncausal_query_grads(p);
  const at::Tensor dkv = add_segments(dkv_parts), dz = add_segments(add_in_order(dz_parts, 0));
  p.L = S;
  static_cast<kernels::Segments&>(p) = key_plan;
  p.key_pad = pad.defined() ? pad.const_data_ptr<bool>() : nullptr;
  p.kv = dkv.const_data_ptr<float>();
  p.z = dz.const_data_ptr<float>();
  build.noncausal_key_grads(p);
  grads.finish();
  return {grads.dq, grads.dk, grads.dv};
}

// The gradients of causal linear attention (causal_backward.cuh): the queries' pass, then the keys'. The split
// schedule: the forward's segment sums scanned in order give each segment its incoming state; the queries' pass
// also sums each segment's share of the reverse state, scanned from the end for the keys' pass (and the initial
// state's gradients).
inline CausalGrads causal_backward(const Build& build, const at::Tensor& grad_out, const Optional& grad_final_kv,
                                   const Optional& grad_final_z, const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value, FeatureMap feature_map, bool normalize, double eps,
                                   const Optional& initial_kv, const Optional& initial_z,
                                   const std::vector<int64_t>& cu) {
  const InputTensors in(query, key, value, feature_map, normalize, eps, cu);
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3), M = value.size(3);
  const int64_t tiles = backward_tiles(query, value);
  const at::Tensor dout = aligned_rows(grad_out.to(query.scalar_type()));
  const at::Tensor kv0 = contiguous_or_undefined(initial_kv), z0 = contiguous_or_undefined(initial_z);
  const at::Tensor dkv = contiguous_or_undefined(grad_final_kv), dz = contiguous_or_undefined(grad_final_z);
  GradientTensors grads(query, value, L, tiles);
  // Between the passes: 1 / den_t, then dden_t (the value tiles' shares, added for the key pass).
  const at::Tensor rows = at::empty({1 + tiles, B, H, L}, in.state_options());
  kernels::CausalBackwardParams p{};
  static_cast<kernels::Inputs&>(p) = in.params;
  p.dout = dout.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.dout_stride[i] = dout.stride(i);
  }
  grads.set(p);
  p.inv_den = rows[0].mutable_data_ptr<float>();
  p.dden = rows[1].mutable_data_ptr<float>();
  const kernels::Segments plan =
      in.plan(longest_sequence(L, cu), build, kernels::kCausalBackwardBytes, /*backward=*/true);
  static_cast<kernels::Segments&>(p) = plan;
  at::Tensor dkv0, dz0, kv_in, z_in, dkv_in, dz_in;
  if (plan.segments == 1) {
    dkv0 = new_output(c10::fromIntArrayRefSlow({in.N(), H, D, M}), in.state_options());
    dz0 = new_output(c10::fromIntArrayRefSlow({in.N(), H, D}), in.state_options());
    p.kv0 = data_or_null(kv0);
    p.z0 = data_or_null(z0);
    p.dkv0 = dkv0.mutable_data_ptr<float>();
    p.dz0 = dz0.mutable_data_ptr<float>();
  } else {
    std::tie(kv_in, z_in) = segment_sums(build, in, plan, {});
    scan_segments(kv_in, kv0);
    scan_segments(z_in, z0);
    dkv_in = at::empty_like(kv_in);
    dz_in = at::empty({tiles, in.N(), plan.segments, H, D}, in.state_options());  // the tiles' shares
    p.kv0 = kv_in.const_data_ptr<float>();
    p.z0 = z_in.const_data_ptr<float>();
    p.dkv_sums = dkv_in.mutable_data_ptr<float>();
    p.dz_sums = dz_in.mutable_data_ptr<float>();
  }
  build.causal_query_grads(p);
  const at::Tensor dden = add_in_order(rows.narrow(0, 1, tiles), 0);
  p.dden = dden.mutable_data_ptr<float>();
  if (plan.segments == 1) {
    p.dkv_final = data_or_null(dkv);
    p.dz_final = data_or_null(dz);
  } else {  // the gradients flowing into each segment from its end; the scans give the initial state's
    dz_in = add_in_order(dz_in, 0).contiguous();  // the tiles' shares added
    dkv0 = scan_segments(dkv_in, dkv, /*reversed=*/true);
    dz0 = scan_segments(dz_in, dz, /*reversed=*/true);
    p.dkv_final = dkv_in.const_data_ptr<float>();
    p.dz_final = dz_in.const_data_ptr<float>();
    p.dkv_sums = nullptr;
    p.dz_sums = nullptr;
  }
  build.causal_key_grads(p);
  grads.finish();
  return {grads.dq, grads.dk, grads.dv, dkv0, dz0};
}

}  // namespace flowformer::linear_attention_fused
